"""The example workflows: the ones bundled for users (workflows/) and the tiny-model ones that run
here without real weights (tests/workflows/).

The file-level checks need nothing but the JSON. The rest use one real ComfyUI server with the
pack loaded (``comfy_server`` in conftest.py): ComfyUI must list and serve the bundled workflows as
templates, every workflow must convert (tests/workflow_convert.py) into a prompt that is valid
against the server's real node definitions, and the tiny workflows must run end to end on the
tiny checkpoints, with Chipmunk's sparse steps changing the result against the same graph with the
node bypassed.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import requests
import torch

import workflow_convert as wc
from harness.paths import PACK_NAME, REPO_ROOT, tiny_models_module
from harness.prompts import ACCELERATE_NODE, CONDITIONING_NODE

BUNDLED_DIR = REPO_ROOT / "workflows"
TINY_DIR = REPO_ROOT / "tests" / "workflows"
BUNDLED = sorted(BUNDLED_DIR.glob("*.json"))
TINY = sorted(TINY_DIR.glob("*.json"))
EXPECTED_BUNDLED = {"FLUX.1 dev text to image", "HunyuanVideo text to video", "WAN2.1 text to video",
                    "WAN2.1 image to video", "Chipmunk toy text to image", "Chipmunk toy text to video"}
# Latent each tiny workflow saves: FLUX 128x128 image; video 128x128, 17 frames (5 latent frames).
TINY_LATENT_SHAPES = {"tiny_flux": (1, 16, 16, 16), "tiny_hunyuan_video": (1, 16, 5, 16, 16),
                      "tiny_wan21": (1, 16, 5, 16, 16)}
AUTO_PRESET = "auto (per model)"
LOADERS = {"UNETLoader", "DualCLIPLoader", "CLIPLoader", "VAELoader", "CLIPVisionLoader"}
SAMPLERS = {"KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"}
NODE_KEYS = {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties"}
TOP_KEYS = {"id", "revision", "last_node_id", "last_link_id", "nodes", "links", "groups", "config",
            "extra", "version"}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# The node's widget values in ComfyUI without dynamic inputs (v0.3.64): preset, five sliders, the
# cache precision, step_cache, threshold, skip limit. Workflows are saved from the primary target's
# front end.
FLAT_DEFAULTS = [0.835, 0.7, 2, 10, 2, "model"]


def for_server(workflow: dict, object_info: dict) -> dict:
    """The workflow as the front end of the server's ComfyUI would hold it."""
    info = object_info.get(ACCELERATE_NODE, {})
    if info.get("input", {}).get("required", {}).get("preset", [None])[0] == wc.DYNAMIC_COMBO:
        return workflow
    workflow = copy.deepcopy(workflow)
    for node in nodes_of(workflow, ACCELERATE_NODE):
        values = node["widgets_values"]
        sliders = values[1:7] if values[0] == "custom" else FLAT_DEFAULTS
        node["widgets_values"] = [values[0], *sliders, values[-1], 0.1, 2]
    return workflow


def ids(paths):
    return [p.stem for p in paths]


def nodes_of(workflow: dict, node_type: str) -> list[dict]:
    return [n for n in workflow["nodes"] if n["type"] == node_type]


def upstream(workflow: dict, node: dict, input_name: str) -> dict | None:
    graph = wc.Graph(workflow)
    link = graph.input_link(node, input_name)
    return None if link is None else graph.nodes[graph.links[link][0]]


def downstream(workflow: dict, node: dict, slot: int = 0) -> list[tuple[dict, str]]:
    graph = wc.Graph(workflow)
    out = []
    for link in node["outputs"][slot].get("links") or []:
        target = graph.nodes[graph.links[link][2]]
        out.append((target, target["inputs"][graph.links[link][3]]["name"]))
    return out


# --- the files themselves ----------------------------------------------------------------------
def test_the_expected_workflows_are_bundled():
    assert set(ids(BUNDLED)) == EXPECTED_BUNDLED
    assert set(ids(TINY)) == set(TINY_LATENT_SHAPES)


@pytest.mark.parametrize("path", BUNDLED + TINY, ids=ids(BUNDLED + TINY))
def test_workflow_is_in_the_front_ends_ui_format(path):
    workflow = load(path)
    assert TOP_KEYS <= set(workflow), TOP_KEYS - set(workflow)
    assert workflow["version"] == 0.4
    node_ids = [n["id"] for n in workflow["nodes"]]
    assert len(set(node_ids)) == len(node_ids), "duplicate node ids"
    assert sorted(n["order"] for n in workflow["nodes"]) == list(range(len(node_ids)))
    for node in workflow["nodes"]:
        assert NODE_KEYS <= set(node), f"node {node['id']} lacks {NODE_KEYS - set(node)}"
        assert node["mode"] == 0, f"node {node['id']} ({node['type']}) is muted or bypassed"
        name = node["properties"].get("Node name for S&R")
        assert name in (None, node["type"]), f"node {node['id']}: S&R name {name!r}"
    for group in workflow["groups"]:
        assert len(group["bounding"]) == 4


