"""Benchmark of the Chipmunk Triton kernels against the fastest dense kernels on this machine.

    python bench/kernels.py [--ops sparse,dense,mlp] [--shapes flux,wan,hunyuan] [--sweep] [--json PATH]

For every op and shape: the dense baselines (torch SDPA as called plainly and with each backend
forced; cuBLAS F.linear + GELU + F.linear for the MLP), the Triton kernel (default configuration,
or every configuration of a sweep), the median time (triton.testing.do_bench, L2 flushed between
runs), speedup over the fastest dense baseline, effective TFLOP/s, relative error against a
float32 reference at the same shape (on the first two heads for attention, to keep the float32
reference affordable) and a NaN check. Prints a table and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `kernels`

from kernels import build_index_lists  # noqa: E402
from kernels.attention_reference import (  # noqa: E402
    attention_with_column_sums_reference,
    column_sparse_attention_reference,
)
from kernels.attention_triton import (  # noqa: E402
    attention_with_column_sums_triton,
    column_sparse_attention_triton,
)
from kernels.mlp_reference import sparse_mlp_delta_reference  # noqa: E402
from kernels.mlp_triton import sparse_mlp_delta_triton, transpose_into_triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import bench_ms, keep_count, random_lists, rel_err  # noqa: E402

# name: (batch, heads, tokens, head_dim, keep fraction of the sparse attention)
ATTENTION_SHAPES = {
    "flux": (1, 24, 4608, 128, 0.165),
    "flux2048": (1, 24, 16896, 128, 0.165),
    "wan": (1, 40, 75600, 128, 0.10),
    "hunyuan": (1, 24, 119056, 128, 0.07),
}
# name: (tokens, d_in, hidden, d_out, keep fraction, row block)
MLP_SHAPES = {"flux": (4608, 3072, 12288, 3072, 0.30, 128), "flux2048": (16896, 3072, 12288, 3072, 0.30, 128)}
DTYPE = torch.bfloat16


def sdpa_baselines(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    variants = {"sdpa (plain call)": None, "sdpa cudnn": SDPBackend.CUDNN_ATTENTION,
                "sdpa flash": SDPBackend.FLASH_ATTENTION}
    fns = {}
    for name, backend in variants.items():
        if backend is None:
            fns[name] = lambda: F.scaled_dot_product_attention(q, k, v)
        else:
            def run(backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v)
            fns[name] = run
    return fns


def time_baselines(fns, flops, expected_ms, rows, common):
    best = None
    for name, fn in fns.items():
        try:
            fn()
            torch.cuda.synchronize()
            ms = bench_ms(fn, expected_ms)
        except Exception as exc:  # a backend missing on this build
            print(f"  {name}: unavailable ({type(exc).__name__}: {str(exc)[:80]})")
            continue
        rows.append({**common, "variant": name, "kind": "dense", "ms": ms, "tflops": flops / ms / 1e9})
        best = ms if best is None else min(best, ms)
    return best


def sparse_configs(sweep, group_size, explicit=None):
    """Configurations to time for one group size (``{}`` = the launcher's default)."""
    if explicit:
        return explicit
    if not sweep:
        return [{}]
    entries = {  # rows per tile, block_n, warps, stages, register cap (the tile's rows divide the group)
        128: [(128, 128, 8, 2, None), (128, 64, 8, 2, None), (128, 64, 8, 2, 128)],
        192: [(64, 64, 4, 3, None), (64, 64, 4, 4, None), (64, 32, 4, 3, None)],
        256: [(128, 128, 8, 2, None), (128, 64, 8, 2, 128), (256, 64, 16, 2, None), (256, 128, 16, 2, None),
              (256, 32, 16, 3, None)],
    }.get(group_size, [])
    configs = []
    for rows, bn, w, st, reg in entries:
        configs.append({"block_m": rows, "block_n": bn, "num_warps": w, "num_stages": st,
                        **({"maxnreg": reg} if reg else {})})
    return configs or [{}]


def dense_configs(sweep, explicit=None):
    if explicit:
        return explicit
    if not sweep:
        return [{}]
    fixed = [{"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": st}
             for bm, bn, w, st in ((128, 128, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 3),
                                   (64, 128, 4, 3))]
    fixed.append({"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 2, "maxnreg": 128})
    # keys and values through the copy engine (tensor descriptors; sm_90+)
    fixed = [{**config, "tma": False} for config in fixed]  # the portable path (the default on sm_90 is TMA)
    tma = [{"tma": True, "block_m": 128, "block_n": bn, "num_warps": 8, "num_stages": st}
           for bn, st in ((64, 3), (64, 4), (128, 2))]
    return fixed + tma + [{"fixed_max": False}]


def attention_setup(op, shape_name, seed, args, rows, baseline_fields):
    """Random q, k, v at a named shape and the SDPA baselines timed on them (rows appended)."""
    batch, heads, n, d, _ = ATTENTION_SHAPES[shape_name]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=DTYPE, generator=gen) for _ in range(3))
    flops = 4 * batch * heads * n * n * d
    common = {"op": op, "shape": shape_name, "B": batch, "H": heads, "N": n, "D": d}
    dense_ms = time_baselines(sdpa_baselines(q, k, v), flops, args.expected.get(shape_name, 1.0), rows,
                              {**common, **baseline_fields})
    return gen, q, k, v, flops, common, dense_ms


def bench_sparse_attention(shape_name, args, rows):
    batch, heads, n, d, keep = ATTENTION_SHAPES[shape_name]
    dev = "cuda"
    gen, q, k, v, _, common, dense_ms = attention_setup("column_sparse_attention", shape_name, 0, args, rows,
                                                        {"sparsity": 0.0})
    for group_size in args.group_sizes:
        n_groups = math.ceil(n / group_size)
        count = keep_count(n, keep)
        indices = random_lists((batch, heads, n_groups), n, count, dev, gen)
        counts = torch.full((batch, heads, n_groups), count, dtype=torch.int32, device=dev)
        sparse_flops = 4 * batch * heads * n * count * d
        orders = {"identity": torch.arange(n, dtype=torch.int32, device=dev),
                  "random": torch.randperm(n, device=dev, generator=gen).int()}
        cache = torch.randn(batch, heads, n, d, device=dev, dtype=DTYPE, generator=gen)
        # float32 reference of the restricted attention on the first two heads
        h_ref = min(2, heads)
        ref = torch.empty(batch, h_ref, n, d, device=dev, dtype=torch.float32)
        column_sparse_attention_reference(q[:, :h_ref], k[:, :h_ref], v[:, :h_ref], indices[:, :h_ref],
                                          counts[:, :h_ref], orders["random"], group_size, None, ref, 1.0)
        for config in sparse_configs(args.sweep, group_size, args.sparse_configs):
            for order_name in (["identity", "random"] if not args.sweep else ["random"]):
                order = orders[order_name]
                try:
                    out = torch.full_like(q, float("nan"))
                    column_sparse_attention_triton(q, k, v, indices, counts, orders["random"], group_size,
                                                   None, out, 1.0, config=config)
                    err = rel_err(out[:, :h_ref], ref)
                    nan = bool(out.isnan().any())
                    ms = bench_ms(lambda: column_sparse_attention_triton(
                        q, k, v, indices, counts, order, group_size, cache, cache, 1.0, config=config),
                        args.expected.get(shape_name, 1.0) * count / n)
                    nan = nan or bool(cache.isnan().any())
                except Exception as exc:
                    print(f"  sparse {config}: failed ({type(exc).__name__}: {str(exc)[:120]})")
                    continue
                rows.append({**common, "variant": f"chipmunk G={group_size} order={order_name}", "kind": "sparse",
                             "config": {k_: str(v_) for k_, v_ in config.items()}, "group_size": group_size,
                             "sparsity": 1 - count / n, "keys_per_group": count, "ms": ms,
                             "dense_ms": dense_ms, "speedup": dense_ms / ms, "tflops": sparse_flops / ms / 1e9,
                             "ideal_speedup": n / count, "rel_err": err, "nan": nan})
                print(f"  {shape_name} G={group_size} {order_name:8s} {config}: {ms:.3f} ms  x{dense_ms / ms:.2f}"
                      f"  {sparse_flops / ms / 1e9:.0f} TFLOP/s  err {err:.2e}{'  NaN!' if nan else ''}", flush=True)
    del q, k, v
    torch.cuda.empty_cache()


def bench_dense_attention(shape_name, args, rows):
    batch, heads, n, d, _ = ATTENTION_SHAPES[shape_name]
    dev = "cuda"
    gen, q, k, v, flops, common, dense_ms = attention_setup("attention_with_column_sums", shape_name, 1, args, rows,
                                                            {})
    expected = args.expected.get(shape_name, 1.0)
    group_size = args.group_sizes[0]
    order = torch.randperm(n, device=dev, generator=gen).int()
    h_ref = min(2, heads)
    # the hint: exact row log-sum-exp (what the previous dense step leaves, up to drift)
    out = torch.empty_like(q)
    _, lse_exact = attention_with_column_sums_triton(q, k, v, order, group_size, out, None,
                                                     config={"column_sums": False})
    lse_hint = lse_exact + 0.05 * torch.randn(lse_exact.shape, device=dev, generator=gen)
    ref_out = torch.empty(batch, h_ref, n, d, device=dev, dtype=torch.float32)
    ref_sums, ref_lse = attention_with_column_sums_reference(q[:, :h_ref], k[:, :h_ref], v[:, :h_ref], order,
                                                             group_size, ref_out, lse_hint[:, :h_ref])
    variants = []
    for config in dense_configs(args.sweep, args.dense_configs):
        variants.append(("with lse_hint", config, lse_hint))
    if not args.sweep and not args.dense_configs:
        variants.append(("with lse_hint, no TMA", {"tma": False}, lse_hint))
    variants.append(("no column sums (pure attention)", {"column_sums": False}, None))
    variants.append(("no column sums (pure attention), no TMA", {"column_sums": False, "tma": False}, None))
    variants.append(("exact, no lse_hint (two passes)", {}, None))
    for label, config, hint in variants:
        try:
            out = torch.full_like(q, float("nan"))
            sums, lse = attention_with_column_sums_triton(q, k, v, order, group_size, out, hint, config=config)
            err = rel_err(out[:, :h_ref], ref_out)
            lse_err = float((lse[:, :h_ref] - ref_lse).abs().max())
            sums_err = rel_err(sums[:, :h_ref], ref_sums) if (sums is not None and hint is not None) else None
            nan = bool(out.isnan().any()) or bool(lse.isnan().any()) or (sums is not None and bool(sums.isnan().any()))
            del sums
            ms = bench_ms(lambda: attention_with_column_sums_triton(q, k, v, order, group_size, out, hint,
                                                                   config=config), expected)
        except Exception as exc:
            print(f"  dense {label} {config}: failed ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        rows.append({**common, "variant": f"chipmunk {label} G={group_size}", "kind": "column_sums",
                     "config": {k_: str(v_) for k_, v_ in config.items()}, "group_size": group_size, "ms": ms,
                     "dense_ms": dense_ms, "ratio_to_dense": ms / dense_ms, "tflops": flops / ms / 1e9,
                     "rel_err": err, "lse_max_abs_err": lse_err, "column_sums_rel_err": sums_err, "nan": nan})
        print(f"  {shape_name} {label} {config}: {ms:.3f} ms  {ms / dense_ms:.3f}x dense  {flops / ms / 1e9:.0f} TFLOP/s"
              f"  err {err:.2e} lse {lse_err:.1e} sums {sums_err}{'  NaN!' if nan else ''}", flush=True)
    # what the dense step does next: top-k index lists from the column sums
    keep = ATTENTION_SHAPES[shape_name][4]
    try:
        sums, _ = attention_with_column_sums_triton(q, k, v, order, group_size, out, lse_hint)
        seeds = torch.full((batch,), 3, dtype=torch.int64, device=dev)
        count, n_random = keep_count(n, keep), round(0.01 * n)
        ms = bench_ms(lambda: build_index_lists(sums, count, n_random, row_seeds=seeds), expected)
        rows.append({**common, "op": "build_index_lists", "variant": f"top-{count} + {n_random} random of {n}",
                     "kind": "index", "ms": ms, "dense_ms": dense_ms, "ratio_to_dense": ms / dense_ms, "tflops": 0.0})
        print(f"  {shape_name} build_index_lists: {ms:.3f} ms ({ms / dense_ms:.3f}x dense attention)", flush=True)
        del sums
    except torch.cuda.OutOfMemoryError as exc:
        print(f"  {shape_name} build_index_lists: out of memory ({str(exc)[:80]})")
    del q, k, v
    torch.cuda.empty_cache()


