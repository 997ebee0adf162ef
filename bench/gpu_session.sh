#!/usr/bin/env bash
# One device call on a machine of several GPUs: every measurement of a session that fits one
# 10-minute command, each job on its own GPU with its own time limit. Run from the repository root
# with the carried folder .device/ (the ComfyUI source archive, the toy sprites, wheels in whl/):
#
#   bash bench/gpu_session.sh train     # GPUs 0-2: the toy models (lab/train.py); GPU 3: a preflight
#                                       # of the kernels and two end-to-end runs inside ComfyUI
#   bash bench/gpu_session.sh preflight # one GPU: short end-to-end runs that check the scripts
#   bash bench/gpu_session.sh final     # GPUs 0-3: the end-to-end tables of the README
#   bash bench/gpu_session.sh fill      # one GPU: the FLUX rows the final run had no time for
#   bash bench/gpu_session.sh graphs    # one GPU: FLUX with and without CUDA graphs of the sparse steps
#   bash bench/gpu_session.sh users     # one GPU: FLUX as v0.19.3 installs it (comfy-kitchen), with
#                                       # static and with dynamic VRAM (main.py's default on NVIDIA),
#                                       # and the kernels that take each run's GPU time
#   bash bench/gpu_session.sh host      # one GPU: FLUX per-step times, and what the host's waits cost
#   bash bench/gpu_session.sh clock     # one GPU: FLUX (static, dynamic VRAM) and WAN2.1-1.3B after the step clock
#   bash bench/gpu_session.sh latest    # one GPU: the README's FLUX tables (static and dynamic VRAM)
#   bash bench/gpu_session.sh wan_lists # one GPU: WAN2.1-1.3B with the key lists kept from the warm-up
#   bash bench/gpu_session.sh fused     # one GPU: the single blocks' one-pass per-token kernels (FLUX)
#   bash bench/gpu_session.sh flux_final # one GPU: FLUX static and dynamic VRAM after the double blocks' kernels
#   bash bench/gpu_session.sh flux_check # one GPU: FLUX 1024x1024 stock and Chipmunk, static VRAM
#   bash bench/gpu_session.sh kernels2048 # one GPU: the kernels at FLUX 2048x2048, and a profiled run there
#   bash bench/gpu_session.sh mlp2048   # one GPU: the sparse MLP in bands of row tiles, and FLUX 2048x2048 with it
#   bash bench/gpu_session.sh flux_table # one GPU: the README's FLUX tables (dynamic VRAM), other sizes, batch 2
#   bash bench/gpu_session.sh flux_table_best2 # one GPU: the three target sizes, fastest of two runs
#   bash bench/gpu_session.sh flux_static_best2 # one GPU: FLUX 1024x1024 static VRAM, fastest of two runs, busy
#   bash bench/gpu_session.sh flux_1024_check # one GPU: FLUX 1024x1024 static (kernel times) and dynamic (best of 2)
#   bash bench/gpu_session.sh budgets   # one GPU: FLUX 1024x1024 20 steps at memory budgets, bf16 and fp8 weights
#   bash bench/gpu_session.sh budgets2  # one GPU: FLUX bf16 at 48/32/12 GiB, WAN2.1-1.3B's template at all and 8 GiB
#   bash bench/gpu_session.sh check     # one GPU: tests/gpu, FLUX under EasyCache, WAN2.1-1.3B at 8 GiB
#   bash bench/gpu_session.sh final_check # one GPU: tests/gpu and the corners of the budget table again
#   bash bench/gpu_session.sh gpu_suite # one GPU: tests/gpu alone
#   bash bench/gpu_session.sh scratch   # one GPU: fc2 transposed per step (kernel, suite, FLUX against copies)
#   bash bench/gpu_session.sh suite_corners # one GPU: tests/gpu, FLUX fp8 at 24 GiB, WAN2.1-1.3B at 8 GiB
#   bash bench/gpu_session.sh lists     # one GPU: int16 key lists (kernels at real shapes, tests/gpu),
#                                       # WAN2.1-1.3B's template at 8 GiB, and under core EasyCache
#   bash bench/gpu_session.sh fp8       # one GPU: fp8 attention caches (WAN2.1-1.3B at 8 GiB, FLUX all memory)
#   bash bench/gpu_session.sh validate  # one GPU: tests/gpu, FLUX with fp8 caches, WAN2.1-1.3B's template
#                                       # whole and estimated from its first steps (--timed-steps)
#   bash bench/gpu_session.sh wan14b_720 # one GPU: WAN2.1-14B 720p 81 frames, template settings, all memory,
#                                       # estimated from each variant's first steps
#   bash bench/gpu_session.sh wan14b_480 # one GPU: WAN2.1-14B fp8 weights 480p at 24 GiB (estimated), and
#                                       # FLUX's eager sparse steps under dynamic VRAM
#   bash bench/gpu_session.sh flux_eager # one GPU: FLUX's sparse steps eager against graphed, dynamic VRAM
#   bash bench/gpu_session.sh fold      # one GPU: tests/gpu, FLUX with the single blocks' attention deltas folded
#                                       # into their MLP output caches (bf16 and fp8 caches, graphed and eager;
#                                       # 512 text tokens, then 256 as ComfyUI pads the template's prompt)
#   bash bench/gpu_session.sh fold_rows # one GPU: fold's FLUX rows alone (no GPU suite)
#   bash bench/gpu_session.sh hunyuan   # one GPU: HunyuanVideo 720p, 49 frames, stock and Chipmunk + step cache
#   bash bench/gpu_session.sh retrain   # one GPU: both toy DiTs train on from lab/models
#                                       # (lab/train.py --resume; autoencoders, classifier kept)
#
# whl/ is filled on a machine with network (the device machines have none), for the device's Python:
# (manylinux_2_17 too: without it pip takes comfy-aimdo's pure-Python wheel, which has no native
# library, and dynamic VRAM never starts)
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_17_x86_64 \
#       -d .device/whl comfy-kitchen==0.2.8 comfy-aimdo torchsde trampoline
# (comfy-kitchen 0.2.8 is the version ComfyUI v0.19.3 names; newer ones carry a ROCm build past the
# carry limit.)
#
# Results go to $OUT (at most 8 files come back: the measurements are packed into one archive).
set -uo pipefail
mode="${1:?train or final}"
OUT="${OUT:?set by the device tool}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .device/whl/*.whl && export PYTHONPATH=/tmp/site  # whl/ holds comfy-kitchen and comfy-aimdo
# (requirements of ComfyUI v0.19.3): runs without them measure a ComfyUI its users do not have
mkdir -p /tmp/cf && tar xzf .device/comfyui-v0.19.3.tar.gz -C /tmp/cf
COMFY=/tmp/cf/ComfyUI
R=/tmp/results && mkdir -p "$R"
export PYTHONUNBUFFERED=1
nvidia-smi -L