@pytest.mark.parametrize("path", BUNDLED + TINY, ids=ids(BUNDLED + TINY))
def test_chipmunk_sits_between_loader_and_sampler(path):
    workflow = load(path)
    (chipmunk,) = nodes_of(workflow, ACCELERATE_NODE)
    source = upstream(workflow, chipmunk, "model")
    if source["type"] == "ModelSamplingSD3":  # HunyuanVideo and WAN: loader -> shift -> Chipmunk
        source = upstream(workflow, source, "model")
    assert source["type"] == "UNETLoader", source["type"]
    consumers = downstream(workflow, chipmunk)
    assert consumers and all(node["type"] in SAMPLERS and name == "model" for node, name in consumers), [
        (node["type"], name) for node, name in consumers]


@pytest.mark.parametrize("path", BUNDLED, ids=ids(BUNDLED))
def test_bundled_workflow_uses_auto_preset_and_explains_it(path):
    workflow = load(path)
    (note,) = nodes_of(workflow, "Note")
    text = note["widgets_values"][0]
    (chipmunk,) = nodes_of(workflow, ACCELERATE_NODE)
    assert chipmunk["widgets_values"][0] == AUTO_PRESET
    assert "README" in text and "dense" in text and AUTO_PRESET in text
    for loader in (n for n in workflow["nodes"] if n["type"] in LOADERS):
        for value in loader["widgets_values"]:
            if isinstance(value, str) and value.endswith(".safetensors"):
                assert value in text, f"the note does not say where {value} goes"
    assert not re.search(r"(/tmp/|/work/|/home/|/root/|[A-Z]:\\)", json.dumps(workflow)), "machine path"


# --- the template index (workflows/README.md) and the pictures ------------------------------------
INDEX = BUNDLED_DIR / "README.md"
# The model family each bundled template's Chipmunk node sees (its dense schedule).
FAMILY = {"Chipmunk toy text to image": "flux", "Chipmunk toy text to video": "wan",
          "FLUX.1 dev text to image": "flux", "WAN2.1 text to video": "wan", "WAN2.1 image to video": "wan",
          "HunyuanVideo text to video": "hunyuan_video"}


def template_index() -> list[dict]:
    """The index table's rows in order: name, shows, needs, badge (the words on the picture)."""
    rows = []
    for line in INDEX.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 5 and cells[0].isdigit():
            rows.append(dict(zip(("name", "shows", "needs", "badge"), cells[1:])))
    return rows


def needs_downloads(name: str) -> bool:
    return bool(declared_models(load(BUNDLED_DIR / f"{name}.json")))


def declared_models(workflow: dict) -> list[dict]:
    return [m for node in workflow["nodes"] for m in node.get("properties", {}).get("models", [])]


def test_template_index_lists_the_templates_that_run_without_downloads_first():
    names = [row["name"] for row in template_index()]
    assert sorted(names) == sorted(ids(BUNDLED)), "the index and workflows/ disagree"
    downloads = [needs_downloads(name) for name in names]
    assert downloads == [False, False, True, True, True, True], list(zip(names, downloads))
    # The one order the pack can steer in ComfyUI v0.19.3's template browser is its A-Z sort.
    assert sorted(names, key=str.casefold)[:2] == sorted(names[:2], key=str.casefold)


@pytest.mark.parametrize("row", template_index(), ids=lambda row: row["name"])
def test_template_index_says_what_each_template_shows_and_needs(row):
    name, shows, needs = row["name"], row["shows"], row["needs"]
    title_words = set(re.findall(r"[\w.]+", name.casefold()))
    for text in (shows, needs):
        new_words = set(re.findall(r"[\w.]+", text.casefold())) - title_words
        assert len(new_words) >= 8, f"{name}: {text!r} says little beyond the title"
    assert "Chipmunk Accelerate" in shows
    count = len(declared_models(load(BUNDLED_DIR / f"{name}.json")))
    if count:
        assert f"{count} model files" in needs and "NVIDIA GPU" in needs, needs
        assert row["badge"] == f"{count} model downloads, NVIDIA GPU"
    else:
        assert needs.startswith("Nothing to download") and "CPU" in needs, needs
        assert row["badge"] == "no downloads, runs on a CPU"