def mlp_configs(sweep, explicit=None):
    if explicit:
        return explicit
    if not sweep:
        return [{}]
    ups = [{"block_n": bn, "block_k": 64, "num_warps": 8, "num_stages": st, "band_rows": band}
           for bn, st in ((128, 4), (256, 3)) for band in (0, 4, 8, 16, 32)]
    downs = [{"block_n": bn, "block_k": 64, "num_warps": 8, "num_stages": 3, "band_rows": band}
             for bn in (128, 256) for band in (0, 8, 16, 32)]
    return [{"up": up} for up in ups] + [{"down": down} for down in downs]


def bench_mlp(shape_name, args, rows):
    n, d_in, hidden, d_out, keep, block = MLP_SHAPES[shape_name]
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(2)
    x = torch.randn(1, n, d_in, device=dev, dtype=DTYPE, generator=gen)
    w1 = (torch.randn(hidden, d_in, device=dev, generator=gen) * d_in ** -0.5).to(DTYPE)
    b1 = (torch.randn(hidden, device=dev, generator=gen) * 0.1).to(DTYPE)
    w2 = (torch.randn(d_out, hidden, device=dev, generator=gen) * hidden ** -0.5).to(DTYPE)
    w2_t = w2.t().contiguous()
    flops = 2 * 2 * n * d_in * hidden
    common = {"op": "sparse_mlp_delta", "shape": shape_name, "N": n, "D_in": d_in, "hidden": hidden, "D_out": d_out}

    def dense():
        return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2)

    dense_ms = time_baselines({"cublas fc1+gelu+fc2": dense}, flops, 1.0, rows, {**common, "sparsity": 0.0})
    time_baselines({"cublas fc1 only": lambda: F.linear(x, w1, b1)}, flops / 2, 1.0, rows, {**common, "sparsity": 0.0})
    n_blocks = math.ceil(n / block)
    count = keep_count(hidden, keep)
    units = random_lists((1, n_blocks), hidden, count, dev, gen)
    counts = torch.full((1, n_blocks), count, dtype=torch.int32, device=dev)
    order = torch.randperm(n, device=dev, generator=gen).int()
    sparse_flops = 2 * 2 * n * d_in * count
    hidden_cache = F.gelu(F.linear(x, w1, b1), approximate="tanh") + 0.01 * torch.randn(
        1, n, hidden, device=dev, generator=gen, dtype=DTYPE)
    out_cache = torch.randn(1, n, d_out, device=dev, dtype=DTYPE, generator=gen)
    # float32 caches for the error check, so that the error measures the kernel and not cache rounding
    h32, o32 = hidden_cache.float(), out_cache.float()
    # hidden_cache as the unit-major buffer [B, M, N] seen through .transpose(1, 2), with the rows
    # already in block order (row_order None): the scattered hidden-cache stores become contiguous.
    hidden_cache_t = hidden_cache.transpose(1, 2).contiguous().transpose(1, 2)
    variants = (("w2 [Dout,M]; hidden [B,N,M]", w2, order, hidden_cache),
                ("w2_t.t(); hidden [B,N,M]", w2_t.t(), order, hidden_cache),
                ("w2_t.t(); hidden [B,M,N].mT, no row_order", w2_t.t(), None, hidden_cache_t))
    if args.sweep:  # configurations are compared on the fastest layout only
        variants = variants[-1:]
    for layout, w2_arg, order_arg, hidden_arg in variants:
        for config in mlp_configs(args.sweep, args.mlp_configs):
            try:
                # (from the float32 copy: the timed runs below update hidden_arg in place)
                h_k = h32.transpose(1, 2).contiguous().transpose(1, 2) if order_arg is None else h32.clone()
                o_k = o32.clone()
                h_r, o_r = h32.clone(), o32.clone()
                sparse_mlp_delta_reference(x, w1, b1, w2, units, counts, order_arg, block, h_r, o_r)
                sparse_mlp_delta_triton(x, w1, b1, w2_arg, units, counts, order_arg, block, h_k, o_k, config=config)
                err = rel_err(o_k - o32, o_r - o32)
                h_err = rel_err(h_k, h_r)
                nan = bool(o_k.isnan().any() or h_k.isnan().any())
                ms = bench_ms(lambda: sparse_mlp_delta_triton(x, w1, b1, w2_arg, units, counts, order_arg, block,
                                                              hidden_arg, out_cache, config=config))
                nan = nan or bool(out_cache.isnan().any())
            except Exception as exc:
                print(f"  mlp {layout} {config}: failed ({type(exc).__name__}: {str(exc)[:120]})")
                continue
            parts = {stage: bench_ms(lambda: sparse_mlp_delta_triton(
                x, w1, b1, w2_arg, units, counts, order_arg, block, hidden_arg, out_cache,
                config={**config, "stages": (stage,)})) for stage in ("up", "down")}
            rows.append({**common, "variant": f"chipmunk {layout}", "kind": "sparse", "sparsity": 1 - count / hidden,
                         "up_ms": parts["up"], "down_ms": parts["down"],
                         "units_per_block": count, "config": json.dumps(config), "ms": ms, "dense_ms": dense_ms,
                         "speedup": dense_ms / ms, "tflops": sparse_flops / ms / 1e9, "ideal_speedup": hidden / count,
                         "rel_err": err, "hidden_rel_err": h_err, "nan": nan})
            print(f"  mlp {layout} {config}: {ms:.3f} ms (up {parts['up']:.3f}, down {parts['down']:.3f}) "
                  f"x{dense_ms / ms:.2f} {sparse_flops / ms / 1e9:.0f} TFLOP/s"
                  f" err {err:.2e} hidden {h_err:.1e}{'  NaN!' if nan else ''}", flush=True)