job() {  # job GPU SECONDS NAME COMMAND...: one measurement, its log in $R/NAME.log
    local gpu=$1 seconds=$2 name=$3; shift 3
    CUDA_VISIBLE_DEVICES=$gpu timeout "$seconds" "$@" >"$R/$name.log" 2>&1
    echo "[$name] exit $? after $SECONDS s" | tee -a "$R/$name.log"
    tar czf "$OUT/measurements.tar.gz" -C "$R" .  # what is done comes back even if the call is cut short
}
E2E=(python3 bench/e2e_comfy.py --comfyui "$COMFY")
# Modes that pack several jobs into one call give each job at most what is left of TOTAL seconds
# (default 575): `t=$(within 90) && job 0 "$t" ...` skips a job once less than 30 s remain.
total=${TOTAL:-575}
within() { local want=$1 left=$((total - SECONDS)); [ "$left" -gt 30 ] && echo $((left < want ? left : want)); }

case "$mode" in
train)
    python3 -m lab.train --comfyui .device/comfyui-v0.19.3.tar.gz --data .device/toy_sprites.npz --gpus 0,1,2 \
        --budget 470 --out "$OUT" >"$OUT/train_stdout.txt" 2>&1 &
    (
        job 3 110 flux_layer python3 bench/flux_layer.py --json "$R/flux_layer.json"
        job 3 80 gpu_parity python3 bench/gpu_parity.py
        job 3 170 e2e_flux "${E2E[@]}" --case flux --sizes 1024x1024 --variants "stock,chipmunk,chipmunk+cache,sparsity 0" \
            --busy --out "$R/e2e_flux.json"
        job 3 150 e2e_wan "${E2E[@]}" --case wan13b --sizes 832x480x81 --variants "stock,chipmunk,chipmunk+cache" \
            --out "$R/e2e_wan.json"
    ) &
    ;;
preflight)
    job 0 150 e2e_flux "${E2E[@]}" --case flux --sizes 1024x1024 --steps 20 \
        --variants "stock,chipmunk,chipmunk+cache,sparsity 0" --busy --out "$R/e2e_flux.json"
    job 0 100 e2e_wan "${E2E[@]}" --case wan13b --sizes 832x480x81 --steps 20 \
        --variants "stock,chipmunk,chipmunk+cache" --out "$R/e2e_wan.json"
    job 0 60 e2e_hunyuan "${E2E[@]}" --case hunyuan --sizes 1280x720x9 --steps 12 \
        --variants "stock,chipmunk,chipmunk+cache" --out "$R/e2e_hunyuan.json"
    ;;
final)
    (
        job 0 560 flux_a "${E2E[@]}" --case flux --sizes 1024x1024,1280x768,512x512,768x768 \
            --variants "stock,chipmunk,chipmunk+cache,attention only,keep lists,keep lists+cache,sparsity 0" --busy \
            --out "$R/e2e_flux_a.json"
    ) &
    (
        job 1 340 flux_b "${E2E[@]}" --case flux --sizes 1536x1536,2048x2048 --variants "stock,chipmunk,chipmunk+cache" \
            --busy --out "$R/e2e_flux_b.json"
        job 1 200 flux_batch "${E2E[@]}" --case flux --sizes 1024x1024 --batch 2 --variants "stock,chipmunk,chipmunk+cache" \
            --out "$R/e2e_flux_batch2.json"
    ) &
    (
        job 2 200 wan13b "${E2E[@]}" --case wan13b --sizes 832x480x81 --variants "stock,chipmunk,chipmunk+cache" \
            --busy --out "$R/e2e_wan13b.json"
        job 2 350 wan14b "${E2E[@]}" --case wan14b --sizes 832x480x81 --steps 20 --variants "stock,chipmunk,chipmunk+cache" \
            --out "$R/e2e_wan14b.json"
    ) &
    (
        job 3 560 hunyuan "${E2E[@]}" --case hunyuan --sizes "${HUNYUAN_SIZE:-1280x720x33}" \
            --variants "stock,chipmunk,chipmunk+cache" --out "$R/e2e_hunyuan.json"
    ) &
    ;;
