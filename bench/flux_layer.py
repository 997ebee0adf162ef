"""What one FLUX layer's Chipmunk steps cost, eager and replayed as CUDA graphs, at three image sizes.

    python bench/flux_layer.py [--shapes 1024,1280x768,2048] [--json PATH]

FLUX.1 shapes: 24 heads of 128, 512 text tokens, MLP 3072 -> 12288 -> 3072 over every token (a
single block); default settings of the pack (83.5% attention sparsity, 70% MLP sparsity + 5%
random units, query groups of 192, row blocks of 128). Per image size:
- SDPA: one plain ``F.scaled_dot_product_attention`` call (cuDNN on Hopper): what stock ComfyUI runs.
- attention dense step with key selection, per key-scoring mode (exact column sums with the previous
  step's lse; sums over 32 or 16 sampled queries per group), and its parts (scores, lists, cache pass).
- attention dense step that keeps its lists (SDPA + cache pass), and the sparse step.
- MLP: the cuBLAS MLP, the sparse step with and without ranking, the ranking's parts, the dense step.
Every step is timed three ways: GPU time of an eager call (``triton.testing.do_bench`` median,
L2 flushed; includes the gaps when the host issues launches slower than the GPU runs them), the
host time to issue one call (no synchronisation), and one replay of the step captured as a CUDA
graph. Launches per step are counted with ``torch.profiler``. Random bf16 data; a sanity check of
each step's output against dense math is printed with it. Prints a table, writes JSON (device,
torch, triton). Needs a CUDA GPU; no ComfyUI. About 2 minutes on an H200.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
HEADS, HEAD_DIM, TEXT, WIDTH, HIDDEN = 24, 128, 512, 3072, 12288
SHAPES = {"1024": (1024, 1024), "1280x768": (1280, 768), "2048": (2048, 2048),  # width x height in pixels
          "smoke": (96, 64)}
DTYPE = torch.bfloat16
DEVICE = "cuda"  # --smoke: "cpu" (the script's own logic on tiny shapes, PyTorch reference kernels)
HOST_CALLS = 20  # calls per host-time measurement


def import_pack():
    """The core and the kernels as subpackages of the pack (their relative imports need it)."""
    if "chipmunk_pack" not in sys.modules:
        package = types.ModuleType("chipmunk_pack")
        package.__path__ = [str(ROOT)]
        sys.modules["chipmunk_pack"] = package
    import importlib
    return types.SimpleNamespace(**{name: importlib.import_module(f"chipmunk_pack.{path}") for name, path in (
        ("attention", "chipmunk_core.attention"), ("mlp", "chipmunk_core.mlp"), ("config", "chipmunk_core.config"),
        ("layout", "chipmunk_core.layout"), ("kernels", "kernels"))})


def rel_err(out, ref):
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def host_us(fn):
    """Microseconds of host time to issue one call (the GPU is not waited for in between)."""
    synchronize()
    start = time.perf_counter()
    for _ in range(HOST_CALLS):
        fn()
    elapsed = time.perf_counter() - start
    synchronize()
    return elapsed / HOST_CALLS * 1e6


def graph_ms(fn, bench_ms):
    """Median time of one replay of ``fn`` captured as a CUDA graph (None if it cannot be captured)."""
    if DEVICE != "cuda":
        return None
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        return bench_ms(graph.replay)
    except Exception as exc:  # report, go on
        print(f"    (not capturable: {type(exc).__name__}: {str(exc)[:100]})", flush=True)
        torch.cuda.synchronize()
        return None


def launches(fn):
    """GPU kernels (and memsets/copies) that one call of ``fn`` launches."""
    if DEVICE != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


class Table:
    def __init__(self, meta):
        self.meta = meta
        self.rows = []

    def measure(self, shape, step, variant, fn, bench_ms, sdpa_ms=None, parts_only=False, **extra):
        fn()
        synchronize()
        row = {"shape": shape, "step": step, "variant": variant, "eager_ms": bench_ms(fn), **extra}
        if not parts_only:
            row["host_us"] = host_us(fn)
            row["graph_ms"] = graph_ms(fn, bench_ms)
            row["launches"] = launches(fn)
        if sdpa_ms:
            row["x_sdpa_eager"] = row["eager_ms"] / sdpa_ms
            if row.get("graph_ms"):
                row["x_sdpa_graph"] = row["graph_ms"] / sdpa_ms
        self.rows.append(row)
        print(f"  {shape:8s} {step:30s} {variant:34s} eager {row['eager_ms']:.3f} ms"
              + (f"  graph {row['graph_ms']:.3f} ms" if row.get("graph_ms") else "")
              + (f"  host {row['host_us']:.0f} us  launches {row['launches']}" if not parts_only else "")
              + (f"  {row['x_sdpa_eager']:.2f}x SDPA" if sdpa_ms else "")
              + "".join(f"  {k} {v:.2e}" if isinstance(v, float) else f"  {k} {v}" for k, v in extra.items()),
              flush=True)
        return row

    def print(self):
        header = (f"{'shape':8s} {'step':30s} {'variant':34s} {'eager ms':>9s} {'graph ms':>9s} {'host us':>8s} "
                  f"{'launch':>6s} {'x SDPA':>7s}")
        print(header)
        print("-" * len(header))
        for r in self.rows:
            graph = r.get("graph_ms")
            print(f"{r['shape']:8s} {r['step'][:30]:30s} {r['variant'][:34]:34s} {r['eager_ms']:9.3f} "
                  f"{'' if graph is None else format(graph, '9.3f'):>9s} "
                  f"{'' if 'host_us' not in r else format(r['host_us'], '8.0f'):>8s} "
                  f"{'' if r.get('launches') is None else str(r['launches']):>6s} "
                  f"{'' if 'x_sdpa_eager' not in r else format(r['x_sdpa_eager'], '7.2f'):>7s}")


def bench_attention(pack, shape, grid, table, bench_ms):
    n_image = math.prod(grid)
    n = n_image + TEXT
    layout = pack.layout.joint_layout(TEXT, grid, n_image, True, 192, DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    # views of [B, N, H, D] buffers, as the model's projections give them
    q, k, v, q2, k2, v2 = (torch.randn(1, n, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen)
                           .transpose(1, 2) for _ in range(6))
    seeds = torch.tensor([1234], device=DEVICE, dtype=torch.int64)
    reference = F.scaled_dot_product_attention(q2, k2, v2).transpose(1, 2).reshape(1, n, -1)
    sdpa = table.measure(shape, "SDPA (stock attention)", "F.scaled_dot_product_attention",
                         lambda: F.scaled_dot_product_attention(q2, k2, v2), bench_ms, n=n)["eager_ms"]
    for label, queries in (("exact sums, lse hint", 0), ("32 sampled queries/group", 32),
                           ("16 sampled queries/group", 16)):
        config = pack.config.resolve_config("flux", attention_score_queries=queries)
        state = pack.attention.SparseDeltaAttention()
        for inputs in ((q, k, v), (q2, k2, v2)):  # the second dense step has the first one's lse
            out = state.dense_step(*inputs, layout, config, seeds, select=True)
        err = rel_err(out, reference)
        table.measure(shape, "attn dense step, selecting", label,
                      lambda: state.dense_step(q2, k2, v2, layout, config, seeds, select=True), bench_ms, sdpa,
                      err=err)
        keep = round(config.attention_keep * n)
        forced = pack.kernels.forced_columns(layout.forced_keys, n)
        if queries:
            scores = pack.kernels.sampled_column_sums(q2, k2, layout.query_order, 192, queries)
            table.measure(shape, "  part: key scores", label, lambda: pack.kernels.sampled_column_sums(
                q2, k2, layout.query_order, 192, queries), bench_ms, sdpa, parts_only=True)
        else:
            dense_out = torch.empty_like(q2)
            lse = state.lse
            scores, _ = pack.kernels.attention_with_column_sums(q2, k2, v2, layout.query_order, 192, dense_out, lse)
            table.measure(shape, "  part: attention + key scores", label, lambda: pack.kernels.attention_with_column_sums(
                q2, k2, v2, layout.query_order, 192, dense_out, lse), bench_ms, sdpa, parts_only=True)
        lists = (state.indices.clone(), state.counts.clone())
        table.measure(shape, "  part: index lists", label, lambda: pack.kernels.build_index_lists(
            scores, keep, 0, forced, seeds, 64, out=lists), bench_ms, sdpa, parts_only=True)
        del scores
    cache = torch.empty_like(q2)
    dense_view = F.scaled_dot_product_attention(q2, k2, v2)
    table.measure(shape, "  part: cache pass", "C = O - A_S", lambda: pack.kernels.column_sparse_attention(
        q2, k2, v2, state.indices, state.counts, layout.query_order, 192, dense_view, cache, -1.0), bench_ms, sdpa,
        parts_only=True)
    config = pack.config.resolve_config("flux")
    out = state.dense_step(q2, k2, v2, layout, config, seeds, select=False)
    table.measure(shape, "attn dense step, keeping lists", "SDPA + cache pass",
                  lambda: state.dense_step(q2, k2, v2, layout, config, seeds, select=False), bench_ms, sdpa,
                  err=rel_err(out, reference))
    again = state.sparse_step(q2, k2, v2, layout, config)
    table.measure(shape, "attn sparse step", "C + A_S (83.5% sparse)",
                  lambda: state.sparse_step(q, k, v, layout, config), bench_ms, sdpa,
                  err_right_after_dense=rel_err(again, reference))


def bench_mlp(pack, shape, grid, table, bench_ms):
    n = math.prod(grid) + TEXT
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(1, n, WIDTH, device=DEVICE, dtype=DTYPE, generator=gen)
    x2 = x + 0.3 * torch.randn(1, n, WIDTH, device=DEVICE, dtype=DTYPE, generator=gen)
    w1 = (torch.randn(HIDDEN, WIDTH, device=DEVICE, generator=gen) * WIDTH ** -0.5).to(DTYPE)
    b1 = (0.1 * torch.randn(HIDDEN, device=DEVICE, generator=gen)).to(DTYPE)
    w2 = (torch.randn(WIDTH, HIDDEN, device=DEVICE, generator=gen) * HIDDEN ** -0.5).to(DTYPE)
    order = pack.layout.joint_layout(TEXT, grid, math.prod(grid), True, 192, DEVICE).query_order
    config = pack.config.resolve_config("flux")
    seeds = torch.tensor([99], device=DEVICE, dtype=torch.int64)

    def dense_mlp(inp):
        return F.linear(F.gelu(F.linear(inp, w1, b1), approximate="tanh"), w2)

    cublas = table.measure(shape, "MLP dense (cuBLAS)", "fc1 + GELU + fc2", lambda: dense_mlp(x2), bench_ms)["eager_ms"]
    state = pack.mlp.SparseDeltaMLP()

    def dense_step():
        state.store_output(F.linear(state.dense_step(x, F.linear(x, w1, b1), order, config), w2))

    dense_step()
    table.measure(shape, "MLP dense step", "cuBLAS + caches", dense_step, bench_ms)
    out = state.sparse_step(x2, w1, b1, w2, order, config, seeds, rank=True)
    err = rel_err(out, dense_mlp(x2))
    for label, rank in (("with ranking", True), ("without ranking", False)):
        row = table.measure(shape, "MLP sparse step", label, lambda: state.sparse_step(
            x2, w1, b1, w2, order, config, seeds, rank=rank), bench_ms, deviation_from_dense=err)
        row["x_cublas_eager"] = row["eager_ms"] / cublas
        if row.get("graph_ms"):
            row["x_cublas_graph"] = row["graph_ms"] / cublas
    n_blocks = state.block_mean.shape[1]
    x_mean = torch.empty(1, n_blocks, WIDTH, device=DEVICE, dtype=DTYPE)
    table.measure(shape, "  part: block means of x", "one launch", lambda: pack.kernels.block_means(
        x2, order, config.mlp_block, out=x_mean), bench_ms, parts_only=True)
    table.measure(shape, "  part: fc1 of the means", "cuBLAS", lambda: F.linear(x_mean, w1, b1), bench_ms,
                  parts_only=True)
    current = F.linear(x_mean, w1, b1)
    means = state.block_mean.clone()
    table.measure(shape, "  part: rank + refresh", "one launch", lambda: pack.kernels.rank_units(
        current, means, round(config.mlp_keep * HIDDEN), round(config.mlp_random_fraction * HIDDEN), seeds,
        config.selection_tile, out=state._selection), bench_ms, parts_only=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--json", default=None, help="default: bench/results/flux_layer_<gpu>.json")
    parser.add_argument("--smoke", action="store_true", help="run the script's logic on the CPU at a tiny shape")
    args = parser.parse_args()
    global DEVICE, DTYPE, HEADS, HOST_CALLS
    if args.smoke:
        DEVICE, DTYPE, HEADS, HOST_CALLS, args.shapes = "cpu", torch.float32, 2, 1, "smoke"
    elif not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import triton
    from triton.testing import do_bench

    def bench_ms(fn):
        if DEVICE == "cuda":
            return do_bench(fn, warmup=25, rep=100, return_mode="median")
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    pack = import_pack()
    meta = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "dtype": str(DTYPE), "command": " ".join(Path(a).name if Path(a).is_absolute() else a for a in sys.argv)}
    print(meta, flush=True)
    table = Table(meta)
    started = time.time()
    for shape in args.shapes.split(","):
        width, height = SHAPES[shape]
        grid = (height // 16, width // 16)
        bench_attention(pack, shape, grid, table, bench_ms)
        bench_mlp(pack, shape, grid, table, bench_ms)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    meta["seconds"] = round(time.time() - started, 1)
    gpu = meta["device"].replace("NVIDIA ", "").split()[0].lower()
    path = Path(args.json or ROOT / "bench" / "results" / f"flux_layer_{gpu}.json")
    if args.smoke and not args.json:
        path = Path("/tmp") / "flux_layer_smoke.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": table.rows}, indent=1))
    print()
    table.print()
    print(f"\nwrote {path} ({meta['seconds']} s)")


if __name__ == "__main__":
    main()
