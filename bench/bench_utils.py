"""Helpers shared by the benchmark scripts: timing, selection sizes, random index lists."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from triton.testing import do_bench


def bench_ms(fn, expected_ms=1.0):
    """Median milliseconds; the time budget grows with the expected duration so slow ops get a few runs."""
    rep = max(100.0, 6 * expected_ms)
    return do_bench(fn, warmup=max(25.0, 2 * expected_ms), rep=rep, return_mode="median")


def rel_err(out, ref):
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def keep_count(n, fraction, pad=64):
    return min(n, -(-round(fraction * n) // pad) * pad)


def random_lists(rows_shape, n_cols, count, device, generator):
    """Sorted random column lists [*rows_shape, count] (uniform subsets: no locality to exploit)."""
    rows = math.prod(rows_shape)
    out = torch.empty(rows, count, dtype=torch.int32, device=device)
    chunk = max(1, (1 << 28) // (n_cols * 4))
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        noise = torch.rand(stop - start, n_cols, device=device, generator=generator)
        out[start:stop] = torch.topk(noise, count, dim=-1).indices.sort(-1).values.int()
    return out.view(*rows_shape, count)


def best_mlp_configs(path, shape):
    """The fastest "up" and "down" kernel configurations of a ``kernels.py --ops mlp --sweep`` run
    at ``shape``, as the JSON the e2e variant "chipmunk mlp" reads (each part timed on its own)."""
    rows = [r for r in json.loads(Path(path).read_text())["rows"]
            if r.get("shape") == shape and r.get("up_ms") is not None]
    best = {}
    for part in ("up", "down"):
        timed = [(r[f"{part}_ms"], json.loads(r["config"])[part]) for r in rows if part in json.loads(r["config"])]
        if timed:
            best[part] = min(timed, key=lambda t: t[0])[1]
    return best


if __name__ == "__main__":  # python bench/bench_utils.py best-mlp RESULTS.json SHAPE
    if len(sys.argv) == 4 and sys.argv[1] == "best-mlp":
        print(json.dumps(best_mlp_configs(sys.argv[2], sys.argv[3])))
    else:
        sys.exit("usage: bench_utils.py best-mlp RESULTS.json SHAPE")