fill)
    job 0 190 flux_2048 "${E2E[@]}" --case flux --sizes 2048x2048 --steps 20 --warmup-steps 2 \
        --variants "stock,chipmunk,chipmunk+cache" --out "$R/e2e_flux_2048.json"
    job 0 90 flux_small "${E2E[@]}" --case flux --sizes 512x512,768x768 \
        --variants "stock,chipmunk+cache" --out "$R/e2e_flux_small.json"
    ;;
graphs)
    # 12 warm-up steps: both MLP-ranking patterns and a dense refresh (Triton autotunes them all
    # before the timed run, which a 3-step warm-up left to the first Chipmunk variant).
    job 0 200 flux_1024 "${E2E[@]}" --case flux --sizes 1024x1024 --warmup-steps 12 --busy \
        --variants "stock,chipmunk eager,chipmunk,chipmunk+cache eager,chipmunk+cache" --out "$R/e2e_flux_1024.json"
    job 0 170 flux_2048 "${E2E[@]}" --case flux --sizes 2048x2048 --steps 20 --warmup-steps 12 \
        --variants "stock,chipmunk eager,chipmunk,chipmunk+cache" --out "$R/e2e_flux_2048.json"
    job 0 110 flux_small "${E2E[@]}" --case flux --sizes 1280x768 --warmup-steps 12 \
        --variants "stock,chipmunk any size eager,chipmunk any size,chipmunk+cache any size" --out "$R/e2e_flux_small.json"
    ;;
users)
    job 0 280 flux_kitchen "${E2E[@]}" --case flux --sizes 1024x1024 --warmup-steps 12 --busy --kernels 30 \
        --variants "stock,chipmunk,chipmunk+cache,keep lists,keep lists+cache" --out "$R/e2e_flux_kitchen.json"
    job 0 280 flux_dynamic "${E2E[@]}" --case flux --sizes 1024x1024 --warmup-steps 12 --busy --kernels 30 \
        --dynamic-vram --variants "stock,chipmunk,chipmunk+cache" --out "$R/e2e_flux_dynamic.json"
    ;;
dynamic)
    # Dynamic VRAM (main.py's default on NVIDIA with comfy-aimdo): graphs of the sparse steps
    # against the eager path, then the same at 1280x768.
    job 0 300 flux_dynamic "${E2E[@]}" --case flux --sizes 1024x1024 --warmup-steps 12 --busy --dynamic-vram \
        --variants "stock,chipmunk,chipmunk eager,chipmunk+cache" --out "$R/e2e_flux_dynamic_graphs.json"
    job 0 200 flux_dynamic_sizes "${E2E[@]}" --case flux --sizes 1280x768 --warmup-steps 12 --dynamic-vram \
        --variants "stock,chipmunk,chipmunk eager" --out "$R/e2e_flux_dynamic_sizes.json"
    ;;
dynamic_rest)
    # The rest of the README's table under dynamic VRAM: 1280x768,
    # 2048x2048, and WAN2.1-1.3B at 20 steps (video: GPU-bound, checks that the default set-up works).
    job 0 300 flux_dynamic_sizes "${E2E[@]}" --case flux --sizes 1280x768,2048x2048 --warmup-steps 12 --dynamic-vram \
        --variants "stock,chipmunk,chipmunk+cache" --out "$R/e2e_flux_dynamic_sizes.json"
    job 0 150 wan_dynamic "${E2E[@]}" --case wan13b --sizes 832x480x81 --steps 20 --dynamic-vram \
        --variants "stock,chipmunk,chipmunk+cache" --out "$R/e2e_wan13b_dynamic.json"
    ;;
dynamic_cache)
    job 0 280 flux_dynamic_cache "${E2E[@]}" --case flux --sizes 1280x768,2048x2048 --warmup-steps 12 --dynamic-vram \
        --variants "stock,chipmunk+cache" --out "$R/e2e_flux_dynamic_cache.json"
    ;;
dynamic_small)
    job 0 200 flux_dynamic_small "${E2E[@]}" --case flux --sizes 768x768,1536x1536 --warmup-steps 12 --dynamic-vram \
        --variants "stock,chipmunk" --out "$R/e2e_flux_dynamic_small.json"
    ;;
