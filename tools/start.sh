#!/usr/bin/env bash
# Start a real ComfyUI with this pack loaded straight from the working tree (nothing is copied).
#
#   tools/start.sh [--checkpoint FILE | --models DIR] [--port N] [--listen ADDR] [COMFYUI ARGS...]
#
# Runs tools/setup_env.sh first, then ComfyUI's main.py from the checkout it prepared. The pack is
# linked from <repo>/.run/custom_nodes and loaded through <repo>/.run/extra_model_paths.yaml.
#
# Models: the pack's own small trained toy models (lab/models: a toy FLUX, a toy WAN2.1 and their
# autoencoders) are always there, and the template browser (Templates -> ComfyUI-Chipmunk) offers
# the toy workflows that render pictures with them, Chipmunk on and off side by side. Your models:
#   --checkpoint FILE (or CHIPMUNK_CHECKPOINT)  FILE's folder is added to diffusion_models;
#   --models DIR (or CHIPMUNK_MODELS_DIR)       a ComfyUI-style models folder (diffusion_models/,
#                                               text_encoders/, vae/, ...) is added.
# Environment: CHIPMUNK_PORT (8188), CHIPMUNK_LISTEN (127.0.0.1), and those of setup_env.sh
# (CHIPMUNK_COMFYUI_ARCHIVE where GitHub cannot be reached, CHIPMUNK_COMFYUI_DIR, CHIPMUNK_VENV,
# CHIPMUNK_TORCH_BUILD). Without CUDA, ComfyUI runs with --cpu. Outputs go to <ComfyUI>/output
# (by default ~/.cache/comfyui-chipmunk/ComfyUI-v0.19.3/output).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${CHIPMUNK_PORT:-8188}"
LISTEN="${CHIPMUNK_LISTEN:-127.0.0.1}"
CHECKPOINT="${CHIPMUNK_CHECKPOINT:-}"
MODELS_DIR="${CHIPMUNK_MODELS_DIR:-}"
PACK_NAME="ComfyUI-Chipmunk"

comfy_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --checkpoint) CHECKPOINT="$2"; shift 2 ;;
        --models)     MODELS_DIR="$2"; shift 2 ;;
        --port)       PORT="$2"; shift 2 ;;
        --listen)     LISTEN="$2"; shift 2 ;;
        -h | --help)  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *)            comfy_args+=("$1"); shift ;;
    esac
done

# KEY=value lines: where ComfyUI is, which Python. Without a ComfyUI there is nothing to start, so
# the set-up stops before it installs anything.
if ! setup="$(CHIPMUNK_REQUIRE_COMFYUI=1 bash "$REPO/tools/setup_env.sh")"; then
    cat >&2 <<EOF
[start] could not set up ComfyUI (the lines above say why). Where this machine cannot reach GitHub,
[start] give it a ComfyUI v0.19.3 source archive (a .tar.gz whose top folder is ComfyUI/):
[start]   CHIPMUNK_COMFYUI_ARCHIVE=/path/to/comfyui-v0.19.3.tar.gz bash tools/start.sh
[start] or an existing ComfyUI tree: CHIPMUNK_COMFYUI_DIR=/path/to/ComfyUI bash tools/start.sh
EOF
    exit 1
fi
eval "$setup"
PY="$CHIPMUNK_VENV_PYTHON"
COMFYUI_DIR="$CHIPMUNK_COMFYUI_DIR"

run_dir="$REPO/.run"
custom_nodes="$run_dir/custom_nodes"
mkdir -p "$custom_nodes"
rm -f "$custom_nodes/chipmunk_dev_nodes"  # test-only nodes, linked by older versions of this script
ln -sfn "$REPO" "$custom_nodes/$PACK_NAME"

diffusion_models=()
if [[ -n "$CHECKPOINT" ]]; then
    [[ -f "$CHECKPOINT" ]] || { echo "[start] checkpoint not found: $CHECKPOINT" >&2; exit 1; }
    diffusion_models+=("$(cd "$(dirname "$CHECKPOINT")" && pwd)")
    echo "[start] model: $(basename "$CHECKPOINT") (choose it in Load Diffusion Model)" >&2
fi
if [[ -n "$MODELS_DIR" ]]; then
    [[ -d "$MODELS_DIR" ]] || { echo "[start] models folder not found: $MODELS_DIR" >&2; exit 1; }
    MODELS_DIR="$(cd "$MODELS_DIR" && pwd)"
fi
if [[ -z "$CHECKPOINT" && -z "$MODELS_DIR" ]]; then
    echo "[start] no checkpoint given: open Templates -> ComfyUI-Chipmunk -> a toy workflow (the pack's toy models)" >&2
fi

config="$run_dir/extra_model_paths.yaml"
{
    echo "chipmunk_dev:"
    echo "  custom_nodes: |"
    echo "    $custom_nodes"
    if [[ ${#diffusion_models[@]} -gt 0 ]]; then
        echo "  diffusion_models: |"
        printf '    %s\n' "${diffusion_models[@]}"
    fi
    if [[ -n "$MODELS_DIR" ]]; then
        echo "chipmunk_models:"
        echo "  base_path: $MODELS_DIR"
        for kind in checkpoints diffusion_models text_encoders clip clip_vision vae loras; do
            echo "  $kind: $kind"
        done
    fi
} >"$config"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    comfy_args=(--cpu "${comfy_args[@]}")
fi

echo "[start] ComfyUI $COMFYUI_DIR on http://$LISTEN:$PORT with $PACK_NAME from $REPO" >&2
echo "[start] pictures and videos are saved in $COMFYUI_DIR/output" >&2
cd "$COMFYUI_DIR"
exec "$PY" main.py --listen "$LISTEN" --port "$PORT" --disable-api-nodes \
    --extra-model-paths-config "$config" "${comfy_args[@]}"
