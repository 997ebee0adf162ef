"""Compile every Triton kernel configuration for several GPU architectures, without a GPU.

    python bench/compile_check.py [--archs 80,86,89,90]

Builds each kernel (the default configurations of the launchers and the variants the benchmark
sweeps) to a cubin with ``triton.compile`` for each target, and prints registers, spills and
shared memory per block. A configuration that does not compile, or needs more shared memory than
the architecture gives a block, is reported; the exit status is 1 if any did. This is the
portability check: GPU time is only needed to measure speed.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `kernels`

from kernels import attention_triton as at  # noqa: E402
from kernels import block_ops_triton as bt  # noqa: E402
from kernels import index_lists_triton as it  # noqa: E402
from kernels import mlp_triton as mt  # noqa: E402

# Shared memory a block may use, by compute capability (bytes).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
SMALL = {86, 89}  # the "small" size class of the launchers


def signature(fn, pointer_dtypes, constexprs):
    """Triton signature: pointers by dtype, float scalars fp32, everything else i32."""
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointer_dtypes:
            sig[name] = "*" + pointer_dtypes[name]
        elif name in ("sign", "qk_scale", "eps", "q_eps", "k_eps"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


# Scalars the launchers pass that are multiples of 16 in the shapes that matter (strides of
# [.., N, 128] tensors, padded widths): Triton specialises such values at run time, which is what
# lets it vectorise and pipeline the loads, so the check must assume the same.
ALIGNED_SCALARS = {"D_IN", "D_OUT", "K_CAP", "block_size", "group_size"}
# Strides that are small (a broadcast vector's channel stride, the rotary table's innermost ones).
UNALIGNED_STRIDES = {"s_hn", "s_sc", "s_hc", "s_gc", "s_pi", "s_pr", "s_pc"}


def attributes(fn, sig):
    attrs = {}
    for i, name in enumerate(inspect.signature(fn.fn).parameters):
        if sig[name].startswith("*") or (name.startswith("s_") and name not in UNALIGNED_STRIDES) or name in ALIGNED_SCALARS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def sparse_cases(dtype):
    # int16 key lists, as FLUX's and WAN 480p's are (fp8 caches: checked on the GPU, bench/gpu_parity.py)
    ptrs = {"Q": dtype, "K": dtype, "V": dtype, "Base": dtype, "Out": dtype, "Idx": "i16", "Cnt": "i16", "Order": "i32",
            "BaseScale": "fp32", "OutScale": "fp32"}
    for size_class, configs in at.SPARSE_CONFIGS.items():
        for rows, cfg in configs.items():
            const = {"HEAD_DIM": 128, "BLOCK_M": rows, "BLOCK_N": cfg["block_n"], "HAS_BASE": True,
                     "STREAM": "evict_first", "BASE_FP8": False, "OUT_FP8": False, "PAGED": False, "PAGE_BITS": 16}
            yield f"sparse attention {size_class} rows={rows}", size_class, at._column_sparse_attention_kernel, \
                ptrs, const, cfg
        # paged key lists (int16 ids, int32 counts), as WAN's and HunyuanVideo's at 720p are
        rows, cfg = min(configs.items())  # query groups of 192 (WAN, HunyuanVideo) run rows of 64
        yield f"sparse attention {size_class} rows={rows}, paged lists", size_class, \
            at._column_sparse_attention_kernel, {**ptrs, "Cnt": "i32"}, {**const, "BLOCK_M": rows,
                                                                        "BLOCK_N": cfg["block_n"], "PAGED": True}, cfg


def dense_cases(dtype):
    ptrs = {"Q": dtype, "K": dtype, "V": dtype, "Out": dtype, "Order": "i32", "ColSum": "fp32", "Lse": "fp32",
            "LseHint": "fp32"}
    for size_class, cfg in at.DENSE_CONFIGS.items():
        for label, hint, sums, fixed in (("hint, fixed max", True, True, True), ("hint, running max", True, True, False),
                                         ("no hint (two passes)", False, True, False)):
            const = {"HEAD_DIM": 128, "BLOCK_M": cfg["block_m"], "BLOCK_N": cfg["block_n"], "HAS_HINT": hint,
                     "COLUMN_SUMS": sums, "FIXED_MAX": fixed, "TMA": False}
            yield f"dense + column sums {size_class} {label}", size_class, at._attention_with_column_sums_kernel, \
                ptrs, const, cfg


def mlp_cases(dtype):
    up_ptrs = {"X": dtype, "W1": dtype, "B1": dtype, "Hidden": dtype, "Delta": dtype, "Idx": "i16", "Cnt": "i16",
               "Order": "i32", "HScale": "fp32"}
    down_ptrs = {"Delta": dtype, "W2": dtype, "Out": dtype, "Result": dtype, "Idx": "i16", "Cnt": "i16",
                 "Order": "i32"}
    tables = [(size_class, "", parts) for size_class, parts in mt.MLP_CONFIGS.items()]
    tables += [(size_class, " long rows", parts) for size_class, parts in mt.MLP_LONG_CONFIGS.items()]
    for size_class, rows_label, parts in tables:
        up, down = parts["up"], parts["down"]
        const = {"HAS_BIAS": True, "ACTIVATION": 0, "BLOCK_M": up["block_m"], "BLOCK_N": up["block_n"],
                 "BLOCK_K": up["block_k"], "EVEN_K": True, "HIDDEN_OFFSET_TYPE": tl.int32, "HIDDEN_BY_POSITION": True,
                 "HIDDEN_FP8": False}
        yield f"mlp up {size_class}{rows_label}", size_class, mt._mlp_delta_up_kernel, up_ptrs, const, up
        const = {"BLOCK_M": down["block_m"], "BLOCK_N": down["block_n"], "BLOCK_K": down["block_k"], "EVEN_N": True,
                 "HAS_RESULT": True}
        yield f"mlp down {size_class}{rows_label}", size_class, mt._mlp_delta_down_kernel, down_ptrs, const, down
    for size_class in mt.MLP_CONFIGS:
        yield f"block means {size_class}", size_class, mt._block_means_kernel, \
            {"T": dtype, "Out": dtype, "Order": "i32"}, {"BLOCK_R": 32, "BLOCK_C": 128}, \
            {"num_warps": 4, "num_stages": 3}


def selection_cases(dtype):
    """The index-list kernel (same configuration in both size classes: it uses no shared tiles)."""
    ptrs = {"Scores": "fp32", "Current": dtype, "Mean": "fp32", "Forced": "u8", "Seeds": "i64", "Idx": "i32",
            "Cnt": "i32"}
    for size_class in ("big", "small"):
        for label, abs_diff, forced, rand, n_cols, paged in (
                ("attention keys (FLUX), forced + random", False, True, True, 4608, False),
                ("MLP units (FLUX), random, block-mean refresh", True, False, True, 12288, False),
                ("attention keys (video length), forced + random", False, True, True, 75600, False),
                ("attention keys (video length), paged lists", False, True, True, 75600, True)):
            in_registers, block_c, warps = it._launch_config(n_cols, {})
            const = {"ABS_DIFF": abs_diff, "HAS_FORCED": forced, "HAS_RANDOM": rand, "BLOCK_C": block_c,
                     "IN_REGISTERS": in_registers, "PAGED": paged, "PAGE_BITS": 16}
            yield f"index lists {size_class} {label}", size_class, it._select_columns_kernel, \
                {**ptrs, "Idx": "i16"} if paged else ptrs, const, {"num_warps": warps, "num_stages": 1}


def sampled_cases(dtype):
    ptrs = {"Q": dtype, "K": dtype, "Order": "i32", "ColSum": "fp32"}
    cfg = at.SAMPLED_CONFIG
    for size_class in ("big", "small"):
        const = {"SAMPLES": 32, "HEAD_DIM": 128, "BLOCK_M": cfg["block_m"], "BLOCK_N": cfg["block_n"]}
        yield f"sampled column sums {size_class}", size_class, at._sampled_column_sums_kernel, ptrs, const, cfg


def block_ops_cases(dtype):
    """The single block's one-pass per-token kernels, at FLUX's width (no shared tiles: one
    configuration for both size classes)."""
    for size_class in ("big", "small"):
        yield f"layer norm + modulation {size_class}", size_class, bt._layer_norm_modulate_kernel, \
            {"X": dtype, "Scale": dtype, "Shift": dtype, "Out": dtype}, {"BLOCK_C": 4096, "ROWS": 2}, \
            {"num_warps": 8, "num_stages": 1}
        for copy_v in (False, True):
            yield f"q/k norms + rotary{' + values' if copy_v else ''} {size_class}", size_class, \
                bt._qk_norm_rope_kernel, {"QKV": dtype, "Wq": dtype, "Wk": dtype, "PE": "fp32", "Q": dtype, "K": dtype,
                                          "V": dtype}, \
                {"D": 128, "BLOCK_N": 16, "HAS_PE": True, "COPY_V": copy_v}, {"num_warps": 4, "num_stages": 1}
        yield f"gated residual {size_class}", size_class, bt._gated_residual_kernel, \
            {"X": dtype, "Gate": dtype, "A": dtype, "Bt": dtype, "Out": dtype}, {"BLOCK_C": 4096, "ROWS": 2, "HAS_B": True}, \
            {"num_warps": 8, "num_stages": 1}


def resource_usage(cubin: bytes) -> str:
    """Registers and spill stores of a cubin, read with the cuobjdump that ships with Triton."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return f"{regs.group(1) if regs else '?'} regs, stack {stack.group(1) if stack else '?'} B"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="80,86,89,90")
    parser.add_argument("--dtypes", default="bf16,fp16")
    args = parser.parse_args()
    failures = 0
    print(f"triton {triton.__version__}")
    for arch in (int(a) for a in args.archs.split(",")):
        wanted = {"small"} if arch in SMALL else {"big", "hopper"} if arch == 90 else {"big"}
        for dtype in args.dtypes.split(","):
            for label, size_class, fn, ptrs, const, cfg in (*sparse_cases(dtype), *dense_cases(dtype), *mlp_cases(dtype),
                                                           *selection_cases(dtype), *sampled_cases(dtype),
                                                           *block_ops_cases(dtype)):
                if size_class not in wanted:
                    continue
                sig = signature(fn, ptrs, const)
                src = ASTSource(fn, sig, constexprs=const, attrs=attributes(fn, sig))
                try:
                    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                            options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
                except Exception as exc:  # report and go on: the summary says what failed
                    failures += 1
                    print(f"sm_{arch} {dtype} {label}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                    if os.environ.get("CHIPMUNK_COMPILE_VERBOSE"):
                        print(exc)
                    continue
                meta = kernel.metadata
                smem = meta.shared
                too_big = smem > SMEM_LIMIT[arch]
                failures += too_big
                print(f"sm_{arch} {dtype} {label}: {resource_usage(kernel.asm['cubin'])}, "
                      f"{smem / 1024:.0f} KB shared{'  OVER THE LIMIT' if too_big else ''}", flush=True)
    print("all compiled" if not failures else f"{failures} configuration(s) failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