host)
    # Where a step waits on the host: per-step times on the GPU's timeline, stock with the conditioning
    # kept on the GPU, and the step lookup probe (counted per call, no wait for sigma).
    job 0 290 flux_host "${E2E[@]}" --case flux --sizes 1024x1024 --warmup-steps 12 --busy --step-times \
        --variants "stock,stock resident,chipmunk,chipmunk counted,chipmunk+cache,chipmunk+cache counted" \
        --out "$R/e2e_flux_host.json"
    job 0 270 flux_host_dynamic "${E2E[@]}" --case flux --sizes 1024x1024 --warmup-steps 12 --busy --step-times \
        --dynamic-vram --variants "stock,stock resident,chipmunk,chipmunk counted,chipmunk+cache,chipmunk+cache counted" \
        --out "$R/e2e_flux_host_dynamic.json"
    ;;
clock)
    # After the step clock and the resident conditioning: FLUX at three sizes with static and dynamic
    # VRAM (per-step times at 1024x1024), and WAN2.1-1.3B at 50 steps.
    job 0 200 flux_static "${E2E[@]}" --case flux --sizes 1024x1024 --warmup-steps 12 --busy --step-times \
        --variants "stock,stock resident,chipmunk,chipmunk+cache,keep lists+cache" --out "$R/e2e_flux_clock.json"
    job 0 200 flux_dynamic "${E2E[@]}" --case flux --sizes 1024x1024,1280x768 --warmup-steps 12 --dynamic-vram \
        --step-times --variants "stock,stock resident,chipmunk,chipmunk+cache,keep lists+cache" \
        --out "$R/e2e_flux_clock_dynamic.json"
    job 0 190 wan13b "${E2E[@]}" --case wan13b --sizes 832x480x81 --variants "stock,chipmunk,chipmunk+cache" \
        --dynamic-vram --out "$R/e2e_wan13b_clock_dynamic.json"
    ;;
latest)
    # The README's FLUX tables: static VRAM with the per-step times and kernels, and as main.py runs
    # v0.19.3 (dynamic VRAM) at three sizes, with the node at sparsity 0.
    job 0 230 flux_static "${E2E[@]}" --case flux --sizes 1024x1024 --warmup-steps 12 --busy --step-times --kernels 25 \
        --variants "stock,chipmunk,chipmunk eager,chipmunk+cache,${EXTRA_VARIANTS:-keep lists,keep lists+cache}" \
        --out "$R/e2e_flux_latest.json"
    job 0 330 flux_dynamic "${E2E[@]}" --case flux --sizes 1024x1024,1280x768,2048x2048 --warmup-steps 12 \
        --dynamic-vram --variants "stock,chipmunk,chipmunk+cache,sparsity 0" --out "$R/e2e_flux_latest_dynamic.json"
    ;;
wan_lists)
    # WAN2.1-1.3B, 50 steps, dynamic VRAM: key lists kept from the warm-up on the later dense steps.
    job 0 240 wan13b "${E2E[@]}" --case wan13b --sizes 832x480x81 --dynamic-vram \
        --variants "stock,chipmunk,chipmunk+cache,keep lists,keep lists+cache" --out "$R/e2e_wan13b_lists_dynamic.json"
    ;;
fused)
    # The single blocks' per-token work in one-pass kernels: the kernels against ComfyUI's operations
    # at FLUX's shape, then FLUX 1024x1024 (static VRAM) with and without them.
    job 0 90 block_ops python3 bench/block_ops.py --comfyui "$COMFY" --json "$R/block_ops.json"
    job 0 300 flux_static "${E2E[@]}" --case flux --sizes 1024x1024 --warmup-steps 12 --busy --step-times --kernels 25 \
        --variants "stock,chipmunk,chipmunk unfused,chipmunk+cache,chipmunk+cache unfused" \
        --out "$R/e2e_flux_fused.json"
    ;;
flux_final)
    # FLUX after the double blocks' one-pass per-token kernels: static VRAM (per-step times, kernels,
    # and without the one-pass kernels), then as main.py runs v0.19.3 (dynamic VRAM) at three sizes.
    job 0 200 flux_static "${E2E[@]}" --case flux --sizes 1024x1024 --warmup-steps 12 --busy --step-times --kernels 25 \
        --variants "stock,chipmunk,chipmunk+cache,chipmunk unfused" --out "$R/e2e_flux_final.json"
    job 0 280 flux_dynamic "${E2E[@]}" --case flux --sizes 1024x1024,1280x768,2048x2048 --warmup-steps 12 \
        --dynamic-vram --variants "stock,chipmunk,chipmunk+cache" --out "$R/e2e_flux_final_dynamic.json"
    ;;
flux_check)
    # A short check of the final code: FLUX 1024x1024, static VRAM, stock and Chipmunk (the report
    # says whether every self-check passed).
    job 0 200 flux_check "${E2E[@]}" --case flux --sizes 1024x1024 --warmup-steps 12 \
        --variants "stock,chipmunk" --out "$R/e2e_flux_check.json"
    ;;
kernels2048)
    # FLUX 2048x2048: the sparse attention and MLP kernels at that shape (configuration sweeps), and
    # where a Chipmunk run's GPU time goes there.
    job 0 330 kernels python3 bench/kernels.py --ops sparse,mlp --shapes flux2048,flux --group-sizes 192,128,256 \
        --sweep --json "$R/kernels_flux2048.json"
    job 0 240 flux_2048 "${E2E[@]}" --case flux --sizes 2048x2048 --warmup-steps 12 --busy --kernels 30 \
        --variants "chipmunk" --out "$R/e2e_flux_2048_kernels.json"
    ;;
