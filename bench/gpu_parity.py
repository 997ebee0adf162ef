"""Compiled Triton kernels against the PyTorch references on a GPU (the CI runs the same kernels
through Triton's interpreter on the CPU; this checks what the GPU compiler makes of them).

    python bench/gpu_parity.py

Covers the launchers' default configurations and every configuration the benchmark sweeps, at
awkward sizes (token counts off the tile, short and empty key lists, batch 2, fp16 and bf16), and
the dense kernel's hint paths (hint near, far above, far below, infinite); the index lists and
the MLP's unit ranking bit for bit at FLUX sizes (and rows of video length), block means, key
scores from sampled queries, the MLP update in the core's layout. Prints one line per case and
exits 1 if any case is off.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `kernels`
sys.path.append(str(Path(__file__).resolve().parent))

from kernels.attention_reference import (  # noqa: E402
    attention_with_column_sums_reference, column_sparse_attention_reference, sampled_column_sums_reference)
from kernels.fp8 import FP8, quantize_rows  # noqa: E402
from kernels.attention_triton import (  # noqa: E402
    attention_with_column_sums_triton, column_sparse_attention_triton, sampled_column_sums_triton)
from kernels.index_lists import (  # noqa: E402
    build_index_lists_reference, index_dtype, rank_units_reference, read_lists)
from kernels.index_lists_triton import build_index_lists_triton, rank_units_triton  # noqa: E402
from kernels.mlp_reference import (  # noqa: E402
    HIDDEN_HEADROOM, block_means_reference, sparse_mlp_delta_reference, transpose_into_reference)
from kernels.mlp_triton import block_means_triton, sparse_mlp_delta_triton, transpose_into_triton  # noqa: E402

# bench/kernels.py (the sweep lists) under another name: `kernels` is the package
_spec = importlib.util.spec_from_file_location("bench_sweeps", Path(__file__).resolve().parent / "kernels.py")
bench_sweeps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_sweeps)

DEV = os.environ.get("CHIPMUNK_PARITY_DEVICE", "cuda")  # "cpu" with TRITON_INTERPRET=1: a smoke test of this script
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
failures = []


def check(label, actual, expected, dtype):
    actual, expected = actual.float(), expected.float()
    scale = expected.abs().max().clamp_min(1e-30)
    actual, expected = actual / scale, expected / scale
    finite = bool(torch.isfinite(actual).all())
    err = float((actual - expected).norm() / expected.norm().clamp_min(1e-12)) if finite else float("nan")
    ok = finite and err < TOL[dtype]
    if not ok:
        failures.append(label)
    print(f"{'ok  ' if ok else 'FAIL'} {label}: rel err {err:.2e}{'' if finite else ' (not finite)'}", flush=True)


SKIPPED = object()


def launch(fn, config):
    """fn()'s result; SKIPPED when the configuration needs more shared memory than this GPU has."""
    try:
        return fn()
    except Exception as exc:
        if "OutOfResources" not in type(exc).__name__:
            raise
        print(f"skip {config}: {str(exc)[:100]}", flush=True)
        return SKIPPED


def sparse_case(b, h, n, group, capacity, dtype, config, gen, with_base=True):
    q, k, v = (torch.randn(b, n, h, 128, device=DEV, generator=gen).to(dtype).transpose(1, 2) for _ in range(3))
    n_groups = math.ceil(n / group)
    idx = torch.stack([torch.randperm(n, device=DEV, generator=gen)[:capacity].sort().values
                       for _ in range(b * h * n_groups)]).view(b, h, n_groups, capacity).to(index_dtype(n))
    counts = torch.randint(1, capacity + 1, (b, h, n_groups), device=DEV, generator=gen).to(index_dtype(n))
    counts.view(-1)[0] = 0
    counts.view(-1)[-1] = capacity
    order = torch.randperm(n, device=DEV, generator=gen).int()
    base = torch.randn(b, h, n, 128, device=DEV, generator=gen).to(dtype) if with_base else None  # None: a folded delta
    expected = torch.empty(b, h, n, 128, device=DEV)
    column_sparse_attention_reference(q, k, v, idx, counts, order, group, base, expected, 1.0)
    out = torch.full((b, h, n, 128), float("nan"), device=DEV, dtype=dtype)
    if launch(lambda: column_sparse_attention_triton(q, k, v, idx, counts, order, group, base, out, 1.0,
                                                     config=config), config) is SKIPPED:
        return
    check(f"sparse attention b{b} h{h} n{n} G={group} {str(dtype)[6:]} {config}{'' if with_base else ' no base'}",
          out, expected, dtype)


