"""One launch of each Chipmunk kernel at the FLUX shape (and the sparse attention at the WAN shape),
for Nsight Compute to read its hardware counters:

    ncu --clock-control none --section SpeedOfLight --section Occupancy --metrics lts__t_bytes.sum \\
        -k regex:"column_sparse|attention_with|mlp_delta" python bench/profile_kernels.py

The data and selections are the benchmark's (bench/kernels.py): random, sorted, uniform.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `kernels`
sys.path.append(str(Path(__file__).resolve().parent))  # after it: bench/kernels.py must not shadow `kernels`

from bench_utils import keep_count, random_lists  # noqa: E402
from kernels.attention_triton import attention_with_column_sums_triton, column_sparse_attention_triton  # noqa: E402
from kernels.mlp_triton import sparse_mlp_delta_triton  # noqa: E402

DEV, DTYPE = "cuda", torch.bfloat16


def sparse(heads, n, keep, group_size):
    gen = torch.Generator(device=DEV).manual_seed(0)
    q, k, v, cache = (torch.randn(1, heads, n, 128, device=DEV, dtype=DTYPE, generator=gen) for _ in range(4))
    count = keep_count(n, keep)
    n_groups = math.ceil(n / group_size)
    idx = random_lists((1, heads, n_groups), n, count, DEV, gen)
    counts = torch.full((1, heads, n_groups), count, dtype=torch.int32, device=DEV)
    order = torch.arange(n, dtype=torch.int32, device=DEV)
    print(f"sparse attention H={heads} N={n} G={group_size} keys/group={count}", flush=True)
    column_sparse_attention_triton(q, k, v, idx, counts, order, group_size, cache, cache, 1.0)


def dense(heads, n, column_sums):
    gen = torch.Generator(device=DEV).manual_seed(1)
    q, k, v = (torch.randn(1, heads, n, 128, device=DEV, dtype=DTYPE, generator=gen) for _ in range(3))
    out = torch.empty_like(q)
    order = torch.arange(n, dtype=torch.int32, device=DEV)
    _, lse = attention_with_column_sums_triton(q, k, v, order, 192, out, None, config={"column_sums": False})
    print(f"dense attention H={heads} N={n} column sums={column_sums}", flush=True)
    if column_sums:
        attention_with_column_sums_triton(q, k, v, order, 192, out, lse)


def mlp(n=4608, d=3072, hidden=12288, keep=0.30, block=128):
    gen = torch.Generator(device=DEV).manual_seed(2)
    x = torch.randn(1, n, d, device=DEV, dtype=DTYPE, generator=gen)
    w1 = (torch.randn(hidden, d, device=DEV, generator=gen) * d ** -0.5).to(DTYPE)
    b1 = torch.zeros(hidden, device=DEV, dtype=DTYPE)
    w2_t = (torch.randn(hidden, d, device=DEV, generator=gen) * hidden ** -0.5).to(DTYPE)
    n_blocks = math.ceil(n / block)
    count = keep_count(hidden, keep)
    units = random_lists((1, n_blocks), hidden, count, DEV, gen)
    counts = torch.full((1, n_blocks), count, dtype=torch.int32, device=DEV)
    h_cache = torch.randn(1, hidden, n, device=DEV, dtype=DTYPE, generator=gen).transpose(1, 2)
    out_cache = torch.randn(1, n, d, device=DEV, dtype=DTYPE, generator=gen)
    print(f"sparse mlp N={n} {d}->{hidden}->{d} units/block={count}", flush=True)
    sparse_mlp_delta_triton(x, w1, b1, w2_t.t(), units, counts, None, block, h_cache, out_cache)


if __name__ == "__main__":
    sparse(24, 4608, 0.165, 192)
    sparse(24, 4608, 0.165, 256)
    sparse(40, 75600, 0.10, 192)
    sparse(40, 75600, 0.10, 256)
    dense(24, 4608, column_sums=True)
    mlp()
    torch.cuda.synchronize()
