"""The pack inside a real ComfyUI: import, node schema, and real workflows on tiny models.

Two ways in (fixtures in conftest.py): a ComfyUI server subprocess driven over HTTP, as a user's
front end drives it, and ComfyUI imported into this process for fast direct sampling. Tests
marked ``chipmunk_node`` need the pack's ChipmunkAccelerate node; the rest check the harness
itself (tiny checkpoints, dev conditioning node, stock workflows) and hold without it.
"""
from __future__ import annotations

import json
import re

import pytest
import requests
import torch

from harness import chipmunk as cm
from harness.paths import PACK_NAME, REPO_ROOT
from harness.prompts import ACCELERATE_NODE, CONDITIONING_NODE, SAVE_NODE_ID, flux_text_to_image
from harness.server import ComfyServerError

pytestmark = pytest.mark.comfyui

# Settings that make every layer of the shallow tiny FLUX go sparse after one dense step.
SPARSE_EVERY_LAYER = {"preset": cm.CUSTOM, "dense_warmup_steps": 1, "first_dense_layers": 0}
WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))


def dynamic_node(comfy_server) -> bool:
    return comfy_server.object_info(ACCELERATE_NODE)["input"]["required"]["preset"][0] == "COMFY_DYNAMICCOMBO_V3"


def assert_finite_latent(latent: torch.Tensor, shape: tuple) -> None:
    assert tuple(latent.shape) == shape
    assert torch.isfinite(latent).all(), "latent has NaN or Inf"
    assert latent.float().std() > 0, "latent is constant"


# --- server: loading and schema ------------------------------------------------------------
def test_pack_and_dev_nodes_import_without_failure(comfy_server):
    # ComfyUI lists custom-node packages as "<t> seconds[ (IMPORT FAILED)]: <path>". (Its own
    # optional extras, e.g. the audio nodes without torchaudio, fail in another format.)
    log = comfy_server.log_text()
    failed = re.findall(r"seconds \(IMPORT FAILED\): (.*)$", log, re.M)
    assert not failed, f"custom nodes failed to import: {failed}\n{comfy_server.log_tail()}"
    for name in (PACK_NAME, "chipmunk_dev_nodes"):
        assert re.search(rf"seconds: \S*/{re.escape(name)}\s*$", log, re.M), (
            f"{name} missing from ComfyUI's custom node import list\n{comfy_server.log_tail()}")


def test_dev_conditioning_node_is_listed(comfy_server):
    info = comfy_server.object_info(CONDITIONING_NODE)
    assert info["output"] == ["CONDITIONING"]
    from harness.paths import dev_nodes_module
    assert set(info["input"]["required"]["family"][0]) == set(dev_nodes_module().TEXT_ENCODERS)


@pytest.mark.chipmunk_node
def test_accelerate_is_listed_with_sparsity_sliders(comfy_server):
    info = comfy_server.object_info(ACCELERATE_NODE)
    assert info, f"{ACCELERATE_NODE} is not in /object_info"
    assert info["output"] == ["MODEL"]
    required = info["input"]["required"]
    assert required["model"][0] == "MODEL"
    if dynamic_node(comfy_server):  # the sliders exist only under preset = custom
        options = {o["key"]: o["inputs"]["required"] for o in required["preset"][1]["options"]}
        assert options[cm.AUTO] == {}, "auto shows no slider: nothing it would ignore"
        sliders = options[cm.CUSTOM]
        caches = {o["key"]: o["inputs"]["required"] for o in required["step_cache"][1]["options"]}
        assert set(caches) == {"off", "fixed", "adaptive"} and not caches["off"] and not caches["fixed"]
        assert set(caches["adaptive"]) == set(cm.CACHE_SETTINGS)
    else:
        sliders = required
    for name in ("attention_sparsity", "mlp_sparsity"):
        kind, options = sliders[name]
        assert kind == "FLOAT", name
        assert options.get("display") == "slider", f"{name} is not shown as a slider: {options}"
        assert 0.0 <= options["min"] <= options["default"] <= options["max"] <= 1.0, options


def test_bundled_workflows_are_served_as_templates(comfy_server):
    if not WORKFLOWS:
        pytest.skip("the pack bundles no workflows/*.json yet")
    listed = comfy_server.get_json("/workflow_templates").get(PACK_NAME, [])
    for path in WORKFLOWS:
        assert path.stem in listed, f"{path.name} not listed under {PACK_NAME}: {listed}"
        response = requests.get(
            f"{comfy_server.url}/api/workflow_templates/{PACK_NAME}/{path.name}", timeout=30)
        assert response.ok, f"{path.name}: HTTP {response.status_code}"
        assert response.json() == json.loads(path.read_text())


# --- server: workflows on the tiny full-width FLUX ----------------------------------------
def test_dense_flux_workflow_runs_through_stock_loader(comfy_server, tiny_checkpoints):
    prompt = flux_text_to_image(tiny_checkpoints["flux"].name, seed=1, steps=2)
    entry = comfy_server.run_prompt(prompt)
    assert_finite_latent(comfy_server.read_latent(entry, SAVE_NODE_ID), (1, 16, 32, 32))


@pytest.mark.chipmunk_node
@pytest.mark.parametrize("overrides", [{}, SPARSE_EVERY_LAYER, {"step_cache": "fixed"}],
                         ids=["node-defaults", "sparse-every-layer", "step-cache"])