def fp8_cache_case(b, h, n, group, capacity, dtype, gen):
    """fp8 delta caches at a real shape: the dense step's fp8 rows are ``quantize_rows`` of the
    kernel's own output (bytes equal, or one step apart where its fp32 and bf16 values round
    apart), and a sparse step reading them matches the reference."""
    q, k, v = (torch.randn(b, n, h, 128, device=DEV, generator=gen).to(dtype).transpose(1, 2) for _ in range(3))
    n_groups = math.ceil(n / group)
    idx = torch.stack([torch.randperm(n, device=DEV, generator=gen)[:capacity].sort().values
                       for _ in range(b * h * n_groups)]).view(b, h, n_groups, capacity).to(index_dtype(n))
    counts = torch.full((b, h, n_groups), capacity, device=DEV, dtype=index_dtype(n))
    order = torch.randperm(n, device=DEV, generator=gen).int()
    dense = torch.randn(b, n, h, 128, device=DEV, generator=gen).to(dtype).transpose(1, 2)
    plain = torch.empty(b, h, n, 128, device=DEV, dtype=dtype)
    column_sparse_attention_triton(q, k, v, idx, counts, order, group, dense, plain, -1.0)
    cache = torch.empty(b, n, h, 128, device=DEV, dtype=FP8).transpose(1, 2)
    scale = torch.empty(b, n, h, device=DEV).transpose(1, 2)
    column_sparse_attention_triton(q, k, v, idx, counts, order, group, dense, cache, -1.0, None, scale)
    expected, expected_scale = quantize_rows(plain.float())
    got, want = cache.float(), expected.float()
    label = f"fp8 cache n{n} {str(dtype)[6:]}"
    within_step = bool(((got - want).abs() <= want.abs() / 8 + 2 ** -9).all())
    differ = float((cache.view(torch.uint8) != expected.view(torch.uint8)).float().mean())
    scale_err = float(((scale - expected_scale) / expected_scale).abs().max())
    ok = within_step and differ < 0.05 and scale_err < TOL[dtype]
    if not ok:
        failures.append(label)
    print(f"{'ok  ' if ok else 'FAIL'} {label} write: bytes differing {differ:.2%}, all within one step "
          f"{within_step}, scale rel err {scale_err:.1e}", flush=True)
    out = torch.full((b, h, n, 128), float("nan"), device=DEV, dtype=dtype)
    column_sparse_attention_triton(q, k, v, idx, counts, order, group, cache, out, 1.0, scale)
    reference = torch.empty(b, h, n, 128, device=DEV)
    column_sparse_attention_reference(q, k, v, idx, counts, order, group, cache, reference, 1.0, scale)
    check(label + " read", out, reference, dtype)


def mlp_inputs(n, dtype, gen, d_in, hidden, d_out, block, capacity):
    """A sparse MLP case's x, fc1 (weight, bias) and fc2, and per row block a sorted list of
    ``capacity`` distinct units in the narrowest integer type (as the pack builds them)."""
    x = torch.randn(1, n, d_in, device=DEV, generator=gen).to(dtype)
    w1 = (torch.randn(hidden, d_in, device=DEV, generator=gen) * d_in ** -0.5).to(dtype)
    b1 = (0.1 * torch.randn(hidden, device=DEV, generator=gen)).to(dtype)
    w2 = (torch.randn(d_out, hidden, device=DEV, generator=gen) * hidden ** -0.5).to(dtype)
    n_blocks = math.ceil(n / block)
    units = torch.stack([torch.randperm(hidden, device=DEV, generator=gen)[:capacity].sort().values
                         for _ in range(n_blocks)]).view(1, n_blocks, capacity).to(index_dtype(hidden))
    return x, w1, b1, w2, units


