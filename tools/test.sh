#!/usr/bin/env bash
# Prepare the environment (tools/setup_env.sh; then tools/setup_browser.sh, where it exists, for the
# browser tests), then run pytest over tests/ against the ComfyUI the set-up prepared.
# Extra arguments go to pytest; when none of them names a test path, tests/ is used.
#   tools/test.sh                 # everything, against ComfyUI v0.19.3
#   tools/test.sh -k flux -x      # a subset
#   tools/test.sh tests/test_comfyui_pack.py::test_dense_flux_workflow_runs_through_stock_loader
#   CHIPMUNK_COMFYUI_VERSION=0.3.64 tools/test.sh -m comfyui   # the ComfyUI tests on v0.3.64
# The environment variables of setup_env.sh apply. The exit code is pytest's.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

setup="$(bash "$REPO/tools/setup_env.sh")"
eval "$setup"
export CHIPMUNK_COMFYUI_DIR CHIPMUNK_COMFYUI_VERSION CHIPMUNK_VENV_PYTHON

# Browser tests: tools/setup_browser.sh installs the browser they drive (their Python packages
# belong in tests/requirements.txt, which setup_env.sh installs).
if [[ -f "$REPO/tools/setup_browser.sh" ]]; then
    bash "$REPO/tools/setup_browser.sh"
fi

cd "$REPO"
names_path=false
for arg in "$@"; do
    if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then names_path=true; fi
done
if $names_path; then
    exec "$CHIPMUNK_VENV_PYTHON" -m pytest "$@"
fi
exec "$CHIPMUNK_VENV_PYTHON" -m pytest tests "$@"
