#!/usr/bin/env bash
# Prepare the environment (tools/setup_env.sh), then run pytest over tests/ in the project venv.
# Extra arguments go to pytest; when none of them names a test path, tests/ is used.
#   tools/test.sh                 # everything
#   tools/test.sh -k flux -x      # a subset
#   tools/test.sh tests/test_comfyui_pack.py::test_dense_flux_workflow_runs_through_stock_loader
# The exit code is pytest's.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CHIPMUNK_VENV:-$REPO/.venv}"

bash "$REPO/tools/setup_env.sh"

cd "$REPO"
names_path=false
for arg in "$@"; do
    if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then names_path=true; fi
done
if $names_path; then
    exec "$VENV/bin/python" -m pytest "$@"
fi
exec "$VENV/bin/python" -m pytest tests "$@"
