"""The workflow the browser tests load from the template browser and run (``RUN_TEMPLATE``).

It is the pack's own toy text-to-image workflow: it runs with no downloads (the pack registers its
toy models with ComfyUI) and renders real pictures, Chipmunk and dense side by side. The tiny
FLUX graph below (tests/workflows/tiny_flux.json with a random tiny autoencoder, served from a
test-only custom-node folder) can stand in with ``RUN_TEMPLATE = TINY_RUN``.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from harness.paths import PACK_NAME, REPO_ROOT

TEST_TEMPLATES = "chipmunk_browser_test"  # custom-node folder holding the test-only template
TINY_LATENT_WORKFLOW = REPO_ROOT / "tests" / "workflows" / "tiny_flux.json"
TAE_NAME = "taef1"  # "Load VAE" lists it when taef1_encoder.* and taef1_decoder.* are in vae_approx


@dataclass(frozen=True)
class TemplateRun:
    section: str     # the template browser's section: the custom-node folder's name
    name: str        # the workflow's file name without .json
    image_node: str  # type of the node that shows the result image


TINY_RUN = TemplateRun(TEST_TEMPLATES, "tiny_flux_image", "PreviewImage")
RUN_TEMPLATE = TemplateRun(PACK_NAME, "Chipmunk toy text to image", "SaveImage")


def image_workflow(latent_workflow: dict) -> dict:
    """``latent_workflow`` with its SaveLatent node replaced by Load VAE (the tiny autoencoder)
    -> VAE Decode -> Preview Image, so that a run ends in an image on the canvas."""
    workflow = copy.deepcopy(latent_workflow)
    (save,) = [n for n in workflow["nodes"] if n["type"] == "SaveLatent"]
    workflow["nodes"].remove(save)
    samples_link = save["inputs"][0]["link"]
    first_id, first_link = workflow["last_node_id"] + 1, workflow["last_link_id"] + 1
    loader_id, decode_id, preview_id = first_id, first_id + 1, first_id + 2
    vae_link, image_link = first_link, first_link + 1
    x, y = save["pos"]
    order = len(workflow["nodes"])

    def node(node_id, node_type, pos, size, inputs, outputs, widgets=None):
        return {"id": node_id, "type": node_type, "pos": pos, "size": size, "flags": {},
                "order": order + node_id - first_id, "mode": 0, "inputs": inputs,
                "outputs": outputs, "properties": {"Node name for S&R": node_type},
                **({"widgets_values": widgets} if widgets is not None else {})}

    workflow["nodes"] += [
        node(loader_id, "VAELoader", [x, y + 110], [220, 60], [],
             [{"name": "VAE", "type": "VAE", "links": [vae_link], "slot_index": 0}], [TAE_NAME]),
        node(decode_id, "VAEDecode", [x, y], [220, 50],
             [{"name": "samples", "type": "LATENT", "link": samples_link},
              {"name": "vae", "type": "VAE", "link": vae_link}],
             [{"name": "IMAGE", "type": "IMAGE", "links": [image_link], "slot_index": 0}]),
        node(preview_id, "PreviewImage", [x + 260, y], [300, 320],
             [{"name": "images", "type": "IMAGE", "link": image_link}], []),
    ]
    for link in workflow["links"]:
        if link[0] == samples_link:
            link[3:5] = [decode_id, 0]
    workflow["links"] += [[vae_link, loader_id, 0, decode_id, 1, "VAE"],
                          [image_link, decode_id, 0, preview_id, 0, "IMAGE"]]
    workflow["last_node_id"], workflow["last_link_id"] = preview_id, image_link
    return workflow


def write_random_tae(folder: Path, seed: int = 0) -> Path:
    """A tiny autoencoder for 16-channel latents with seeded random weights, as the two files
    "Load VAE" reads for ``taef1``. It turns any latent into an (unremarkable) image."""
    import torch
    from comfy.taesd.taesd import TAESD
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    files = {part: folder / f"{TAE_NAME}_{part}.safetensors" for part in ("encoder", "decoder")}
    if all(path.exists() for path in files.values()):
        return folder
    generator = torch.Generator().manual_seed(seed)
    tae = TAESD(latent_channels=16)
    with torch.no_grad():
        for parameter in tae.parameters():
            if parameter.dim() > 1:
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * fan_in ** -0.5)
            else:
                parameter.zero_()
    for part, module in (("encoder", tae.taesd_encoder), ("decoder", tae.taesd_decoder)):
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(files[part]))
    return folder


def write_test_templates(custom_nodes: Path) -> Path:
    """The test-only custom-node folder whose workflows/ holds the workflow under test."""
    folder = custom_nodes / TEST_TEMPLATES
    (folder / "workflows").mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    workflow = image_workflow(json.loads(TINY_LATENT_WORKFLOW.read_text(encoding="utf-8")))
    (folder / "workflows" / f"{RUN_TEMPLATE.name}.json").write_text(json.dumps(workflow, indent=1))
    return folder
