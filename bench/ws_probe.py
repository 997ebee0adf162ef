"""What Triton's automatic warp specialisation on Hopper does for attention, and what it refuses.

    python bench/ws_probe.py [--shapes flux,wan] [--json PATH]     # on an sm_90 GPU: timings
    python bench/ws_probe.py --compile-only                        # anywhere: which patterns compile

FlashAttention-3-class speed on Hopper comes from warp specialisation: producer warps feed the
copy engine while two consumer warp groups alternate between tensor-core work and the softmax.
Triton (3.6 and later) does this by itself for a loop marked ``tl.range(warp_specialize=True)``
on sm_90, but only for loops whose shape it recognises. This probe

1. compiles, for sm_90, a plain attention loop and the loop with each ingredient the Chipmunk
   dense pass needs (query rows gathered through the query order, a per-row hint loaded by
   pointer, the per-group column sums), with and without warp specialisation, each in its own
   process because some refusals abort the compiler; and
2. on a GPU, times the plain loop (online or fixed row maximum; queries, keys and values through
   tensor descriptors) with and without warp specialisation against torch SDPA.

It is a measurement tool, not part of the kernels: the kernels stay on loops Triton compiles on
every supported version and GPU.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `kernels`

from kernels.attention_triton import _key_descriptor, attention_with_column_sums_triton  # noqa: E402

# Ingredients a probe kernel can switch on (constexpr flags of _probe_kernel).
PATTERNS = {
    "plain (online max)": {},
    "plain (fixed max from a hint)": {"FIXED_MAX": True},
    "queries gathered by pointer": {"Q_GATHER": True},
    "hint loaded by pointer": {"FIXED_MAX": True, "HINT_POINTER": True},
    "column sums (atomics)": {"FIXED_MAX": True, "SUMS": 1},
    "column sums (copy-engine reduce)": {"FIXED_MAX": True, "SUMS": 2},
}
FLAGS = ("FIXED_MAX", "Q_GATHER", "HINT_POINTER", "SUMS", "WS")
SHAPES = {"flux": (1, 24, 4608, 128), "wan": (1, 40, 75520, 128)}  # WAN rounded down to whole 128-key tiles


@triton.jit
def _probe_kernel(Q, K, V, Out, Hint, HintPtr, Order, ColSum, ColSumPtr, H, N, s_qn, s_on, qk_scale, group_size,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, FIXED_MAX: tl.constexpr,
                  Q_GATHER: tl.constexpr, HINT_POINTER: tl.constexpr, SUMS: tl.constexpr, WS: tl.constexpr):
    """Attention over all N keys for one row tile (N a multiple of BLOCK_N: no masking)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    pos = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    if Q_GATHER:
        rows = tl.load(Order + pos)
        q = tl.load(Q + bh.to(tl.int64) * N * HEAD_DIM + rows[:, None].to(tl.int64) * s_qn + dims[None, :])
    else:
        q = tl.reshape(Q.load([b, h, pid * BLOCK_M, 0]), [BLOCK_M, HEAD_DIM])
    if FIXED_MAX:
        if HINT_POINTER:
            m_i = tl.load(HintPtr + bh.to(tl.int64) * N + pos) * 1.4426950408889634
        else:
            m_i = tl.reshape(Hint.load([bh, pid * BLOCK_M]), [BLOCK_M]) * 1.4426950408889634
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if SUMS:
        first_group = (pid * BLOCK_M) // group_size
        lane = tl.arange(0, 16)
        weights = tl.where((pos[None, :] // group_size - first_group) == lane[:, None], 1.0, 0.0).to(tl.bfloat16)
    for start in tl.range(0, N, BLOCK_N, warp_specialize=WS):
        k = tl.reshape(K.load([b, h, start, 0]), [BLOCK_N, HEAD_DIM])
        v = tl.reshape(V.load([b, h, start, 0]), [BLOCK_N, HEAD_DIM])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if FIXED_MAX:
            p = tl.math.exp2(s - m_i[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            m_i = m_new
        l_i += tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc)
        if SUMS == 1:
            sums = tl.dot(weights, p.to(tl.bfloat16))
            cols = start + tl.arange(0, BLOCK_N)
            ptrs = ColSumPtr + bh.to(tl.int64) * 16 * N + (first_group + lane)[:, None] * N + cols[None, :]
            tl.atomic_add(ptrs, sums, mask=lane[:, None] < 2, sem="relaxed")
        if SUMS == 2:
            sums = tl.sum(tl.reshape(tl.dot(weights, p.to(tl.bfloat16)), [2, 8, BLOCK_N]), 1)
            ColSum.atomic_add([bh, first_group, start], tl.reshape(sums, [1, 2, BLOCK_N]))
    out = acc / l_i[:, None]
    tl.store(Out + bh.to(tl.int64) * N * HEAD_DIM + pos[:, None] * s_on + dims[None, :], out.to(Out.dtype.element_ty))


def _compile_for_sm90(flags, block_m=128, block_n=64, num_warps=4):
    """triton.compile for sm_90 (no GPU needed); returns (warp-specialised?, warps, shared bytes)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    const = {"BLOCK_M": block_m, "BLOCK_N": block_n, "HEAD_DIM": 128, **{f: False for f in FLAGS}, "SUMS": 0,
             **flags}
    types = {"Q": f"tensordesc<bf16[1,1,{block_m},128]>", "K": f"tensordesc<bf16[1,1,{block_n},128]>",
             "V": f"tensordesc<bf16[1,1,{block_n},128]>", "Out": "*bf16", "Hint": f"tensordesc<fp32[1,{block_m}]>",
             "HintPtr": "*fp32", "Order": "*i32", "ColSum": f"tensordesc<fp32[1,2,{block_n}]>", "ColSumPtr": "*fp32",
             "qk_scale": "fp32"}
    if flags.get("Q_GATHER"):
        types["Q"] = "*bf16"
    params = list(inspect.signature(_probe_kernel.fn).parameters)
    sig = {name: "constexpr" if name in const else types.get(name, "i32") for name in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(params)
             if sig[name].startswith("*") or name in ("N", "s_qn", "s_on")}
    kernel = triton.compile(ASTSource(_probe_kernel, sig, constexprs=const, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 2})
    return "ttg.warp_specialize" in kernel.asm["ttgir"], kernel.metadata.num_warps, kernel.metadata.shared


def compile_report():
    """Each pattern with and without warp specialisation, each compile in a child process."""
    results = []
    for name, flags in PATTERNS.items():
        for ws in (False, True):
            proc = subprocess.run([sys.executable, __file__, "--compile-one", json.dumps({**flags, "WS": ws})],
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode == 0:
                specialised, warps, smem = json.loads(proc.stdout.strip().splitlines()[-1])
                outcome = f"compiles: {warps} warps, {smem // 1024} KB shared" + (
                    ", warp-specialised" if specialised else (", NOT specialised" if ws else ""))
            else:
                lines = [ln for ln in (proc.stderr + proc.stdout).splitlines()
                         if any(w in ln for w in ("error", "ERROR", "Assertion", "UNREACHABLE", "Unexpected"))]
                # file names only: no paths of this machine or of Triton's build in the record
                lines = [re.sub(r"\S*/(bench/ws_probe\.py)", r"\1", re.sub(r"/project/", "", ln)) for ln in lines]
                outcome = f"fails (exit {proc.returncode}): " + " | ".join(ln.strip()[:160] for ln in lines[:2])
            results.append({"pattern": name, "warp_specialize": ws, "outcome": outcome})
            print(f"  {name:34s} ws={ws!s:5s} {outcome}", flush=True)
    return results


def _launch(q, k, v, out, hint, flags, block_m, block_n, num_warps, num_stages):
    from triton.tools.tensor_descriptor import TensorDescriptor
    batch, heads, n, d = q.shape
    qd, kd, vd = _key_descriptor(q, block_m), _key_descriptor(k, block_n), _key_descriptor(v, block_n)
    hint2 = hint.view(batch * heads, n)
    hd = TensorDescriptor(hint2, list(hint2.shape), list(hint2.stride()), [1, block_m])
    grid = (n // block_m, batch * heads)
    _probe_kernel[grid](qd, kd, vd, out, hd, hint, hint, hint, hint, heads, n, q.stride(2), out.stride(2),
                        d ** -0.5 * 1.4426950408889634, 192, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d,
                        FIXED_MAX=flags.get("FIXED_MAX", False), Q_GATHER=False, HINT_POINTER=False, SUMS=0,
                        WS=flags.get("WS", False), num_warps=num_warps, num_stages=num_stages)


VARIANTS = {  # name: flags, block_m, block_n, warps, stages
    "online max": ({}, 128, 64, 8, 3),
    "online max, warp-specialised": ({"WS": True}, 128, 128, 4, 2),
    "online max, warp-specialised, 64-key tiles": ({"WS": True}, 128, 64, 4, 2),
    "fixed max": ({"FIXED_MAX": True}, 128, 64, 8, 3),
    "fixed max, warp-specialised": ({"FIXED_MAX": True, "WS": True}, 128, 128, 4, 2),
}


def time_variant(shape, name):
    """One timing row (run in a child process: a kernel that never finishes must not stop the probe)."""
    sys.path.append(str(Path(__file__).resolve().parent))  # after the root: bench/kernels.py must not shadow it
    from bench_utils import bench_ms, rel_err
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, heads, n, d = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    flops = 4 * batch * heads * n * n * d
    expected = 0.5 if shape == "flux" else 300.0
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :2], k[:, :2], v[:, :2])
        if name == "cuDNN SDPA":
            ms = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), expected)
            return {"shape": shape, "N": n, "H": heads, "variant": name, "ms": ms, "tflops": flops / ms / 1e9}
    # the exact row log-sum-exp, as the previous dense step hands it over (from the pack's dense kernel)
    _, hint = attention_with_column_sums_triton(q, k, v, torch.arange(n, device="cuda"), 192, torch.empty_like(q),
                                                config={"column_sums": False})
    flags, bm, bn, warps, stages = VARIANTS[name]
    out = torch.full_like(q, float("nan"))
    _launch(q, k, v, out, hint, flags, bm, bn, warps, stages)
    torch.cuda.synchronize()
    err = rel_err(out[:, :2], ref)
    ms = bench_ms(lambda: _launch(q, k, v, out, hint, flags, bm, bn, warps, stages), expected)
    return {"shape": shape, "N": n, "H": heads, "variant": name, "config": [bm, bn, warps, stages], "ms": ms,
            "tflops": flops / ms / 1e9, "rel_err": err}


def time_shapes(shape_names, limit_s):
    rows = []
    for shape in shape_names:
        cudnn_ms = None
        for name in ("cuDNN SDPA", *VARIANTS):
            try:
                proc = subprocess.run([sys.executable, __file__, "--time-one", json.dumps([shape, name])],
                                      capture_output=True, text=True, timeout=limit_s)
                if proc.returncode:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
                    row = {"shape": shape, "variant": name, "failed": f"exit {proc.returncode}: {tail[0][:200]}"}
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                row = {"shape": shape, "variant": name, "failed": f"did not finish in {limit_s} s (hung)"}
            if name == "cuDNN SDPA" and "ms" in row:
                cudnn_ms = row["ms"]
            if "ms" in row and cudnn_ms:
                row["vs_cudnn"] = row["ms"] / cudnn_ms
            rows.append(row)
            if "ms" in row:
                extra = f"  {row['vs_cudnn']:.2f}x cuDNN" if name != "cuDNN SDPA" else ""
                err = f"  err {row['rel_err']:.1e}" if "rel_err" in row else ""
                print(f"  {shape} {name}: {row['ms']:.3f} ms  {row['tflops']:.0f} TFLOP/s{extra}{err}", flush=True)
            else:
                print(f"  {shape} {name}: {row['failed']}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="flux,wan")
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--skip-compile", action="store_true", help="timings only")
    parser.add_argument("--compile-one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--time-one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, default=60.0, help="seconds a timing may take before it counts as hung")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.compile_one is not None:
        print(json.dumps(_compile_for_sm90(json.loads(args.compile_one))))
        return
    if args.time_one is not None:
        print(json.dumps(time_variant(*json.loads(args.time_one))))
        return
    record = {"date": datetime.date.today().isoformat(), "triton": triton.__version__, "torch": torch.__version__,
              "python": platform.python_version()}
    print(f"triton {triton.__version__}, torch {torch.__version__}")
    if not args.skip_compile:
        print("compiling for sm_90:")
        record["compile"] = compile_report()
    if not args.compile_only and torch.cuda.is_available():
        record["device"] = torch.cuda.get_device_name()
        record["timings"] = time_shapes(args.shapes.split(","), args.limit)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
