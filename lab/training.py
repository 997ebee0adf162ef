"""Shared pieces of the lab's training loops: time- or step-bounded schedules, EMA, logging."""
from __future__ import annotations

import contextlib
import json
import math
import time

import torch
import torch.nn.functional as F


class Budget:
    """Progress of a training phase: by steps when ``steps`` is given, else by wall time.

    A phase always stops at ``deadline`` (a ``time.time()`` value), even with ``steps``; the log
    then says it was cut short, and the same command with ``--steps`` reproduces it exactly.
    """

    def __init__(self, seconds: float, steps: int | None = None):
        self.start = time.time()
        self.deadline = self.start + seconds
        self.steps = steps
        self.step = 0

    def progress(self) -> float:
        if self.steps:
            return min(1.0, self.step / self.steps)
        return min(1.0, (time.time() - self.start) / max(1e-6, self.deadline - self.start))

    def done(self) -> bool:
        if self.steps and self.step >= self.steps:
            return True
        return time.time() >= self.deadline

    def cut_short(self) -> bool:
        return bool(self.steps) and self.step < self.steps

    def elapsed(self) -> float:
        return time.time() - self.start


def learning_rate(peak: float, step: int, progress: float, warmup: int = 200, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor * peak`` over the budget."""
    warm = min(1.0, (step + 1) / warmup)
    return peak * warm * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of parameters (decay ramps up to ``decay``), kept in float32."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        for p, s in zip(params, self.shadow):
            p.copy_(s)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.01):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.99), eps=1e-8)


class Log:
    """A JSON log of one job: phases with their settings and a few loss points."""

    def __init__(self, path):
        self.path = path
        self.data: dict = {"phases": {}}

    def phase(self, name: str, **info) -> dict:
        entry = self.data["phases"].setdefault(name, {"curve": []})
        entry.update(info)
        self.write()
        return entry

    def point(self, name: str, step: int, seconds: float, **values) -> None:
        values = {k: round(float(v), 5) for k, v in values.items()}
        self.data["phases"][name]["curve"].append({"step": step, "s": round(seconds, 1), **values})
        self.write()

    def set(self, **info) -> None:
        self.data.update(info)
        self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1))


def autocast(device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def dit_step(model, family: str, x0, context, pooled, generator, optimizer, ema, around=contextlib.nullcontext):
    """One rectified-flow step of a lab DiT on clean latents ``x0``: velocity loss against
    ``noise - x0``, backward (both inside ``around()``), clipped gradients, optimizer, EMA.
    Returns (loss, gradient norm) as tensors (reading them waits for the GPU)."""
    from . import networks

    xt, sigma, noise, guidance = networks.noisy_batch(family, x0, generator)
    with around():
        with autocast(x0.device):
            v = networks.predict_v(model, family, xt, sigma, context, pooled, guidance)
        loss = F.mse_loss(v.float(), noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    grad = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    ema.update()
    return loss, grad
