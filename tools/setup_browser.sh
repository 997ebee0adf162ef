#!/usr/bin/env bash
# Make sure a headless-capable Chromium is installed for the browser tests (tests/browser/).
#
# The tests drive the browser through its DevTools protocol with aiohttp (already a ComfyUI
# requirement), so no Python package is added here, and no tool ever downloads a browser of its
# own: the browser is Debian's `chromium` package.
#
# Order of attempts, quickest first; each is skipped once a browser answers:
#   1. a browser already installed ($CHIPMUNK_CHROMIUM, else chromium / chromium-browser on PATH);
#   2. `apt-get install chromium` (works offline too when the candidate version is in apt's cache);
#   3. the newest chromium + chromium-common .deb pair in /var/cache/apt/archives (offline);
#   4. `apt-get update`, then 2 again (stale package lists).
# Exit code 0 and the browser's path on stdout's last line, or 1 with the reason on stderr.
set -uo pipefail

ARCHIVES=/var/cache/apt/archives

log() { echo "setup_browser: $*" >&2; }

find_browser() {
    local candidate
    for candidate in "${CHIPMUNK_CHROMIUM:-}" "$(command -v chromium || true)" \
                     "$(command -v chromium-browser || true)"; do
        [[ -n "$candidate" && -x "$candidate" ]] || continue
        if "$candidate" --headless --no-sandbox --disable-gpu --version >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        log "not root and no password-less sudo: cannot run $*"
        return 1
    fi
}

apt_install() {
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@" </dev/null >&2
}

install_from_cache() {
    local deb version common
    deb=$(ls "$ARCHIVES"/chromium_*.deb 2>/dev/null | sort -V | tail -1)
    [[ -n "$deb" ]] || { log "no chromium .deb in $ARCHIVES"; return 1; }
    version=${deb#"$ARCHIVES"/chromium_}
    common="$ARCHIVES/chromium-common_$version"
    [[ -f "$common" ]] || { log "$deb has no matching $common"; return 1; }
    log "installing $(basename "$deb") from apt's cache"
    apt_install "$deb" "$common"
}

if browser=$(find_browser); then
    log "found $browser ($("$browser" --version 2>/dev/null))"
    echo "$browser"
    exit 0
fi

if ! command -v apt-get >/dev/null; then
    log "no Chromium found and no apt-get to install one: install Chromium and set CHIPMUNK_CHROMIUM to its binary"
    exit 1
fi

log "installing Debian's chromium"
apt_install chromium || install_from_cache || { as_root apt-get update -q >&2 && apt_install chromium; }

if browser=$(find_browser); then
    log "installed $browser ($("$browser" --version 2>/dev/null))"
    echo "$browser"
    exit 0
fi
log "could not install Chromium (apt-get install chromium failed, and $ARCHIVES has no usable .deb pair): install it by hand, or set CHIPMUNK_CHROMIUM to a Chromium binary"
exit 1