def thumbnail(name: str):
    from PIL import Image

    return Image.open(BUNDLED_DIR / f"{name}.jpg").convert("RGB")


def test_toy_video_thumbnail_shows_several_frames_with_motion():
    """A 3x3 grid of frames over the clip (tools/render_template_thumbnails.py): dark gaps between
    the tiles, and tiles that differ from first to last."""
    import numpy as np

    picture = np.asarray(thumbnail("Chipmunk toy text to video"), dtype=np.float32)
    assert picture.shape == (512, 512, 3)
    cell, gap = (512 - 2 * 4) // 3, 4
    for k in (1, 2):  # the gaps between columns and rows, above the band at the bottom
        start = k * cell + (k - 1) * gap
        assert picture[:400, start + 1:start + gap - 1].mean() < 40
        assert picture[start + 1:start + gap - 1, :].mean() < 40
    tiles = [picture[r * (cell + gap):r * (cell + gap) + cell, c * (cell + gap):c * (cell + gap) + cell]
             for r in range(3) for c in range(3)]
    assert all(tile.std() > 10 for tile in tiles[:6]), "a blank frame"
    assert np.abs(tiles[0] - tiles[7]).mean() > 5, "first and last frames look alike: no motion"


@pytest.mark.parametrize("name", ["Chipmunk toy text to image", "Chipmunk toy text to video"])
def test_toy_thumbnails_are_pictures_with_their_band(name):
    import numpy as np

    picture = np.asarray(thumbnail(name), dtype=np.float32)
    assert picture[:400].std() > 20, "the picture above the band is flat"
    assert picture[-40:].mean() < picture[:400].mean(), "no dark band along the bottom"


@pytest.mark.parametrize("path", BUNDLED, ids=ids(BUNDLED))
def test_note_counts_steps_as_the_run_report_does(path):
    """The run report numbers steps from 0 (its settings line: "dense steps [0, 1, 10, 20]"); the
    note says the same numbers for the template's own step count."""
    from chipmunk_pack.chipmunk_core.config import resolve_config
    from chipmunk_pack.chipmunk_core.schedule import DenseSchedule

    workflow = load(path)
    (note,) = nodes_of(workflow, "Note")
    text = note["widgets_values"][0]
    steps = nodes_of(workflow, "KSampler")[0]["widgets_values"][2]
    config = resolve_config(FAMILY[path.stem])
    dense = sorted(DenseSchedule(config, steps).dense_steps)
    warmup = " and ".join(str(step) for step in range(config.dense_warmup_steps))
    assert f"steps {warmup} dense (steps counted from 0, as the run report counts them)" in text
    assert f"for this template's {steps} steps the run report lists dense steps {dense}" in text
    assert not re.search(r"\bsteps? 1 (and|to) 2\b", text), "a step numbered from 1"


@pytest.mark.parametrize("path", TINY, ids=ids(TINY))
def test_tiny_workflow_loads_a_tiny_checkpoint(path):
    workflow = load(path)
    names = set(tiny_models_module().CHECKPOINT_NAMES.values())
    (loader,) = nodes_of(workflow, "UNETLoader")
    assert loader["widgets_values"][0] in names
    assert nodes_of(workflow, CONDITIONING_NODE) and nodes_of(workflow, "SaveLatent")


# --- against a real server ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info()


@pytest.mark.comfyui
@pytest.mark.chipmunk_node
def test_comfyui_lists_and_serves_exactly_the_bundled_workflows(comfy_server):
    listed = comfy_server.get_json("/workflow_templates").get(PACK_NAME)
    assert sorted(listed or []) == sorted(ids(BUNDLED)), "tests/workflows must not show up as templates"
    for path in BUNDLED:
        response = requests.get(f"{comfy_server.url}/api/workflow_templates/{PACK_NAME}/{path.name}",
                                timeout=30)
        assert response.status_code == 200, f"{path.name}: HTTP {response.status_code}"
        assert response.json() == load(path)


@pytest.mark.comfyui
@pytest.mark.chipmunk_node
@pytest.mark.parametrize("path", BUNDLED + TINY, ids=ids(BUNDLED + TINY))
def test_workflow_converts_to_a_valid_prompt(object_info, path):
    workflow = for_server(load(path), object_info)
    assert wc.ui_link_problems(workflow, object_info) == []
    prompt = wc.to_prompt(workflow, object_info)
    assert wc.prompt_problems(prompt, object_info) == []
    executing = [n for n in workflow["nodes"] if n["type"] not in wc.VIRTUAL_NODES]
    assert len(prompt) == len(executing)