def fp8_hidden_case(n, dtype, gen, d_in=3072, hidden=12288, d_out=3072, block=128, capacity=3712):
    """An fp8 hidden cache at FLUX's MLP shape: the stored units are the reference's (bytes equal,
    or one rounding step apart), and the output moved by exactly the change of the stored values."""
    x, w1, b1, w2, units = mlp_inputs(n, dtype, gen, d_in, hidden, d_out, block, capacity)
    counts = torch.full((1, units.shape[1]), capacity, device=DEV, dtype=index_dtype(hidden))
    order = torch.randperm(n, device=DEV, generator=gen).int()
    start = torch.nn.functional.gelu(torch.randn(1, hidden, n, device=DEV, generator=gen), approximate="tanh")
    cache0, scale = quantize_rows(start, HIDDEN_HEADROOM)
    out0 = torch.randn(1, n, d_out, device=DEV, generator=gen).to(dtype)
    got = []
    for fn in (sparse_mlp_delta_triton, sparse_mlp_delta_reference):
        cache, out = cache0.clone(), out0.clone()
        fn(x, w1, b1, w2.t().contiguous().t(), units, counts, order, block, cache.transpose(1, 2), out,
           hidden_in_block_order=True, hidden_scale=scale)
        got.append((cache, out))
    (cache, out), (ref_cache, _) = got
    within_step = bool(((cache.float() - ref_cache.float()).abs() <= ref_cache.float().abs() / 8 + 2 ** -9).all())
    differ = float((cache.view(torch.uint8) != ref_cache.view(torch.uint8)).float().mean())
    label = f"fp8 hidden n{n} {str(dtype)[6:]}"
    ok = within_step and differ < 0.05
    if not ok:
        failures.append(label)
    print(f"{'ok  ' if ok else 'FAIL'} {label} stored: bytes differing {differ:.2%}, all within one step {within_step}",
          flush=True)
    change = (cache.float() - cache0.float()) * scale[..., None]
    expected = torch.zeros(1, n, d_out, device=DEV)
    expected[:, order.long()] = change.transpose(1, 2) @ w2.float().T
    check(label + " output update", out.float() - out0.float(), expected, dtype)