def test_accelerated_flux_workflow_gives_finite_latent(comfy_server, tiny_checkpoints, overrides):
    prompt = flux_text_to_image(tiny_checkpoints["flux"].name, seed=2, steps=12 if overrides.get("step_cache") else 4,
                                chipmunk=cm.prompt_inputs(dynamic_node(comfy_server), **overrides))
    entry = comfy_server.run_prompt(prompt)
    assert_finite_latent(comfy_server.read_latent(entry, SAVE_NODE_ID), (1, 16, 32, 32))


@pytest.mark.chipmunk_node
def test_sliders_at_zero_give_stock_output_bit_for_bit(comfy_server, tiny_checkpoints):
    dynamic = dynamic_node(comfy_server)
    stock = comfy_server.read_latent(comfy_server.run_prompt(
        flux_text_to_image(tiny_checkpoints["flux"].name, seed=3, steps=4)), SAVE_NODE_ID)
    for step_cache in ("off", "adaptive"):  # adaptive at threshold 0 never skips
        zero = cm.prompt_inputs(dynamic, preset=cm.CUSTOM, step_cache=step_cache, step_cache_threshold=0.0,
                                **cm.DENSE)
        out = comfy_server.read_latent(comfy_server.run_prompt(
            flux_text_to_image(tiny_checkpoints["flux"].name, seed=3, steps=4, chipmunk=zero)), SAVE_NODE_ID)
        assert torch.equal(out, stock), step_cache


@pytest.mark.chipmunk_node
def test_run_report_arrives_on_the_node(comfy_server, tiny_checkpoints):
    """After the run the server sends the report to the Chipmunk node (ComfyUI's progress text)."""
    prompt = flux_text_to_image(tiny_checkpoints["flux"].name, seed=4, steps=12,
                                chipmunk=cm.prompt_inputs(dynamic_node(comfy_server), step_cache="fixed"))
    _, texts = comfy_server.run_prompt_with_texts(prompt)
    assert "chipmunk" in texts, f"no text for the Chipmunk node: {texts}"
    report = texts["chipmunk"][-1]
    # Short enough for the node (the front end shows about two lines; the console has the rest).
    assert report.startswith("Chipmunk, ") and len(report.splitlines()) <= 2, report
    assert all(len(line) <= 45 for line in report.splitlines()), report
    counts = cm.step_counts(report)
    assert counts["dense"] == 3 and counts["skipped"] == 4 and counts["sparse"] == 5, report
    assert "skipped attn" in report or "in the log" in report, report


def test_rejected_prompt_error_names_node_and_input(comfy_server):
    prompt = flux_text_to_image("no-such-model.safetensors")
    with pytest.raises(ComfyServerError, match=r"node loader \(UNETLoader\).*unet_name"):
        comfy_server.queue_prompt(prompt)


def test_failing_prompt_error_names_node_and_exception(comfy_server, tiny_checkpoints):
    # FLUX.2-shaped conditioning (15360 wide) cannot enter FLUX.1's 4096-wide text input.
    prompt = flux_text_to_image(tiny_checkpoints["flux"].name, seed=5, steps=1)
    prompt["positive"]["inputs"]["family"] = "flux2"
    with pytest.raises(ComfyServerError, match=r"execution_error in node sampler \(KSampler\)"):
        comfy_server.run_prompt(prompt)


# --- in process: the tiny models themselves -------------------------------------------------
@pytest.mark.parametrize("family", ["flux", "hunyuan_video", "wan_t2v", "wan_i2v"])
def test_tiny_checkpoint_is_detected_and_samples(comfy_inprocess, tiny_checkpoints, family):
    model = comfy_inprocess.tiny_models.verify_checkpoint(tiny_checkpoints[family], family)
    cond_family = "wan" if family.startswith("wan") else family
    latent = comfy_inprocess.empty_latent(cond_family, width=64, height=64, frames=5)
    out = comfy_inprocess.ksampler(
        model, comfy_inprocess.conditioning(cond_family, seed=1),
        comfy_inprocess.conditioning(cond_family, seed=2), latent, steps=1, cfg=2.0)
    assert_finite_latent(out, tuple(latent["samples"].shape))


def test_narrow_flux_samples_reproducibly(comfy_inprocess, narrow_flux):
    positive = comfy_inprocess.conditioning("flux", seed=1, context_width=64)
    negative = comfy_inprocess.conditioning("flux", seed=2, context_width=64)
    runs = [comfy_inprocess.ksampler(narrow_flux, positive, negative,
                                     comfy_inprocess.empty_latent("flux", 128, 128),
                                     seed=3, steps=2, cfg=2.0) for _ in range(2)]
    assert_finite_latent(runs[0], (1, 16, 16, 16))
    assert torch.equal(runs[0], runs[1])


# --- in process: the pack's node ------------------------------------------------------------
@pytest.mark.chipmunk_node
def test_pack_registers_accelerate_when_imported_like_comfyui(chipmunk_pack_nodes):
    assert ACCELERATE_NODE in chipmunk_pack_nodes, sorted(chipmunk_pack_nodes)


@pytest.mark.chipmunk_node
def test_accelerated_narrow_flux_samples_finite(comfy_inprocess, chipmunk_pack_nodes, narrow_flux):
    node = chipmunk_pack_nodes[ACCELERATE_NODE]
    (patched,) = comfy_inprocess.run_node(node, model=narrow_flux, **cm.node_inputs(
        node, preset=cm.CUSTOM, dense_warmup_steps=1, first_dense_layers=0))
    out = comfy_inprocess.ksampler(
        patched, comfy_inprocess.conditioning("flux", seed=1, context_width=64),
        comfy_inprocess.conditioning("flux", seed=2, context_width=64),
        comfy_inprocess.empty_latent("flux", 256, 256), seed=4, steps=4, cfg=2.0)
    assert_finite_latent(out, (1, 16, 32, 32))
