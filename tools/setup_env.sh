#!/usr/bin/env bash
# Prepare everything the launcher and the tests need, and nothing more; safe to run again.
#
#   1. a Python venv            ${CHIPMUNK_VENV:-<repo>/.venv}
#   2. torch + torchvision      pinned per CPU architecture, only when torch is not importable
#   3. a real ComfyUI checkout  ${CHIPMUNK_COMFYUI_DIR:-$HOME/.cache/comfyui-chipmunk/ComfyUI},
#                               pinned to v0.3.64 (cloned when absent and the network allows)
#   4. ComfyUI's requirements (without torch*, whose installed versions are kept as a constraint),
#      the pack's requirements.txt and tests/requirements.txt
#
# Step 4 is skipped when a stamp in the venv says the same requirement files were installed.
# When no ComfyUI checkout can be had, the script still succeeds: the tests that need ComfyUI
# then skip and say how to provide one.
#
# Environment:
#   CHIPMUNK_VENV          venv location
#   CHIPMUNK_COMFYUI_DIR   ComfyUI checkout location
#   CHIPMUNK_COMFYUI_URL   where to clone ComfyUI from (default: the public GitHub repository)
#   CHIPMUNK_PYTHON        interpreter that creates the venv (default: python3)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CHIPMUNK_VENV:-$REPO/.venv}"
COMFYUI_DIR="${CHIPMUNK_COMFYUI_DIR:-$HOME/.cache/comfyui-chipmunk/ComfyUI}"
COMFYUI_URL="${CHIPMUNK_COMFYUI_URL:-https://github.com/Comfy-Org/ComfyUI}"
COMFYUI_COMMIT="a125cd84b054a57729b5eecab930ca9408719832"  # v0.3.64
PYTHON="${CHIPMUNK_PYTHON:-python3}"

case "$(uname -m)" in
    aarch64 | arm64) TORCH_PINS=("torch==2.9.1" "torchvision==0.24.1") ;;
    *)               TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1") ;;
esac

log() { printf '[setup_env] %s\n' "$*" >&2; }

# --- 1. venv -----------------------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv at $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# Some pip set-ups warn once per missing index folder ("WARNING: Location ... is ignored"):
# noise, filtered out; everything else pip says is kept.
pip_install() {
    "$PY" -m pip install --disable-pip-version-check --no-input --quiet "$@" \
        2> >(grep -v '^WARNING: Location .* is ignored' >&2)
}

# --- 2. torch ----------------------------------------------------------------------------------
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    log "installing ${TORCH_PINS[*]}"
    pip_install "${TORCH_PINS[@]}"
fi

# --- 3. ComfyUI checkout -----------------------------------------------------------------------
comfyui_present() { [[ -f "$COMFYUI_DIR/main.py" && -f "$COMFYUI_DIR/requirements.txt" ]]; }

if ! comfyui_present; then
    log "no ComfyUI at $COMFYUI_DIR; cloning $COMFYUI_URL"
    mkdir -p "$(dirname "$COMFYUI_DIR")"
    tmp_clone="$COMFYUI_DIR.partial.$$"
    if GIT_TERMINAL_PROMPT=0 git clone --quiet "$COMFYUI_URL" "$tmp_clone" </dev/null \
        && git -C "$tmp_clone" -c advice.detachedHead=false checkout --quiet "$COMFYUI_COMMIT"; then
        mv "$tmp_clone" "$COMFYUI_DIR"
    else
        rm -rf "$tmp_clone"
        cat >&2 <<EOF
[setup_env] WARNING: could not clone ComfyUI. Provide a checkout of ComfyUI v0.3.64
[setup_env]   (commit $COMFYUI_COMMIT) in one of these ways, then run this script again:
[setup_env]     git clone https://github.com/Comfy-Org/ComfyUI "$COMFYUI_DIR"
[setup_env]     git -C "$COMFYUI_DIR" checkout $COMFYUI_COMMIT
[setup_env]   or point CHIPMUNK_COMFYUI_DIR at an existing checkout,
[setup_env]   or set CHIPMUNK_COMFYUI_URL to a reachable clone source.
[setup_env] Until then the tests that need ComfyUI are skipped and tools/start.sh cannot run.
EOF
    fi
fi

if comfyui_present && [[ -d "$COMFYUI_DIR/.git" ]]; then
    head="$(git -C "$COMFYUI_DIR" rev-parse HEAD 2>/dev/null || echo unknown)"
    if [[ "$head" != "$COMFYUI_COMMIT" ]]; then
        log "note: ComfyUI at $COMFYUI_DIR is at $head, not the tested $COMFYUI_COMMIT (v0.3.64)"
    fi
fi

# --- 4. requirements ---------------------------------------------------------------------------
state_dir="$VENV/.chipmunk"
mkdir -p "$state_dir"
constraints="$state_dir/torch-constraints.txt"
comfyui_reqs="$state_dir/comfyui-requirements.txt"

# Keep whatever torch/torchvision/torchaudio the venv has (the pins above on a fresh venv, or a
# build the user chose) so that no other requirement can swap them.
"$PY" - >"$constraints" <<'EOF'
from importlib import metadata
for name in ("torch", "torchvision", "torchaudio"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
EOF

req_args=(-r "$REPO/requirements.txt" -r "$REPO/tests/requirements.txt")
if comfyui_present; then
    grep -Ev '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;].*)?$' \
        "$COMFYUI_DIR/requirements.txt" >"$comfyui_reqs"
    req_args+=(-r "$comfyui_reqs")
else
    : >"$comfyui_reqs"
fi

stamp="$state_dir/requirements.stamp"
digest="$(cat "$constraints" "$comfyui_reqs" "$REPO/requirements.txt" "$REPO/tests/requirements.txt" \
    | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$digest" ]]; then
    log "requirements already installed (stamp matches)"
else
    log "installing requirements"
    pip_install -c "$constraints" "${req_args[@]}"
    echo "$digest" >"$stamp"
fi

log "ready: venv $VENV; ComfyUI $(comfyui_present && echo "$COMFYUI_DIR" || echo 'absent')"
