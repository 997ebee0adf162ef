#!/usr/bin/env bash
# Prepare everything the launcher and the tests need, and nothing more; safe to run again.
#
#   1. a real ComfyUI tree of one version: v0.19.3 (the primary target, the default) or v0.3.64
#      (still supported), chosen by CHIPMUNK_COMFYUI_VERSION. It is taken from, in this order:
#        a. CHIPMUNK_COMFYUI_DIR, when that folder holds a ComfyUI (used as it is);
#        b. the archive CHIPMUNK_COMFYUI_ARCHIVE names (a .tar.gz whose top folder is ComfyUI/),
#           unpacked once;
#        c. a clone of the version's tag from CHIPMUNK_COMFYUI_URL (default: the public repository).
#      b and c put it in CHIPMUNK_COMFYUI_DIR when set, else in ~/.cache/comfyui-chipmunk/ComfyUI-v<version>.
#   2. a Python venv, ${CHIPMUNK_VENV:-<repo>/.venv}, with torch + torchvision (pinned per CPU
#      architecture, only when torch is missing), the torchaudio that goes with them, the pack's
#      requirements.txt, tests/requirements.txt and the primary ComfyUI's requirements (without
#      torch*: the installed builds are kept, as a pip constraint). A torch that is there (the
#      venv's, or one you installed into it first) is never replaced. Which build a fresh venv gets:
#      with an NVIDIA driver (nvidia-smi or /proc/driver/nvidia), or on macOS, the registry's default
#      build; without one (Linux), the CPU build from the PyTorch CPU wheel index, so that no CUDA
#      libraries are installed for nothing. Where that index cannot be reached, the default build is
#      installed after all, with a warning that says how to avoid it;
#   3. for another ComfyUI version, a small venv layered on that one (<venv>/.chipmunk/comfyui-v<version>):
#      it sees every package of the main venv (torch included) and holds only what that version pins
#      differently (for v0.3.64: its front end, workflow templates and embedded docs).
#
# Requirements are installed again only when a requirement file or the torch builds change.
# When no ComfyUI can be had, the script still succeeds and says how to get one (the tests that
# need ComfyUI then skip, saying the same), unless CHIPMUNK_REQUIRE_COMFYUI=1 (CI): then it fails.
#
# Standard output carries only these lines, for `eval "$(bash tools/setup_env.sh)"`; the log goes
# to standard error:
#   CHIPMUNK_COMFYUI_DIR=<the ComfyUI tree>   (where it would be, when there is none)
#   CHIPMUNK_COMFYUI_VERSION=<its version>    (the requested one, when there is none)
#   CHIPMUNK_VENV_PYTHON=<the Python to run ComfyUI and the tests with>
#
# Environment:
#   CHIPMUNK_COMFYUI_VERSION   0.19.3 (default) or 0.3.64; another version's tag is cloned untested
#   CHIPMUNK_COMFYUI_DIR       an existing ComfyUI tree, or where to put one
#   CHIPMUNK_COMFYUI_ARCHIVE   a ComfyUI source archive to unpack instead of cloning
#   CHIPMUNK_COMFYUI_URL       where to clone ComfyUI from
#   CHIPMUNK_REQUIRE_COMFYUI   1: fail when no ComfyUI can be had
#   CHIPMUNK_VENV              venv location
#   CHIPMUNK_TORCH_BUILD       auto (default), cpu or default: which torch build a fresh venv gets
#   CHIPMUNK_TORCH_CPU_INDEX   the CPU wheel index (default https://download.pytorch.org/whl/cpu)
#   CHIPMUNK_PYTHON            interpreter that creates the venv (default: python3)
set -euo pipefail
exec 3>&1 1>&2  # everything but the final KEY=value lines goes to standard error

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CHIPMUNK_VENV:-$REPO/.venv}"
PYTHON="${CHIPMUNK_PYTHON:-python3}"
COMFYUI_URL="${CHIPMUNK_COMFYUI_URL:-https://github.com/Comfy-Org/ComfyUI}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-chipmunk"
REQUIRE="${CHIPMUNK_REQUIRE_COMFYUI:-0}"
# Keep in step with tests/harness/paths.py.
PRIMARY_VERSION="0.19.3"
declare -A TESTED_COMMITS=(
    [0.19.3]="30860264"
    [0.3.64]="a125cd84b054a57729b5eecab930ca9408719832"
)

case "$(uname -m)" in
    aarch64 | arm64) TORCH_PINS=("torch==2.9.1" "torchvision==0.24.1") ;;
    *)               TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1") ;;