mlp2048)
    # The sparse MLP's programs in bands of row tiles (so that a band's inputs stay in L2): the
    # sweep at FLUX 1024x1024 and 2048x2048, then FLUX 2048x2048 end to end (dynamic VRAM) with
    # the defaults and with the sweep's fastest up / down configurations at 2048x2048.
    job 0 220 kernels python3 bench/kernels.py --ops mlp --shapes flux2048,flux --sweep --json "$R/kernels_mlp_bands.json"
    CHIPMUNK_BENCH_MLP=$(python3 bench/bench_utils.py best-mlp "$R/kernels_mlp_bands.json" flux2048) && export CHIPMUNK_BENCH_MLP
    echo "fastest at 2048x2048: $CHIPMUNK_BENCH_MLP" | tee "$R/best_mlp.txt"
    job 0 340 flux_2048 "${E2E[@]}" --case flux --sizes 2048x2048 --warmup-steps 12 --dynamic-vram \
        --variants "stock,chipmunk,chipmunk mlp" --out "$R/e2e_flux_2048_mlp_dynamic.json"
    ;;
flux_table)
    # The README's FLUX tables as main.py runs v0.19.3 (dynamic VRAM): the three target sizes with
    # and without the step cache, the other listed sizes, and batch 2.
    job 0 330 flux_dynamic "${E2E[@]}" --case flux --sizes 1024x1024,1280x768,2048x2048 --warmup-steps 12 \
        --dynamic-vram --variants "stock,chipmunk,chipmunk+cache" --out "$R/e2e_flux_table_dynamic.json"
    job 0 130 flux_sizes "${E2E[@]}" --case flux --sizes 512x512,768x768,1536x1536 --warmup-steps 12 \
        --dynamic-vram --variants "stock,chipmunk" --out "$R/e2e_flux_sizes_dynamic.json"
    job 0 110 flux_batch2 "${E2E[@]}" --case flux --sizes 1024x1024 --batch 2 --warmup-steps 12 \
        --dynamic-vram --variants "stock,chipmunk" --out "$R/e2e_flux_batch2_dynamic.json"
    ;;
flux_table_best2)
    # The three target sizes again, the fastest of two timed runs per variant (as the issue's own
    # table was measured).
    job 0 480 flux_dynamic "${E2E[@]}" --case flux --sizes 1024x1024,1280x768,2048x2048 --warmup-steps 12 \
        --repeats 2 --dynamic-vram --variants "stock,chipmunk,chipmunk+cache" --out "$R/e2e_flux_table_best2_dynamic.json"
    ;;
flux_static_best2)
    # FLUX 1024x1024, static VRAM, fastest of two timed runs, GPU busy from a profiled third run.
    job 0 160 flux_static "${E2E[@]}" --case flux --sizes 1024x1024 --warmup-steps 12 --repeats 2 --busy \
        --variants "stock,chipmunk" --out "$R/e2e_flux_1024_static_best2.json"
    ;;
flux_1024_check)
    # FLUX 1024x1024 again: static VRAM with the kernels that take the GPU time, and dynamic VRAM
    # with the fastest of two timed runs per variant.
    python3 -c "import torch; print('L2 bytes', torch.cuda.get_device_properties(0).L2_cache_size)" | tee "$R/l2.txt"
    job 0 200 flux_static "${E2E[@]}" --case flux --sizes 1024x1024 --warmup-steps 12 --busy --kernels 25 \
        --variants "stock,chipmunk" --out "$R/e2e_flux_1024_static.json"
    job 0 200 flux_dynamic "${E2E[@]}" --case flux --sizes 1024x1024 --warmup-steps 12 --repeats 2 \
        --dynamic-vram --variants "stock,chipmunk" --out "$R/e2e_flux_1024_dynamic.json"
    ;;
budgets)
    # FLUX at ComfyUI's template settings (1024x1024, 20 steps, euler, cfg 1) as main.py runs it
    # (dynamic VRAM, comfy-kitchen), on the card occupied so that only N GiB stay free once the
    # model is loaded: bf16 and fp8_e4m3fn_fast weights; the run plan decides the caches.
    job 0 290 flux_bf16 "${E2E[@]}" --case flux --sizes 1024x1024 --steps 20 --dynamic-vram --free-gib all,24,16 \
        --variants "stock,chipmunk,chipmunk+cache" --out "$R/e2e_flux_budgets_bf16.json"
    job 0 280 flux_fp8 "${E2E[@]}" --case flux --sizes 1024x1024 --steps 20 --dynamic-vram \
        --weight-dtype fp8_e4m3fn_fast --free-gib all,24,16,12 --variants "stock,chipmunk,chipmunk+cache" \
        --out "$R/e2e_flux_budgets_fp8.json"
    ;;