def dense_case(b, h, n, group, dtype, config, hint_offset, gen, layout="bhnd", n_keys=None):
    if layout == "bnhd":  # transposed views of [B, N, H, D] buffers, as the models hold them
        q, k, v = (torch.randn(b, n, h, 128, device=DEV, generator=gen).to(dtype).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (torch.randn(b, h, n, 128, device=DEV, generator=gen).to(dtype) for _ in range(3))
    if n_keys is not None:  # key padding: keys and values cut to the valid ones
        k, v = k[:, :, :n_keys], v[:, :, :n_keys]
    order = torch.randperm(n, device=DEV, generator=gen).int()
    ref_out = torch.empty(b, h, n, 128, device=DEV)
    _, exact = attention_with_column_sums_reference(q, k, v, order, group, ref_out, None)
    hint = None
    if hint_offset is not None:
        hint = exact + 0.05 * torch.randn(exact.shape, device=DEV, generator=gen)
        hint[:, -1, : n // 3] += hint_offset
    ref_sums, ref_lse = attention_with_column_sums_reference(q, k, v, order, group, ref_out, hint)
    out = torch.full((b, h, n, 128), float("nan"), device=DEV, dtype=dtype)
    result = launch(lambda: attention_with_column_sums_triton(q, k, v, order, group, out, hint, config=config), config)
    if result is SKIPPED:
        return
    sums, lse = result
    label = (f"dense b{b} h{h} n{n} keys {n_keys or n} {layout} G={group} {str(dtype)[6:]} "
             f"hint{'' if hint_offset is None else f'+{hint_offset}'} {config}")
    check(label + " out", out, ref_out, dtype)
    check(label + " lse", lse, ref_lse, torch.float16)
    rows = slice(None) if hint_offset is None or math.isfinite(hint_offset) else slice(0, h - 1)
    check(label + " sums", sums[:, rows], ref_sums[:, rows], torch.bfloat16)


def mlp_case(n, dtype, config, gen, d_in=256, hidden=1024, d_out=192, block=128, capacity=300):
    x, w1, b1, w2, units = mlp_inputs(n, dtype, gen, d_in, hidden, d_out, block, capacity)
    counts = torch.randint(1, capacity + 1, (1, units.shape[1]), device=DEV, generator=gen).to(index_dtype(hidden))
    counts[0, -1] = capacity
    h_cache = torch.randn(1, hidden, n, device=DEV, generator=gen).to(dtype).transpose(1, 2)
    o_cache = torch.randn(1, n, d_out, device=DEV, generator=gen).to(dtype)
    ref_h, ref_o = h_cache.float(), o_cache.float()
    sparse_mlp_delta_reference(x, w1, b1, w2, units, counts, None, block, ref_h, ref_o)
    k_h, k_o = h_cache.clone(), o_cache.clone()
    if launch(lambda: sparse_mlp_delta_triton(x, w1, b1, w2.t().contiguous().t(), units, counts, None, block,
                                              k_h, k_o, config=config), config) is SKIPPED:
        return
    label = f"mlp n{n} {str(dtype)[6:]} {config}"
    check(label + " hidden", k_h, ref_h, dtype)
    check(label + " out update", k_o.float() - o_cache.float(), ref_o - o_cache.float(), dtype)


def check_equal(label, actual, expected):
    """Bit-for-bit equality (the index lists are exact integer results)."""
    ok = all(torch.equal(a, e) for a, e in zip(actual, expected))
    if not ok:
        failures.append(label)
    print(f"{'ok  ' if ok else 'FAIL'} {label}: {'identical' if ok else 'differs'}", flush=True)


def index_list_case(shape, keep, n_random, forced, gen, ties=False):
    scores = torch.rand(shape, device=DEV, generator=gen)
    if ties:
        scores = (scores * 8).floor()
    seeds = torch.randint(-2 ** 62, 2 ** 62, (shape[0],), device=DEV, generator=gen)
    expected = build_index_lists_reference(scores, keep, n_random, forced, seeds, 64)
    got = build_index_lists_triton(scores, keep, n_random, forced, seeds, 64)
    forced_label = "none" if forced is None else tuple(forced.shape)
    check_equal(f"index lists {tuple(shape)} keep {keep} random {n_random} forced {forced_label} ties {ties}",
                got, expected)


def paged_lists_case(b, h, n, group, keep, dtype, gen):
    """Paged key lists at a video length (WAN 720p: 75,600 keys): the selection kernel writes the
    reference's paged lists, and the sparse attention over them equals the attention over the
    same lists in int32, bit for bit."""
    scores = torch.rand(b, h, math.ceil(n / group), n, device=DEV, generator=gen)
    seeds = torch.randint(-2 ** 62, 2 ** 62, (b,), device=DEV, generator=gen)
    text = torch.arange(512, device=DEV)
    expected = build_index_lists_reference(scores, keep, keep // 10, text, seeds, 64, paged=True)
    got = build_index_lists_triton(scores, keep, keep // 10, text, seeds, 64, paged=True)
    check_equal(f"paged index lists {tuple(scores.shape)} keep {keep}", got, expected)
    ids, counts = read_lists(*got)
    q, k, v = (torch.randn(b, n, h, 128, device=DEV, generator=gen).to(dtype).transpose(1, 2) for _ in range(3))
    order = torch.randperm(n, device=DEV, generator=gen).int()
    base = torch.randn(b, h, n, 128, device=DEV, generator=gen).to(dtype)
    wide, paged = (column_sparse_attention_triton(q, k, v, *lists, order, group, base, torch.empty_like(base), 1.0)
                   for lists in ((ids.int(), counts.int()), got))
    check_equal(f"sparse attention over paged lists n{n} {str(dtype)[6:]} == over int32 lists", (paged,), (wide,))


def rank_units_case(blocks, units, keep, n_random, gen):
    current = torch.randn(1, blocks, units, device=DEV, generator=gen).bfloat16()
    mean = torch.randn(1, blocks, units, device=DEV, generator=gen)
    mean[0, 0] = current[0, 0].float()  # an unchanged block: every score ties
    seeds = torch.tensor([12345], device=DEV)
    ref_mean, kernel_mean = mean.clone(), mean.clone()
    expected = rank_units_reference(current, ref_mean, keep, n_random, seeds, 64)
    got = rank_units_triton(current, kernel_mean, keep, n_random, seeds, 64)
    check_equal(f"rank units [{blocks}, {units}] keep {keep} random {n_random}", (*got, kernel_mean),
                (*expected, ref_mean))


def block_means_case(n, channels, block, dtype, gen):
    t = torch.randn(2, n, channels, device=DEV, generator=gen).to(dtype)
    order = torch.randperm(n, device=DEV, generator=gen).int()
    out = torch.empty(2, math.ceil(n / block), channels, device=DEV, dtype=dtype)
    check(f"block means n{n} c{channels} block {block} {str(dtype)[6:]}", block_means_triton(t, order, block, out),
          block_means_reference(t, order, block), dtype)


def sampled_case(n, heads, group, samples, dtype, gen):
    q, k = (torch.randn(1, n, heads, 128, device=DEV, generator=gen).to(dtype).transpose(1, 2) for _ in range(2))
    order = torch.randperm(n, device=DEV, generator=gen).int()
    got = sampled_column_sums_triton(q, k, order, group, samples)
    ref_heads = min(heads, 2)
    expected = sampled_column_sums_reference(q[:, :ref_heads], k[:, :ref_heads], order, group, samples)
    check(f"sampled column sums n{n} G={group} S={samples} {str(dtype)[6:]}", got[:, :ref_heads], expected,
          torch.bfloat16)


def mlp_block_order_case(n, dtype, gen, d_in=256, hidden=1024, d_out=192, block=128, capacity=300):
    """The core's layout: hidden cache unit-major in block order, x and output in token order,
    a result copy of the output rows."""
    x = torch.randn(1, n, d_in, device=DEV, generator=gen).to(dtype)
    w1 = (torch.randn(hidden, d_in, device=DEV, generator=gen) * d_in ** -0.5).to(dtype)
    w2 = (torch.randn(d_out, hidden, device=DEV, generator=gen) * hidden ** -0.5).to(dtype)
    n_blocks = math.ceil(n / block)
    units = torch.stack([torch.randperm(hidden, device=DEV, generator=gen)[:capacity].sort().values
                         for _ in range(n_blocks)]).view(1, n_blocks, capacity).to(index_dtype(hidden))
    counts = torch.randint(1, capacity + 1, (1, n_blocks), device=DEV, generator=gen).to(index_dtype(hidden))
    counts[0, 0] = 0
    order = torch.randperm(n, device=DEV, generator=gen).int()
    h_cache = torch.randn(1, hidden, n, device=DEV, generator=gen).to(dtype).transpose(1, 2)
    o_cache = torch.randn(1, n, d_out, device=DEV, generator=gen).to(dtype)
    ref_h, ref_o = h_cache.float(), o_cache.float()
    sparse_mlp_delta_reference(x, w1, None, w2, units, counts, order, block, ref_h, ref_o, hidden_in_block_order=True)
    k_h, k_o, result = h_cache.clone(), o_cache.clone(), torch.full_like(o_cache, float("nan"))
    sparse_mlp_delta_triton(x, w1, None, w2.t().contiguous().t(), units, counts, order, block, k_h, k_o,
                            hidden_in_block_order=True, result=result)
    label = f"mlp block-order hidden + result n{n} {str(dtype)[6:]}"
    check(label + " hidden", k_h, ref_h, dtype)
    check(label + " out update", k_o.float() - o_cache.float(), ref_o - o_cache.float(), dtype)
    check_equal(label + " result == out", (result,), (k_o,))


def selection_cases(gen):
    """The index lists and the kernels around them, at the sizes that matter (tiny on the CPU)."""
    big = DEV == "cuda"
    text = torch.arange(512 if big else 8, device=DEV)
    n = 4608 if big else 300
    index_list_case((1, 24 if big else 1, 24 if big else 2, n), round(0.165 * n), 0, text, gen)
    index_list_case((2, 24 if big else 1, 24 if big else 2, n), round(0.165 * n), round(0.01 * n), text, gen,
                    ties=True)
    if big:  # rows longer than one chunk of the kernel (WAN / HunyuanVideo lengths), per-group forced keys
        window = torch.randint(-1, 75600, (4, 3000), device=DEV, generator=gen)
        index_list_case((1, 2, 4, 75600), 7560, 756, window, gen)
        paged_lists_case(1, 2, 75600, 192, 8316, torch.bfloat16, gen)
    rank_units_case(36 if big else 2, 12288 if big else 300, round(0.3 * (12288 if big else 300)),
                    round(0.05 * (12288 if big else 300)), gen)
    for dtype in (torch.bfloat16, torch.float16):
        block_means_case(4608 if big else 200, 3072 if big else 64, 128, dtype, gen)
        for samples in (32, 16):
            sampled_case(4608 if big else 300, 24 if big else 2, 192, samples, dtype, gen)
        mlp_block_order_case(700, dtype, gen)
        transpose_cases(dtype, big)


def transpose_cases(dtype, big):
    """fc2 into the second launch's layout: FLUX's double-block fc2 ([3072, 12288]) and its single
    blocks' MLP part of linear2 (a column slice of [3072, 15360]); a ragged shape (bit for bit)."""
    shapes = [((3072, 12288), 0), ((3072, 15360), 3072), ((1000, 3000), 0)] if big else [((70, 130), 0), ((64, 192), 64)]
    for (rows, cols), skip in shapes:
        src = torch.randn(rows, cols, device=DEV).to(dtype)[:, skip:]
        out = torch.full(src.shape[::-1], float("nan"), device=DEV, dtype=dtype)
        check_equal(f"transpose {rows}x{cols - skip}{' (slice)' if skip else ''} {str(dtype)[6:]}",
                    [transpose_into_triton(src, out)], [transpose_into_reference(src, torch.empty_like(out))])


def main():
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    gen = torch.Generator(device=DEV).manual_seed(0)
    print(torch.cuda.get_device_name() if DEV == "cuda" else DEV, torch.__version__, flush=True)
    if os.environ.get("CHIPMUNK_PARITY_ONLY") == "fp8":  # the fp8 caches alone (a short device call)
        fp8_cache_case(1, 4, 4608, 192, 768, torch.bfloat16, gen)
        fp8_hidden_case(4608, torch.bfloat16, gen)
        print(f"{len(failures)} case(s) off" if failures else "all cases match")
        sys.exit(1 if failures else 0)
    for dtype in (torch.bfloat16, torch.float16) if DEV == "cuda" else (torch.float16,):
        for group in (192, 128, 256):
            for config in bench_sweeps.sparse_configs(True, group) + [{}]:
                sparse_case(2, 3, 1000, group, 300, dtype, config, gen)
            sparse_case(2, 3, 1000, group, 300, dtype, {}, gen, with_base=False)
        for config in bench_sweeps.dense_configs(True) + [{}]:
            for offset in (0.0, 60.0, -60.0, float("inf")):
                dense_case(1, 2, 700, 192, dtype, config, offset, gen)
        dense_case(2, 2, 500, 192, dtype, {}, None, gen)
        for config in ({}, {"tma": False}):
            dense_case(2, 3, 600, 192, dtype, config, 0.0, gen, layout="bnhd")
            dense_case(1, 2, 600, 192, dtype, config, 0.0, gen, layout="bnhd", n_keys=537)
            dense_case(1, 2, 600, 192, dtype, config, None, gen, layout="bnhd", n_keys=537)
        for config in bench_sweeps.mlp_configs(True) + [{}]:
            mlp_case(700, dtype, config, gen)
        if DEV != "cuda" or torch.cuda.get_device_capability() >= (8, 9):
            fp8_cache_case(1, 4, 4608 if DEV == "cuda" else 300, 192, 768 if DEV == "cuda" else 64, dtype, gen)
            if DEV == "cuda":
                fp8_hidden_case(4608, dtype, gen)
    selection_cases(gen)
    print(f"{len(failures)} case(s) off" if failures else "all cases match")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