esac

log() { printf '[setup_env] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
step_start=$SECONDS
step_done() { log "$1: done in $((SECONDS - step_start)) s"; step_start=$SECONDS; }

# --- 1. ComfyUI --------------------------------------------------------------------------------
comfyui_present() { [[ -f "$1/main.py" && -d "$1/comfy" && -f "$1/requirements.txt" ]]; }
version_in() { sed -n 's/^__version__ *= *["'\'']\([0-9.]*\)["'\''].*/\1/p'; }  # a comfyui_version.py on stdin
tree_version() { version_in <"$1/comfyui_version.py" 2>/dev/null || true; }

requested="${CHIPMUNK_COMFYUI_VERSION:-}"
requested="${requested#v}"
archive="${CHIPMUNK_COMFYUI_ARCHIVE:-}"
if [[ -n "$archive" ]]; then
    [[ -f "$archive" ]] || die "CHIPMUNK_COMFYUI_ARCHIVE names $archive, which does not exist"
    archive="$(cd "$(dirname "$archive")" && pwd)/$(basename "$archive")"
    archive_version="$(tar -xzOf "$archive" ComfyUI/comfyui_version.py 2>/dev/null | version_in)"
    [[ -n "$archive_version" ]] || die "$archive holds no ComfyUI/comfyui_version.py"
    if [[ -n "$requested" && "$requested" != "$archive_version" ]]; then
        die "CHIPMUNK_COMFYUI_VERSION asks for $requested, but $archive holds ComfyUI $archive_version"
    fi
    requested="$archive_version"
fi
VERSION="${requested:-$PRIMARY_VERSION}"
COMFYUI_DIR="${CHIPMUNK_COMFYUI_DIR:-$CACHE/ComfyUI-v$VERSION}"

if comfyui_present "$COMFYUI_DIR"; then
    found="$(tree_version "$COMFYUI_DIR")"
    if [[ -n "$requested" && "$found" != "$requested" ]]; then
        die "$COMFYUI_DIR holds ComfyUI ${found:-of unknown version}, not the requested $requested"
    fi
    VERSION="${found:-$VERSION}"
    log "ComfyUI v$VERSION at $COMFYUI_DIR"
elif [[ -e "$COMFYUI_DIR" && -n "$(ls -A "$COMFYUI_DIR" 2>/dev/null)" ]]; then
    die "$COMFYUI_DIR exists but holds no ComfyUI (no main.py, comfy/, requirements.txt)"
else
    mkdir -p "$(dirname "$COMFYUI_DIR")"
    rmdir "$COMFYUI_DIR" 2>/dev/null || true
    partial="$(mktemp -d "$(dirname "$COMFYUI_DIR")/.partial.XXXXXX")"
    trap 'rm -rf "$partial"' EXIT
    if [[ -n "$archive" ]]; then
        log "unpacking $archive into $COMFYUI_DIR"
        tar -xzf "$archive" -C "$partial"
        comfyui_present "$partial/ComfyUI" || die "$archive does not hold a ComfyUI/ tree"
        mv "$partial/ComfyUI" "$COMFYUI_DIR"
    else
        log "cloning ComfyUI v$VERSION from $COMFYUI_URL into $COMFYUI_DIR"
        if GIT_TERMINAL_PROMPT=0 git -c advice.detachedHead=false clone --quiet --depth 1 \
                --branch "v$VERSION" "$COMFYUI_URL" "$partial/ComfyUI" </dev/null; then
            head="$(git -C "$partial/ComfyUI" rev-parse HEAD)"
            tested="${TESTED_COMMITS[$VERSION]:-}"
            if [[ -z "$tested" ]]; then
                log "note: ComfyUI v$VERSION is not one this pack is tested with (${!TESTED_COMMITS[*]})"
            elif [[ "$head" != "$tested"* ]]; then
                die "tag v$VERSION of $COMFYUI_URL is commit $head, not the tested ${tested:0:8}"
            fi
            found="$(tree_version "$partial/ComfyUI")"
            [[ "$found" == "$VERSION" ]] || die "tag v$VERSION of $COMFYUI_URL holds ComfyUI ${found:-of unknown version}"
            mv "$partial/ComfyUI" "$COMFYUI_DIR"
        fi
    fi
    rm -rf "$partial"
    if ! comfyui_present "$COMFYUI_DIR"; then
        cat >&2 <<EOF
[setup_env] no ComfyUI could be had (cloning $COMFYUI_URL failed). Provide ComfyUI v$VERSION in one
[setup_env] of these ways, then run this script again:
[setup_env]   git clone --branch v$VERSION https://github.com/Comfy-Org/ComfyUI "$COMFYUI_DIR"
[setup_env]   or set CHIPMUNK_COMFYUI_ARCHIVE to a ComfyUI source .tar.gz (top folder ComfyUI/),
[setup_env]   or set CHIPMUNK_COMFYUI_DIR to an existing ComfyUI tree,
[setup_env]   or set CHIPMUNK_COMFYUI_URL to a reachable clone source.
[setup_env] Until then the tests that need ComfyUI are skipped and tools/start.sh cannot run.
EOF
        if [[ "$REQUIRE" == 1 ]]; then die "CHIPMUNK_REQUIRE_COMFYUI=1: a ComfyUI is required"; fi
    fi
fi
have_comfyui=false
if comfyui_present "$COMFYUI_DIR"; then have_comfyui=true; fi
step_done "ComfyUI tree"

# --- 2. the main venv --------------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv at $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
state_dir="$VENV/.chipmunk"
mkdir -p "$state_dir"

# The main venv's pip does every install; for the layered venv below it works on that venv's
# interpreter (--python) and installs there. Some pip set-ups warn once per missing index folder
# ("WARNING: Location ... is ignored"): noise, filtered out; everything else pip says is kept.
pip_install() {  # target python, pip install arguments...
    local target=()
    [[ "$1" != "$PY" ]] && target=(--python "$1")
    shift
    "$PY" -m pip "${target[@]}" install --disable-pip-version-check --no-input --quiet "$@" \
        2> >(grep -v '^WARNING: Location .* is ignored' >&2)
}
digest_of() { cat "$@" | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])'; }
# ComfyUI's requirements without torch* (installed below, before anything else, and kept): pip
# must not swap torch for another build; torchaudio is installed on its own, because there may
# be no torchaudio for this torch.
comfyui_requirements() {
    grep -Ev '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;].*)?$' "$1/requirements.txt"
}

has_module() { "$1" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$2') is None)"; }

# Which torch build a fresh venv gets (see the header): a CUDA build is some 3 GiB of libraries
# that a machine without an NVIDIA GPU never uses.
TORCH_BUILD="${CHIPMUNK_TORCH_BUILD:-auto}"
CPU_INDEX="${CHIPMUNK_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
nvidia_present() {
    [[ -e /proc/driver/nvidia/version ]] && return 0
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}
index_reachable() {  # url: answers within 15 s (proxy settings of the environment apply)
    "$PY" - "$1" <<'EOF' 2>/dev/null
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=15).close()
except Exception:
    sys.exit(1)
EOF
}
install_torch() {
    local build="$TORCH_BUILD"
    case "$build" in
        auto)
            if [[ "$(uname -s)" != Linux ]] || nvidia_present; then build=default; else build=cpu; fi ;;
        cpu | default) ;;
        *) die "CHIPMUNK_TORCH_BUILD is '$build': use auto, cpu or default" ;;
    esac
    if [[ "$build" == cpu ]]; then
        if index_reachable "$CPU_INDEX"; then
            # Both indexes offer each pinned version; the CPU index's (2.14.1+cpu) ranks above the
            # registry's plain 2.14.1, so pip takes it; the rest (sympy, ...) comes from the registry.
            log "no NVIDIA GPU: installing the CPU build of ${TORCH_PINS[*]} from $CPU_INDEX"
            pip_install "$PY" --extra-index-url "$CPU_INDEX" "${TORCH_PINS[@]}"
            return
        fi
        cat >&2 <<EOF