budgets2)
    # The rest of the budget table: FLUX bf16 at 48, 32 and 12 GiB (FLUX_BUDGETS); WAN2.1-1.3B at its template
    # settings (480p 81 frames, 30 steps, uni_pc, cfg 6) with all memory and 8 GiB free.
    job 0 160 flux_bf16_more "${E2E[@]}" --case flux --sizes 1024x1024 --steps 20 --dynamic-vram \
        --free-gib "${FLUX_BUDGETS:-48,32,12}" --variants "stock,chipmunk,chipmunk+cache" \
        --out "$R/e2e_flux_budgets_bf16_more.json"
    job 0 420 wan13b "${E2E[@]}" --case wan13b --sizes 832x480x81 --steps 30 --cfg 6 --sampler uni_pc \
        --dynamic-vram --free-gib all,8 --variants "stock,chipmunk,chipmunk+cache" --out "$R/e2e_wan13b_budgets.json"
    ;;
check)
    # The GPU test suite (tests/gpu), Chipmunk under core EasyCache (FLUX template settings), and
    # WAN2.1-1.3B's template at 8 GiB free with the streamed caches prefetched.
    CHIPMUNK_COMFYUI_DIR=$COMFY job 0 300 gpu_tests python3 -m pytest tests/gpu -q -rA
    job 0 150 flux_easycache "${E2E[@]}" --case flux --sizes 1024x1024 --steps 20 --dynamic-vram \
        --variants "stock,chipmunk,easycache,chipmunk+easycache" --out "$R/e2e_flux_easycache.json"
    job 0 200 wan13b_8gib "${E2E[@]}" --case wan13b --sizes 832x480x81 --steps 30 --cfg 6 --sampler uni_pc \
        --dynamic-vram --free-gib 8 --variants "stock,chipmunk" --out "$R/e2e_wan13b_8gib_prefetch.json"
    ;;
final_check)
    # After the last changes: the GPU suite, FLUX at the budget table's corners (bf16 all and
    # 12 GiB, fp8 24 GiB), WAN2.1-1.3B at 8 GiB with the step cache.
    CHIPMUNK_COMFYUI_DIR=$COMFY job 0 240 gpu_tests python3 -m pytest tests/gpu -q -rA
    job 0 110 flux_bf16_check "${E2E[@]}" --case flux --sizes 1024x1024 --steps 20 --dynamic-vram --free-gib all,12 \
        --variants "stock,chipmunk,chipmunk+cache" --out "$R/e2e_flux_budgets_bf16_check.json"
    job 0 100 flux_fp8_check "${E2E[@]}" --case flux --sizes 1024x1024 --steps 20 --dynamic-vram \
        --weight-dtype fp8_e4m3fn_fast --free-gib 24 --variants "stock,chipmunk,chipmunk+cache" \
        --out "$R/e2e_flux_budgets_fp8_check.json"
    job 0 150 wan13b_8gib_cache "${E2E[@]}" --case wan13b --sizes 832x480x81 --steps 30 --cfg 6 --sampler uni_pc \
        --dynamic-vram --free-gib 8 --variants "stock,chipmunk+cache" --out "$R/e2e_wan13b_8gib_cache.json"
    ;;
scratch)
    # No fc2 copies (fc2 transposed into one scratch per sparse step): the transpose kernel's
    # speed, the GPU suite, FLUX bf16 all memory with the scratch against the last commit that kept
    # copies (.device/old_pack.tar.gz, git archive of that commit), FLUX fp8 at 24 GiB; each job
    # only while the call's time (TOTAL seconds, default 575) lasts.
    mkdir -p /tmp/old && tar xzf .device/old_pack.tar.gz -C /tmp/old
    CHIPMUNK_COMFYUI_DIR=$COMFY job 0 "$(within 250)" gpu_tests python3 -m pytest tests/gpu -q -rA
    t=$(within 40) && job 0 "$t" transpose python3 bench/kernels.py --ops transpose --shapes flux --sweep \
        --json "$R/kernels_transpose.json"
    t=$(within 75) && job 0 "$t" flux_bf16_scratch "${E2E[@]}" --case flux --sizes 1024x1024 --steps 20 --dynamic-vram \
        --variants "stock,chipmunk,chipmunk+cache" --out "$R/e2e_flux_bf16_scratch.json"
    t=$(within 75) && job 0 "$t" flux_bf16_copies python3 /tmp/old/bench/e2e_comfy.py --comfyui "$COMFY" --case flux \
        --sizes 1024x1024 --steps 20 --dynamic-vram --variants "stock,chipmunk,chipmunk+cache" \
        --out "$R/e2e_flux_bf16_copies.json"
    t=$(within 100) && job 0 "$t" flux_fp8_24 "${E2E[@]}" --case flux --sizes 1024x1024 --steps 20 --dynamic-vram \
        --weight-dtype fp8_e4m3fn_fast --free-gib 24 --variants "stock,chipmunk,chipmunk+cache" \
        --out "$R/e2e_flux_fp8_24_scratch.json"
    ;;
