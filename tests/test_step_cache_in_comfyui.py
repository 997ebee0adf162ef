"""Step caching stacked on the sparse deltas, in a real ComfyUI process (narrow FLUX and tiny WAN)."""

from __future__ import annotations

import logging

import pytest
import torch

from harness import chipmunk as cm
from test_accelerate import _kind, _relative

pytestmark = [pytest.mark.comfyui, pytest.mark.chipmunk_node]


@pytest.fixture(scope="module", params=["flux_narrow", "wan21_t2v"])
def kind(request, comfy_inprocess, chipmunk_pack_nodes, tiny_models_dir):
    """The narrow FLUX is the same model on every ComfyUI version (v0.3.64's tiny FLUX.1 checkpoint
    is full width with random weights, whose output changes too fast between steps to skip any)."""
    return _kind(comfy_inprocess, chipmunk_pack_nodes, tiny_models_dir, request.param)


@pytest.mark.parametrize("steps,skipped", [(20, 8), (12, 4), (8, 0)])
def test_skipped_steps_follow_the_fixed_schedule(kind, steps, skipped, caplog):
    with caplog.at_level(logging.INFO):
        out = kind.sample(kind.accelerate(step_cache="fixed"), kind.sizes[0], steps=steps)
    assert torch.isfinite(out).all()
    report = cm.reports(caplog)[-1]
    counts = cm.step_counts(report)
    assert counts["skipped"] == skipped, report
    dense = 3 if steps > 10 else 2  # FLUX and WAN: 0, 1 and every 10th
    assert counts["dense"] == dense and sum(counts.values()) == steps, report
    if steps <= 10:
        assert "step caching is off for this" in report


def test_step_cache_off_is_chipmunk_alone_bit_for_bit(kind):
    size = kind.sizes[0]
    alone = kind.sample(kind.accelerate(), size, steps=12)
    assert torch.equal(kind.sample(kind.accelerate(step_cache="off"), size, steps=12), alone)
    # A run too short for step caching is Chipmunk alone too.
    assert torch.equal(kind.sample(kind.accelerate(step_cache="fixed"), size, steps=8),
                       kind.sample(kind.accelerate(), size, steps=8))
    cached = kind.sample(kind.accelerate(step_cache="fixed"), size, steps=12)
    assert torch.isfinite(cached).all() and 0 < _relative(cached, alone) < 0.2


def test_cfg_in_one_batch_and_in_separate_calls_give_the_same_output(kind):
    """Residuals are kept per conditioning: cond and uncond batched or in separate model calls (as
    ComfyUI does when memory is short) skip the same steps and give the same result, up to the
    rounding of batched matrix products (stock: ~2e-7 relative), which the MLP's discrete unit
    ranking can turn into a different pick on a near-tie (~2e-4 relative here)."""
    import comfy.patcher_extension

    patched = kind.accelerate(step_cache="fixed")
    size = kind.sizes[0]
    batched = kind.sample(patched, size, cfg=3.5, steps=12)
    separate = patched.clone()

    def one_call_per_conditioning(executor, model, conds, x_in, timestep, model_options):
        return [executor(model, [cond], x_in, timestep, model_options)[0] for cond in conds]

    separate.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test-separate",
                                  one_call_per_conditioning)
    assert _relative(kind.sample(separate, size, cfg=3.5, steps=12), batched) < 1e-3


def test_heun_counts_each_step_once(kind, caplog):
    with caplog.at_level(logging.INFO):
        out = kind.sample(kind.accelerate(step_cache="fixed"), kind.sizes[0], steps=12, sampler="heun")
    assert torch.isfinite(out).all()
    counts = cm.step_counts(cm.reports(caplog)[-1])
    assert sum(counts.values()) == 12 and counts["dense"] == 3 and counts["skipped"] > 0, counts


def test_adaptive_schedule_skips_and_stays_close(kind, caplog):
    size = kind.sizes[0]
    alone = kind.sample(kind.accelerate(), size, steps=20)
    with caplog.at_level(logging.INFO):
        out = kind.sample(kind.accelerate(step_cache="adaptive", step_cache_threshold=0.3,
                                          step_cache_max_skips=2), size, steps=20)
    counts = cm.step_counts(cm.reports(caplog)[-1])
    assert counts["skipped"] > 0 and counts["dense"] == 3, counts
    assert torch.isfinite(out).all() and _relative(out, alone) < 0.2
    with caplog.at_level(logging.INFO):
        kind.sample(kind.accelerate(step_cache="adaptive", step_cache_threshold=0.0), size, steps=20)
    assert cm.step_counts(cm.reports(caplog)[-1])["skipped"] == 0
