"""Which sampling step a model call belongs to, and whether that step is dense or sparse."""

from __future__ import annotations

import torch

from .config import ChipmunkConfig


def step_index(sample_sigmas, sigma) -> int:
    """Index of the schedule entry nearest to the current sigma.

    Multi-evaluation samplers (heun, dpm_2) call the model at in-between sigmas: those calls map
    to the nearest step, which is what the caches were built for.
    """
    if sample_sigmas is None or sigma is None:
        return 0
    current = sigma.reshape(-1)[0].to(sample_sigmas.device, sample_sigmas.dtype)
    return int(torch.argmin((sample_sigmas - current).abs()).item())


class DenseSchedule:
    """The set of steps on which every Chipmunk layer recomputes densely and refreshes its caches.

    ``continues``: the run is the later part of a split sampling (KSamplerAdvanced, a second pass):
    the noisy start the warm-up exists for is behind it, so one dense step rebuilds the caches.
    """

    def __init__(self, config: ChipmunkConfig, total_steps: int, continues: bool = False):
        self.total_steps = max(1, total_steps)
        warmup = 1 if continues else config.dense_warmup_steps
        dense = set(range(min(warmup, self.total_steps)))
        if config.dense_interval:
            dense.update(range(0, self.total_steps, config.dense_interval))
        dense.update(min(self.total_steps - 1, round(f * self.total_steps)) for f in config.dense_at_fractions)
        self.dense_steps = frozenset(dense)

    def is_dense(self, step: int) -> bool:
        return step in self.dense_steps

    def __repr__(self) -> str:
        return f"DenseSchedule({sorted(self.dense_steps)} of {self.total_steps})"