[setup_env] WARNING: no NVIDIA GPU here, but the PyTorch CPU wheel index cannot be reached
[setup_env]   ($CPU_INDEX). Installing the registry's default torch build instead: it brings
[setup_env]   CUDA libraries (about 3 GiB) that this machine will not use. To avoid that, stop now
[setup_env]   (Ctrl+C) and set CHIPMUNK_TORCH_CPU_INDEX to a CPU wheel index that answers here, or
[setup_env]   install a CPU build of torch and torchvision into $VENV yourself (it is kept).
EOF
    fi
    log "installing ${TORCH_PINS[*]}"
    pip_install "$PY" "${TORCH_PINS[@]}"
}

if ! has_module "$PY" torch; then
    install_torch
fi

# Keep whatever torch/torchvision/torchaudio the venv has (the pins above on a fresh venv, or a
# build the user chose) so that no other requirement can swap them.
constraints="$state_dir/torch-constraints.txt"
write_constraints() {
    "$PY" - >"$constraints" <<'EOF'
from importlib import metadata
for name in ("torch", "torchvision", "torchaudio"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
EOF
}
write_constraints

# ComfyUI lists torchaudio (for its audio nodes; this pack does not need it). torchaudio 2.11 and
# later work with any torch from 2.11 on; pip picks the newest that the constraints allow. Tried
# once per set of torch builds.
torchaudio_tried="$state_dir/torchaudio-tried-$(digest_of "$constraints")"
if ! has_module "$PY" torchaudio && [[ ! -f "$torchaudio_tried" ]]; then
    log "installing the torchaudio that goes with $(grep '^torch==' "$constraints")"
    pip_install "$PY" -c "$constraints" torchaudio || log "torchaudio could not be installed"
    touch "$torchaudio_tried"
    write_constraints
fi
step_done "venv and torch"

primary_requirements="$state_dir/comfyui-v$PRIMARY_VERSION-requirements.txt"
main_reqs=("$REPO/requirements.txt" "$REPO/tests/requirements.txt")
if $have_comfyui && [[ "$VERSION" == "$PRIMARY_VERSION" ]]; then
    comfyui_requirements "$COMFYUI_DIR" >"$primary_requirements"
    main_reqs+=("$primary_requirements")
fi
main_stamp="$state_dir/installed-$(digest_of "$constraints" "${main_reqs[@]}")"
if [[ -f "$main_stamp" ]]; then
    log "requirements already installed in $VENV"
else
    log "installing requirements into $VENV: ${main_reqs[*]#"$REPO"/}"
    pip_args=()
    for file in "${main_reqs[@]}"; do pip_args+=(-r "$file"); done
    pip_install "$PY" -c "$constraints" "${pip_args[@]}"
    touch "$main_stamp"
fi
VENV_PYTHON="$PY"
step_done "requirements"

# --- 3. a layered venv for another ComfyUI version ---------------------------------------------
if $have_comfyui && [[ "$VERSION" != "$PRIMARY_VERSION" ]]; then
    layer="$state_dir/comfyui-v$VERSION"
    site="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
    if [[ ! -x "$layer/bin/python" ]]; then
        log "creating a venv for ComfyUI v$VERSION layered on $VENV"
        "$PY" -m venv --without-pip "$layer"
    fi
    layer_site="$("$layer/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
    # The main venv's packages come after the layer's own, so what the layer holds wins.
    echo "import site; site.addsitedir('$site')" >"$layer_site/chipmunk-main-venv.pth"
    layer_requirements="$layer/comfyui-requirements.txt"
    comfyui_requirements "$COMFYUI_DIR" >"$layer_requirements"
    # Installed stamps of the main venv are part of the digest: when it changes, check again.
    layer_stamp="$layer/installed-$(digest_of "$constraints" "$layer_requirements" \
        <(ls "$state_dir"/installed-*))"
    if [[ -f "$layer_stamp" ]]; then
        log "ComfyUI v$VERSION requirements already installed in $layer"
    else
        log "installing ComfyUI v$VERSION's requirements into $layer (only what the main venv lacks)"
        # pip sees both venvs' packages, installs into the layer, and never removes what lies in
        # the main venv.
        pip_install "$layer/bin/python" -c "$constraints" -r "$layer_requirements"
        rm -f "$layer"/installed-*
        touch "$layer_stamp"
    fi
    VENV_PYTHON="$layer/bin/python"
    step_done "ComfyUI v$VERSION venv layer"
fi

# --- what ComfyUI will say -----------------------------------------------------------------------
if $have_comfyui && ! has_module "$VENV_PYTHON" torchaudio; then
    log "note: torchaudio is not installed (none could be installed for $(grep '^torch==' "$constraints"))."
    log "  ComfyUI will report its audio nodes as IMPORT FAILED and suggest 'pip install -r"
    log "  requirements.txt': this pack does not use audio, so that message can be ignored."
fi

log "ready: ComfyUI $($have_comfyui && echo "v$VERSION at $COMFYUI_DIR" || echo absent); Python $VENV_PYTHON"
printf 'CHIPMUNK_COMFYUI_DIR=%q\nCHIPMUNK_COMFYUI_VERSION=%q\nCHIPMUNK_VENV_PYTHON=%q\n' \
    "$COMFYUI_DIR" "$VERSION" "$VENV_PYTHON" >&3