lists)
    # After the narrow (int16) key lists: the kernels at real shapes, the GPU suite, WAN2.1-1.3B's
    # template (480p 81 frames, 30 steps, uni_pc, cfg 6) at 8 GiB free and under core EasyCache
    # with all memory, then FLUX bf16 with all memory; each job only while TOTAL seconds last.
    t=$(within 90) && job 0 "$t" gpu_parity python3 bench/gpu_parity.py
    t=$(within 200) && CHIPMUNK_COMFYUI_DIR=$COMFY job 0 "$t" gpu_tests python3 -m pytest tests/gpu -q -rA
    t=$(within 170) && job 0 "$t" wan13b_8gib "${E2E[@]}" --case wan13b --sizes 832x480x81 --steps 30 --cfg 6 \
        --sampler uni_pc --dynamic-vram --free-gib 8 --variants "stock,chipmunk,chipmunk+cache" \
        --out "$R/e2e_wan13b_8gib_lists.json"
    t=$(within 150) && job 0 "$t" wan13b_easycache "${E2E[@]}" --case wan13b --sizes 832x480x81 --steps 30 --cfg 6 \
        --sampler uni_pc --dynamic-vram --variants "stock,easycache,chipmunk+easycache" \
        --out "$R/e2e_wan13b_easycache.json"
    t=$(within 80) && job 0 "$t" flux_bf16 "${E2E[@]}" --case flux --sizes 1024x1024 --steps 20 --dynamic-vram \
        --variants "stock,chipmunk,chipmunk+cache" --out "$R/e2e_flux_bf16_lists.json"
    ;;
fp8)
    # fp8 attention delta caches: WAN2.1-1.3B's template at 8 GiB free (its bf16 caches half streamed
    # from host memory), FLUX bf16 with all memory (bf16 caches fastest of two, and fp8).
    t=$(within 60) && CHIPMUNK_PARITY_ONLY=fp8 job 0 "$t" fp8_parity python3 bench/gpu_parity.py
    t=$(within 230) && job 0 "$t" wan13b_8gib_fp8 "${E2E[@]}" --case wan13b --sizes 832x480x81 --steps 30 --cfg 6 \
        --sampler uni_pc --dynamic-vram --free-gib 8 --variants "stock,chipmunk fp8,chipmunk+cache fp8" \
        --out "$R/e2e_wan13b_8gib_fp8.json"
    t=$(within 150) && job 0 "$t" flux_bf16_fp8 "${E2E[@]}" --case flux --sizes 1024x1024 --steps 20 --dynamic-vram \
        --repeats 2 --variants "stock,chipmunk+cache,chipmunk fp8,chipmunk+cache fp8" --out "$R/e2e_flux_bf16_fp8.json"
    t=$(within 120) && job 0 "$t" flux_fp8w_12 "${E2E[@]}" --case flux --sizes 1024x1024 --steps 20 --dynamic-vram \
        --weight-dtype fp8_e4m3fn_fast --free-gib 12 \
        --variants "stock,chipmunk,chipmunk+cache,chipmunk fp8,chipmunk+cache fp8" --out "$R/e2e_flux_fp8w_12.json"
    ;;
validate)
    # The GPU suite, FLUX bf16 with fp8 caches, and the run estimate from the first steps checked
    # against whole runs: WAN2.1-1.3B's template (480p 81 frames, 30 steps uni_pc cfg 6), all memory.
    CHIPMUNK_COMFYUI_DIR=$COMFY job 0 "$(within 230)" gpu_tests python3 -m pytest tests/gpu -q -rA
    t=$(within 110) && job 0 "$t" flux_fp8_caches "${E2E[@]}" --case flux --sizes 1024x1024 --steps 20 --dynamic-vram \
        --variants "stock,chipmunk,chipmunk fp8" --out "$R/e2e_flux_fp8_caches.json"
    t=$(within 130) && job 0 "$t" wan13b_whole "${E2E[@]}" --case wan13b --sizes 832x480x81 --steps 30 --cfg 6 \
        --sampler uni_pc --dynamic-vram --variants "stock,chipmunk+cache" --step-times --out "$R/e2e_wan13b_whole.json"
    t=$(within 70) && job 0 "$t" wan13b_timed "${E2E[@]}" --case wan13b --sizes 832x480x81 --steps 30 --cfg 6 \
        --sampler uni_pc --dynamic-vram --variants "stock,chipmunk+cache" --timed-steps 11 \
        --out "$R/e2e_wan13b_timed.json"
    ;;
wan14b_720)
    # WAN2.1-14B (each WAN2.2 A14B expert's architecture) at 720p 81 frames, ComfyUI's template
    # settings (30 steps uni_pc cfg 6), bf16 weights, all memory: a stock run alone is over ten
    # minutes, so each variant times its first steps and the run is estimated from the schedule.
    # WAN14B_FREE: GiB left free once the model is loaded (on a larger card: 50 is an 80 GB card).
    job 0 "$(within 570)" wan14b_720 "${E2E[@]}" --case wan14b --sizes 1280x720x81 --steps 30 --cfg 6 \
        --sampler uni_pc --dynamic-vram --free-gib "${WAN14B_FREE:-all}" --timed-steps "${WAN14B_TIMED:-11}" \
        --variants "${WAN14B_VARIANTS:-stock,chipmunk+cache,chipmunk+cache fp8}" \
        --out "$R/e2e_wan14b_720.json"
    ;;