TRANSPOSE_CONFIGS = [{"block_r": 64, "block_c": 64, "num_warps": 4}, {"block_r": 32, "block_c": 32, "num_warps": 4},
                     {"block_r": 128, "block_c": 64, "num_warps": 8}, {"block_r": 64, "block_c": 128, "num_warps": 8},
                     {"block_r": 128, "block_c": 128, "num_warps": 8}, {"block_r": 32, "block_c": 128, "num_warps": 4}]


def bench_transpose(shape_name, args, rows):
    """fc2 into the sparse MLP's layout once per sparse step: FLUX's double-block fc2 and the MLP
    part of a single block's linear2 (a column slice); torch's copies against the Triton kernel."""
    _, _, hidden, d_out, _, _ = MLP_SHAPES[shape_name]
    dev = "cuda"
    for label, width, skip in (("fc2 [Dout, M]", hidden, 0), ("linear2[:, D:] slice", hidden + d_out, d_out)):
        src = torch.randn(d_out, width, device=dev).to(DTYPE)[:, skip:]
        out = torch.empty(src.shape[::-1], device=dev, dtype=DTYPE)
        traffic = 2 * src.numel() * src.element_size()
        common = {"op": "transpose_into", "shape": shape_name, "rows": d_out, "cols": hidden, "tflops": 0.0}
        variants = {"torch .t().contiguous()": lambda: src.t().contiguous(),
                    "torch out.copy_(src.t())": lambda: out.copy_(src.t())}
        for config in TRANSPOSE_CONFIGS if args.sweep else [{}]:
            variants[f"triton {json.dumps(config)}"] = lambda config=config: transpose_into_triton(src, out, config)
        for name, fn in variants.items():
            fn()
            ok = torch.equal(out, src.t()) if name.startswith("triton") else True
            ms = bench_ms(fn)
            rows.append({**common, "variant": f"{label}: {name}", "kind": "transpose", "ms": ms,
                         "gb_per_s": traffic / ms / 1e6, "equal": ok})
            print(f"  transpose {label}: {name}: {ms:.4f} ms, {traffic / ms / 1e6:.0f} GB/s{'' if ok else '  DIFFERS!'}",
                  flush=True)


