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


# Devices where reading a sigma makes the host wait for the GPU (tests add "cpu").
ASYNC_DEVICES = ("cuda",)


class StepClock:
    """The step of each model call (``step_index``), without making the host wait for the GPU.

    Reading the value of a sigma that lives on the GPU waits until the GPU has finished all work
    queued before it: the whole previous step. The host then cannot prepare a step while the GPU
    computes the one before, and the GPU idles through ComfyUI's per-step Python.

    - Calls that share the sigma tensor (cond and uncond in separate calls of one evaluation)
      share its step without reading it again (a reference is kept, so the object is not reused).
    - With ``predict`` (the caller knows the sampler evaluates the model once per step at the
      schedule's own sigmas: euler, dpmpp_2m, ...), an evaluation after the first is given the
      step after the previous one, and its sigma is copied to the host in the background. The
      copy is checked at the next evaluation (by then the GPU is past it) or at ``finish``: a
      step that was not the predicted one turns prediction off for the rest of the run, every
      later step is read exactly, and ``mispredicted`` says where it happened.
    - Without ``predict`` (or for a sigma on the CPU) every new sigma is read exactly.
    """

    def __init__(self, sample_sigmas, predict: bool = False):
        self.sample_sigmas = sample_sigmas
        self.predict = predict and sample_sigmas is not None
        self._host = [float(s) for s in sample_sigmas.reshape(-1).tolist()] if self.predict else []
        self._last_sigma = None
        self._last_step = None
        self._pending = None  # (host copy of a predicted call's sigma, its copy event, predicted step)
        self.predicted = 0
        self.mispredicted: str | None = None

    def step(self, sigma) -> int:
        if self.sample_sigmas is None or sigma is None:
            return 0
        if sigma is self._last_sigma:
            return self._last_step
        self.check()
        if self.predict and self._last_step is not None and sigma.device.type in ASYNC_DEVICES:
            step = min(self._last_step + 1, len(self._host) - 1)
            self._pending = (*_copy_to_host(sigma.reshape(-1)[:1]), step)
            self.predicted += 1
        else:
            step = step_index(self.sample_sigmas, sigma)
        self._last_sigma, self._last_step = sigma, step
        return step

    def check(self):
        """Compare the last prediction with the sigma it was made for (waits for that copy only)."""
        if self._pending is None:
            return
        copy, event, predicted = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        value = float(copy[0])
        actual = min(range(len(self._host)), key=lambda i: abs(self._host[i] - value))
        if actual != predicted:
            self.predict = False
            self.mispredicted = (f"a model call at sigma {value:.4g} was taken for step {predicted} (it is step "
                                 f"{actual}); steps are read exactly from then on")

    def finish(self):
        self.check()
        self._last_sigma = None


def _copy_to_host(t):
    """A copy of ``t`` on the host that does not make the host wait, and the event that says it landed."""
    if t.device.type == "cpu":
        return t.clone(), None
    copy = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    copy.copy_(t, non_blocking=True)
    event = torch.cuda.Event() if t.device.type == "cuda" else None
    if event is not None:
        event.record()
    return copy, event


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
