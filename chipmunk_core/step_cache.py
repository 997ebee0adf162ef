"""Full-step caching stacked on the sparse deltas: which steps skip every transformer block, and the
residual a skipped step applies instead.

On a skipped step the model still computes its embeddings, modulation and final layer; the blocks
in between are replaced by the residual (last block's output - first block's input) of the last
computed step of the same conditioning. Dense refresh steps and the last step are never skipped,
and a skipped step leaves every sparse-delta cache as it was, so the next computed step is sparse
against the caches of the last computed one.

Two schedules: "fixed" skips every other step between dense refreshes (the reference skips about
half the steps: 23 of 50 with FLUX's dense steps here); "adaptive" predicts how much the output
would change from how much the first block's input changed, scaled by the rate measured between
the last two computed steps (as core's EasyCache does), and skips while the change accumulated
since the last computed step stays under the threshold, at most ``step_cache_max_skips`` times in
a row.
"""

from __future__ import annotations

import torch

from .config import ChipmunkConfig
from .memory import Rows, reuse_buffer, with_batch

# Runs this short are distilled or few-step runs: skipping one of their steps costs too much.
MIN_STEPS = 11


class StepCacheSchedule:
    """The run's skip decisions: fixed ones known up front, adaptive ones taken per step."""

    def __init__(self, config: ChipmunkConfig, total_steps: int, dense):
        self.config = config
        self.total_steps = total_steps
        self.mode = config.step_cache
        self.disabled_reason = None
        if self.mode != "off" and total_steps < MIN_STEPS:
            self.disabled_reason = (f"step caching is off for this {total_steps}-step run (it needs at least "
                                    f"{MIN_STEPS} steps; few-step models lose quality when steps are skipped)")
            self.mode = "off"
        self._dense = dense
        self.decided: dict[int, bool] = {}  # step -> skipped (one decision per step, all conditionings)
        self.fixed_skips = frozenset(self._fixed_skips()) if self.mode == "fixed" else frozenset()

    @property
    def active(self) -> bool:
        return self.mode != "off"

    def can_skip(self, step: int) -> bool:
        return self.active and not self._dense.is_dense(step) and step < self.total_steps - 1

    def _fixed_skips(self):
        previous_computed = True
        for step in range(self.total_steps):
            if self.can_skip(step) and previous_computed:
                previous_computed = False
                yield step
            else:
                previous_computed = True

    def decide(self, step: int, measure) -> bool:
        """Whether ``step`` is skipped; ``measure()`` gives the adaptive schedule's prediction.

        The first call of a step decides for every conditioning of that step, so cond and uncond
        skip together whether or not ComfyUI batches them.
        """
        if step not in self.decided:
            if not self.can_skip(step):
                skip = False
            elif self.mode == "fixed":
                skip = step in self.fixed_skips
            else:
                skip = measure()
            self.decided[step] = skip
        return self.decided[step]


def _relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new.float() - old.float()).abs().mean() / old.float().abs().mean().clamp_min(1e-12))


class StepCache(Rows):
    """Per-conditioning step-cache state: the residual of the last computed step and the adaptive
    schedule's measurements. Tensors are per stream ("img", "txt" for two-stream models)."""

    BATCHED = ("_inputs", "residual", "previous_input", "previous_output")

    def __init__(self):
        self.reset()

    def reset(self):
        self._inputs: dict[str, torch.Tensor] = {}              # first block's input, this computed step
        self.recording = False                                   # between begin_ and end_computed
        self.residual: dict[str, torch.Tensor] | None = None   # last output - first input, last computed step
        self.previous_input: torch.Tensor | None = None        # first block's image input, last computed step
        self.previous_output: torch.Tensor | None = None
        self.rate: float | None = None        # output change / input change between computed steps
        self.accumulated = 0.0
        self.skips_in_a_row = 0
        self.signature = None

    def batch(self) -> int:
        tensors = list((self.residual or {}).values()) + list(self._inputs.values()) + [self.previous_input]
        return next((t.shape[0] for t in tensors if t is not None), 0)

    def rebatched(self, batch: int):
        if self.signature is not None:
            self.signature = tuple((name, with_batch(shape, batch), dtype, device)
                                   for name, shape, dtype, device in self.signature)

    def nbytes(self) -> int:
        tensors = list((self.residual or {}).values()) + [self.previous_input, self.previous_output]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def ready_for(self, streams: dict[str, torch.Tensor]) -> bool:
        return self.residual is not None and self.signature == _signature(streams)

    def predict_skip(self, image: torch.Tensor, rows: slice, threshold: float, max_skips: int) -> bool:
        """Adaptive decision from the first block's image input (``rows``: the rows that decide)."""
        if self.previous_input is None or self.rate is None or self.skips_in_a_row >= max_skips:
            return False
        change = self.rate * _relative_change(image[rows], self.previous_input[rows])
        if self.accumulated + change < threshold:
            self.accumulated += change
            return True
        return False

    def begin_computed(self, streams: dict[str, torch.Tensor]):
        """The first block is about to run: remember its input (blocks update tensors in place).

        The input and residual buffers are reused while the streams keep their shapes, so a
        computed step can be replayed as a CUDA graph (fixed addresses, no host synchronisation
        unless the adaptive schedule measures)."""
        self._inputs = {name: reuse_buffer(self._inputs.get(name), t.shape, t.dtype, t.device).copy_(t)
                        for name, t in streams.items()}
        self.recording = True

    def end_computed(self, outputs: dict[str, torch.Tensor], measure: bool = True):
        """The last block ran: store the residual and, with ``measure`` (the adaptive schedule),
        update the adaptive measurements (these read values on the host)."""
        if not self.recording:
            return
        self.recording = False
        residual = self.residual or {}
        self.residual = {name: torch.sub(outputs[name], t,
                                         out=reuse_buffer(residual.get(name), t.shape, t.dtype, t.device))
                         for name, t in self._inputs.items()}
        self.signature = _signature(self._inputs)
        self.accumulated = 0.0
        self.skips_in_a_row = 0
        if not measure:
            return
        image_in, image_out = self._inputs["img"], outputs["img"]
        if self.previous_input is not None and self.previous_input.shape == image_in.shape:
            input_change = _relative_change(image_in, self.previous_input)
            if input_change > 0:
                self.rate = _relative_change(image_out, self.previous_output) / input_change
        self.previous_input, self.previous_output = image_in.clone(), image_out.detach().clone()

    def buffers(self) -> list[torch.Tensor]:
        """The tensors a computed step writes (their addresses key a captured graph)."""
        return list(self._inputs.values()) + list((self.residual or {}).values())

    def apply(self, streams: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A skipped step's block outputs: each stream's input plus the stored residual."""
        self.skips_in_a_row += 1
        return {name: t + self.residual[name] for name, t in streams.items()}


def _signature(streams: dict[str, torch.Tensor]):
    return tuple((name, tuple(t.shape), t.dtype, str(t.device)) for name, t in sorted(streams.items()))