def print_table(rows):
    header = f"{'op':27s} {'shape':8s} {'variant':44s} {'ms':>9s} {'speedup':>8s} {'TFLOP/s':>8s} {'rel err':>9s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        speed = r.get("speedup") or (1 / r["ratio_to_dense"] if r.get("ratio_to_dense") else None)
        print(f"{r['op'][:27]:27s} {r['shape']:8s} {r['variant'][:44]:44s} {r['ms']:9.3f} "
              f"{'' if speed is None else f'{speed:.2f}x':>8s} {r['tflops']:8.0f} "
              f"{'' if r.get('rel_err') is None else format(r['rel_err'], '.2e'):>9s}"
              f"{'  NaN!' if r.get('nan') else ''}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="sparse,dense,mlp")
    parser.add_argument("--shapes", default="flux,wan,hunyuan")
    parser.add_argument("--group-sizes", default="192,256", help="query group sizes for the sparse attention")
    parser.add_argument("--sweep", action="store_true", help="time every kernel configuration, not just the default")
    parser.add_argument("--json", default=None, help="default: bench/results/kernels_<gpu>.json")
    parser.add_argument("--dense-configs", default=None,
                        help="JSON list of dense-attention configurations to time instead of the sweep")
    parser.add_argument("--sparse-configs", default=None,
                        help='JSON list of sparse-attention configurations to time instead of the sweep, '
                             'e.g. \'[{"block_n": 32, "num_stages": 3, "maxnreg": 168}]\'')
    parser.add_argument("--mlp-configs", default=None,
                        help='JSON list of MLP configurations to time instead of the sweep, e.g. '
                             '\'[{"up": {"band_rows": 16}, "down": {"band_rows": 16}}]\'')
    args = parser.parse_args()
    args.mlp_configs = json.loads(args.mlp_configs) if args.mlp_configs else None
    args.group_sizes = [int(g) for g in args.group_sizes.split(",")]
    args.sparse_configs = json.loads(args.sparse_configs) if args.sparse_configs else None
    args.dense_configs = json.loads(args.dense_configs) if args.dense_configs else None
    # rough dense times (ms) so that slow shapes get few repetitions
    args.expected = {"flux": 0.4, "flux2048": 5.5, "wan": 200.0, "hunyuan": 320.0}
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "dtype": str(DTYPE), "command": " ".join(Path(a).name if Path(a).is_absolute() else a for a in sys.argv)}
    print(meta, flush=True)
    rows = []
    ops = args.ops.split(",")
    for shape in args.shapes.split(","):
        if "sparse" in ops and shape in ATTENTION_SHAPES:
            bench_sparse_attention(shape, args, rows)
        if "dense" in ops and shape in ATTENTION_SHAPES:
            bench_dense_attention(shape, args, rows)
        if "mlp" in ops and shape in MLP_SHAPES:
            bench_mlp(shape, args, rows)
        if "transpose" in ops and shape in MLP_SHAPES:
            bench_transpose(shape, args, rows)
    gpu = meta["device"].replace("NVIDIA ", "").split()[0].lower()
    path = Path(args.json or Path(__file__).resolve().parent / "results" / f"kernels_{gpu}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print()
    print_table(rows)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
