"""The host does not wait for the GPU between steps (real ComfyUI, narrow FLUX, CPU).

On a GPU, reading a call's sigma to find its step makes the host wait for the previous step, and
so does ComfyUI's copy of the text embedding into every call. Here the CPU stands in for the GPU
(``ASYNC_DEVICES``): the step clock then predicts steps for samplers that evaluate once per step
and checks each prediction one call later, exactly as it does on CUDA.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

from harness import chipmunk as cm
from test_accelerate import narrow_flux

pytestmark = [pytest.mark.comfyui, pytest.mark.chipmunk_node]


@pytest.fixture(scope="module")
def flux(comfy_inprocess, chipmunk_pack_nodes):
    return narrow_flux(comfy_inprocess, chipmunk_pack_nodes)


@pytest.fixture
def pack(chipmunk_pack_nodes):
    package = chipmunk_pack_nodes["ChipmunkAccelerate"].__module__.split(".")[0]
    return (importlib.import_module(f"{package}.nodes.hooks"),
            importlib.import_module(f"{package}.chipmunk_core.schedule"))


@pytest.fixture
def clocks(pack, monkeypatch):
    """Every StepClock the runs create, with the CPU treated like a GPU."""
    hooks, schedule = pack
    monkeypatch.setattr(schedule, "ASYNC_DEVICES", ("cuda", "cpu"))
    made = []
    original = schedule.StepClock.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(schedule.StepClock, "__init__", recording)
    return made


@pytest.mark.parametrize("cfg", [1.0, 3.5])
def test_predicted_steps_give_the_exact_run(flux, pack, clocks, cfg, caplog):
    """euler: every call after the first has a predicted step, none is wrong, and the output and the
    report's step counts are those of the run that reads every sigma."""
    hooks, schedule = pack
    size = flux.sizes[0]
    with caplog.at_level(logging.INFO):
        predicted = flux.sample(hooks.accelerate(flux.model, step_cache="fixed"), size, steps=20, cfg=cfg)
        report = cm.reports(caplog)[-1]
    clock = clocks[-1]
    assert clock.predicted == 19 and clock.mispredicted is None and "taken for step" not in report
    clocks.clear()
    with caplog.at_level(logging.INFO):
        exact = flux.sample(hooks.accelerate(flux.model, step_cache="fixed"), size, steps=20, cfg=cfg,
                            sampler="heun")
    assert clocks[-1].predicted == 0  # heun evaluates twice per step: no prediction
    schedule.ASYNC_DEVICES = ("cuda",)
    with caplog.at_level(logging.INFO):
        reference = flux.sample(hooks.accelerate(flux.model, step_cache="fixed"), size, steps=20, cfg=cfg)
        reference_report = cm.reports(caplog)[-1]
    assert torch.equal(predicted, reference)
    assert cm.step_counts(report) == cm.step_counts(reference_report)
    assert torch.isfinite(exact).all()


def test_a_wrong_prediction_is_caught_said_and_ends_prediction(flux, pack, clocks, monkeypatch, caplog):
    """A sampler wrongly listed as one call per step (heun): its first wrong step is found one call
    later, the report says so, and every later call reads its sigma."""
    hooks, _ = pack
    monkeypatch.setattr(hooks, "ONE_CALL_PER_STEP", hooks.ONE_CALL_PER_STEP | {"sample_heun"})
    with caplog.at_level(logging.INFO):
        out = flux.sample(hooks.accelerate(flux.model), flux.sizes[0], steps=12, sampler="heun")
        report = cm.reports(caplog)[-1]
    clock = clocks[-1]
    assert clock.mispredicted and not clock.predict
    assert clock.predicted == 2  # heun's second call (at the next sigma) is right, the next one is not
    assert "taken for step" in report
    assert torch.isfinite(out).all()


def test_conditioning_moves_as_new_objects(pack, comfy_inprocess):
    """conditioning_on_device replaces the run's entries with new objects of the same class on the
    device; the conditioning the entries were copied from keeps its tensors."""
    import comfy.conds

    hooks, _ = pack
    text = torch.randn(1, 8, 16)
    original = {"c_crossattn": comfy.conds.CONDCrossAttn(text), "guidance": comfy.conds.CONDRegular(torch.ones(1)),
                "constant": comfy.conds.CONDConstant(3)}
    entry = {"model_conds": original, "cross_attn": text}
    conds = {"positive": [entry]}
    assert hooks.conditioning_on_device(conds, torch.device("cpu")) == 0 and entry["model_conds"] is original
    moved = hooks.conditioning_on_device(conds, torch.device("meta"))
    assert moved == 2
    new = entry["model_conds"]
    assert new is not original and type(new["c_crossattn"]) is comfy.conds.CONDCrossAttn
    assert new["c_crossattn"].cond.device.type == "meta" and new["constant"] is original["constant"]
    assert original["c_crossattn"].cond is text and text.device.type == "cpu"