def set_widget(workflow: dict, node_type: str, index: int, value) -> dict:
    workflow = copy.deepcopy(workflow)
    nodes_of(workflow, node_type)[0]["widgets_values"][index] = value
    return workflow


def retarget_link(workflow: dict, node_type: str, input_name: str, source_type: str) -> dict:
    """Feed ``node_type.input_name`` from output 0 of the first ``source_type`` node instead."""
    workflow = copy.deepcopy(workflow)
    (target,) = nodes_of(workflow, node_type)
    source = nodes_of(workflow, source_type)[0]
    link_id = wc.Graph(workflow).input_link(target, input_name)
    for link in workflow["links"]:
        if link[0] == link_id:
            link[1:3] = [source["id"], 0]
    return workflow


BROKEN = {
    "combo-value": (lambda w: set_widget(w, "KSampler", 4, "no_such_sampler"), "is not one of"),
    "below-minimum": (lambda w: set_widget(w, "KSampler", 2, 0), "below the minimum"),
    "above-maximum": (lambda w: set_widget(w, ACCELERATE_NODE, 1, 1.5), "above the maximum"),
    "wrong-type": (lambda w: set_widget(w, "EmptySD3LatentImage", 0, "128"), "is not an integer"),
    "link-type": (lambda w: retarget_link(w, "KSampler", "positive", "EmptySD3LatentImage"),
                  "CONDITIONING input fed by EmptySD3LatentImage"),
}


@pytest.mark.comfyui
@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_validation_catches_a_broken_workflow(object_info, breakage):
    """The checks above would pass vacuously if the validator let everything through."""
    break_it, expected = BROKEN[breakage]
    prompt = wc.to_prompt(break_it(for_server(load(TINY_DIR / "tiny_flux.json"), object_info)), object_info)
    problems = wc.prompt_problems(prompt, object_info)
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.comfyui
def test_conversion_rejects_a_wrong_number_of_widget_values(object_info):
    workflow = for_server(load(TINY_DIR / "tiny_flux.json"), object_info)
    nodes_of(workflow, "KSampler")[0]["widgets_values"].remove("fixed")  # seed's control value
    with pytest.raises(wc.WorkflowError, match="widget values"):
        wc.to_prompt(workflow, object_info)


def bypass_chipmunk(workflow: dict) -> dict:
    """The workflow with the Chipmunk node bypassed (Ctrl+B in the front end): dense sampling."""
    workflow = copy.deepcopy(workflow)
    for node in nodes_of(workflow, ACCELERATE_NODE):
        node["mode"] = wc.MODE_BYPASS
    return workflow


@pytest.mark.comfyui
@pytest.mark.chipmunk_node
@pytest.mark.parametrize("path", BUNDLED, ids=ids(BUNDLED))
def test_bypassing_chipmunk_leaves_the_dense_workflow(object_info, path):
    """The notes tell users to compare against dense sampling by bypassing the node."""
    workflow = for_server(load(path), object_info)
    (chipmunk,) = nodes_of(workflow, ACCELERATE_NODE)
    source = upstream(workflow, chipmunk, "model")
    prompt = wc.to_prompt(bypass_chipmunk(workflow), object_info)
    assert ACCELERATE_NODE not in {n["class_type"] for n in prompt.values()}
    for sampler, _ in downstream(workflow, chipmunk):
        assert prompt[str(sampler["id"])]["inputs"]["model"] == [str(source["id"]), 0]
    assert wc.prompt_problems(prompt, object_info) == []


@pytest.mark.comfyui
@pytest.mark.chipmunk_node
@pytest.mark.parametrize("path", TINY, ids=ids(TINY))
def test_tiny_workflow_runs_end_to_end_and_goes_sparse(comfy_server, object_info, path):
    workflow = for_server(load(path), object_info)
    (save,) = nodes_of(workflow, "SaveLatent")
    latents = {}
    for label, graph in (("chipmunk", workflow), ("dense", bypass_chipmunk(workflow))):
        entry = comfy_server.run_prompt(wc.to_prompt(graph, object_info))
        latents[label] = comfy_server.read_latent(entry, str(save["id"]))
    latent = latents["chipmunk"]
    assert tuple(latent.shape) == TINY_LATENT_SHAPES[path.stem]
    assert torch.isfinite(latent).all(), "latent has NaN or Inf"
    assert latent.float().std() > 0, "latent is constant"
    # Equal to the dense run would mean no step or layer ever went sparse.
    assert not torch.equal(latent, latents["dense"]), "Chipmunk changed nothing: no sparse step ran"
