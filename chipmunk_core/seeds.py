"""Seeds for the random key and unit picks, one per batch row.

A row's picks depend only on the run's seed, which sample of the latent batch it is, whether it is
a cond or an uncond row, the layer and the step: the same seed gives the same picks whether a
sample is generated alone or in a batch, and whether cond and uncond are batched or not.
"""

from __future__ import annotations

import torch

_MASK = (1 << 63) - 1


def mix(*values: int) -> int:
    """A 63-bit hash of integers (splitmix64 steps), stable across processes and platforms."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 29
    return state & _MASK


def row_seeds(seed: int, batch: int, cond_or_uncond: tuple, step: int, device) -> torch.Tensor:
    """int64 [batch]: the seed of each row of a model call.

    ComfyUI stacks the conditionings of a call along the batch (``cond_or_uncond`` names each
    chunk: 0 cond, 1 uncond); within a chunk, row i is sample i of the latent batch.
    """
    chunks = max(1, len(cond_or_uncond))
    per_chunk = max(1, batch // chunks)
    values = [mix(seed, row % per_chunk, cond_or_uncond[min(row // per_chunk, chunks - 1)], step)
              for row in range(batch)]
    seeds = torch.tensor(values, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        # From page-locked memory without blocking: a plain copy would make the host wait for the
        # GPU at every model call (the caching host allocator keeps the buffer until it is read).
        return seeds.pin_memory().to(device, non_blocking=True)
    return seeds.to(device)
