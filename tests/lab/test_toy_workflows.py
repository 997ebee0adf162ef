"""The bundled toy workflows run end to end in a real ComfyUI server: the toy prompt node, the
stock loaders reading the toy files, Chipmunk Accelerate and a dense KSampler side by side, the
stock VAE Decode with the toy autoencoders, and the saved pictures."""
from __future__ import annotations

import json

import pytest
from PIL import Image

import workflow_convert as wc
from harness.paths import REPO_ROOT

pytestmark = [pytest.mark.comfyui, pytest.mark.chipmunk_node]

WORKFLOWS = {"Chipmunk toy text to image": ("SaveImage", (256, 256), 1), "Chipmunk toy text to video": ("SaveAnimatedWEBP", (160, 160), 17)}


@pytest.fixture(scope="module")
def toy_server(comfyui_v19, comfyui_dir, toy_models, tmp_path_factory):
    from harness.server import ComfyServer

    server = ComfyServer(comfyui_dir, tmp_path_factory.mktemp("toy-server"),
                         model_folders={kind: [toy_models / kind] for kind in ("diffusion_models", "vae_approx")})
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_toy_workflow_renders_chipmunk_and_dense_pictures(toy_server, name):
    saver, size, frames = WORKFLOWS[name]
    workflow = json.loads((REPO_ROOT / "workflows" / f"{name}.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "KSampler":
            node["widgets_values"][2] = 4  # steps: the graph is under test, not the pictures (2-core CPU)
    object_info = toy_server.object_info()
    assert wc.ui_link_problems(workflow, object_info) == []
    prompt = wc.to_prompt(workflow, object_info)
    assert wc.prompt_problems(prompt, object_info) == []
    entry = toy_server.run_prompt(prompt)
    savers = [node_id for node_id, node in prompt.items() if node["class_type"] == saver]
    assert len(savers) == 2  # Chipmunk and dense
    for node_id in savers:
        (path,) = toy_server.output_files(entry, node_id, "images")
        with Image.open(path) as image:
            assert image.size == size
            assert getattr(image, "n_frames", 1) == frames