wan14b_480)
    # WAN2.1-14B with fp8 weights (fp8_e4m3fn_fast) at 480p 81 frames, template settings, 24 GiB free
    # (estimated from the first steps); then FLUX bf16 1024x1024 under dynamic VRAM with the sparse
    # steps eager (no CUDA graphs) against graphed, per-step times.
    t=$(within 330) && job 0 "$t" wan14b_480_24 "${E2E[@]}" --case wan14b --sizes 832x480x81 --steps 30 --cfg 6 \
        --sampler uni_pc --dynamic-vram --weight-dtype fp8_e4m3fn_fast --free-gib 24 --timed-steps 11 \
        --variants "${WAN14B_VARIANTS:-stock,chipmunk+cache,chipmunk+cache fp8}" --out "$R/e2e_wan14b_480_24.json"
    t=$(within 150) && job 0 "$t" flux_eager "${E2E[@]}" --case flux --sizes 1024x1024 --steps 20 --dynamic-vram \
        --variants "stock,chipmunk,chipmunk eager,chipmunk+cache,chipmunk+cache eager" --step-times \
        --out "$R/e2e_flux_eager.json"
    ;;
fold)
    # The GPU suite, then (falling through to fold_rows) FLUX bf16 1024x1024 under dynamic VRAM: cache
    # memory and speed with the single blocks' attention deltas folded into their MLP output caches,
    # and the eager sparse steps.
    CHIPMUNK_COMFYUI_DIR=$COMFY job 0 "$(within 230)" gpu_tests python3 -m pytest tests/gpu -q -rA
    ;&
fold_rows)
    # fold's FLUX rows alone (a call with little device time left; FOLD_VARIANTS narrows them).
    t=$(within 330) && job 0 "$t" flux_fold "${E2E[@]}" --case flux --sizes 1024x1024 --steps 20 --dynamic-vram \
        --variants "${FOLD_VARIANTS:-stock,chipmunk,chipmunk+cache,chipmunk fp8,chipmunk eager}" --step-times \
        --out "$R/e2e_flux_fold.json"
    # The same at the length ComfyUI gives the template's short prompt (T5 padded to 256 tokens).
    t=$(within 150) && job 0 "$t" flux_fold_256 "${E2E[@]}" --case flux --sizes 1024x1024 --steps 20 --dynamic-vram \
        --text-tokens 256 --variants "stock,chipmunk,chipmunk fp8" --out "$R/e2e_flux_fold_256.json"
    ;;
flux_eager)
    # FLUX bf16 1024x1024 under dynamic VRAM: the sparse steps eager (no CUDA graphs) against
    # replayed as graphs and stock, with per-step GPU and host times.
    job 0 "$(within 240)" flux_eager "${E2E[@]}" --case flux --sizes 1024x1024 --steps 20 --dynamic-vram \
        --variants "stock,chipmunk,chipmunk eager,chipmunk+cache eager" --step-times --out "$R/e2e_flux_eager.json"
    ;;
suite_corners)
    # The GPU suite after changes that reach GPU paths, with the FLUX fp8 24 GiB corner and
    # WAN2.1-1.3B at 8 GiB with the step cache (both go through the changed paths).
    CHIPMUNK_COMFYUI_DIR=$COMFY job 0 240 gpu_tests python3 -m pytest tests/gpu -q -rA
    job 0 100 flux_fp8_check "${E2E[@]}" --case flux --sizes 1024x1024 --steps 20 --dynamic-vram \
        --weight-dtype fp8_e4m3fn_fast --free-gib 24 --variants "stock,chipmunk,chipmunk+cache" \
        --out "$R/e2e_flux_budgets_fp8_check.json"
    job 0 150 wan13b_8gib_cache "${E2E[@]}" --case wan13b --sizes 832x480x81 --steps 30 --cfg 6 --sampler uni_pc \
        --dynamic-vram --free-gib 8 --variants "stock,chipmunk+cache" --out "$R/e2e_wan13b_8gib_cache.json"
    ;;
gpu_suite)
    # The GPU test suite alone (tests/gpu; its dynamic-VRAM test runs bench/e2e_comfy.py in a process of its own).
    CHIPMUNK_COMFYUI_DIR=$COMFY job 0 540 gpu_tests python3 -m pytest tests/gpu -q -rA
    ;;
hunyuan)
    # HunyuanVideo 720p at the longest clip whose stock and Chipmunk + step cache runs fit one call.
    job 0 570 hunyuan "${E2E[@]}" --case hunyuan --sizes "${HUNYUAN_SIZE:-1280x720x49}" \
        --variants "stock,chipmunk+cache" --out "$R/e2e_hunyuan_long.json"
    ;;
retrain)
    python3 -m lab.train --comfyui .device/comfyui-v0.19.3.tar.gz --data .device/toy_sprites.npz --gpus 0 \
        --budget "${RETRAIN_BUDGET:-520}" --resume lab/models --dit-lr 3e-4 --out "$OUT" >"$OUT/train_stdout.txt" 2>&1
    ;;
*) echo "unknown mode $mode" >&2; exit 2 ;;
esac
wait
for f in "$R"/*.log; do echo "=== $f"; tail -n 25 "$f"; done
tar czf "$OUT/measurements.tar.gz" -C "$R" .
ls -la "$OUT"
