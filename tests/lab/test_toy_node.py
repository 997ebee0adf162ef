"""The toy prompt node inside real ComfyUI, and the toy model folders the pack registers."""
from __future__ import annotations

import pytest
import torch

from chipmunk_pack.lab import vocab
from harness.paths import REPO_ROOT

pytestmark = pytest.mark.comfyui


def test_the_pack_registers_the_toy_model_folders(chipmunk_pack_nodes):
    import folder_paths

    for kind in ("diffusion_models", "vae_approx"):
        assert str(REPO_ROOT / "lab" / "models" / kind) in folder_paths.get_folder_paths(kind)


def test_toy_prompt_node_makes_flux_and_wan_conditioning(comfy_inprocess, chipmunk_pack_nodes, caplog):
    node = chipmunk_pack_nodes["ChipmunkToyPrompt"]
    (flux,) = comfy_inprocess.run_node(node, text="a large cat at the top left on a blue gradient", model="toy FLUX",
                                       guidance=2.0)
    [[context, options]] = flux
    assert context.shape == (1, vocab.CONTEXT_TOKENS, vocab.FLUX_CONTEXT_WIDTH)
    assert options["pooled_output"].shape == (1, vocab.FLUX_CONTEXT_WIDTH) and options["guidance"] == 2.0
    assert torch.equal(context[0, 1], torch.from_numpy(vocab.word_vector("cat", vocab.FLUX_CONTEXT_WIDTH)))
    with caplog.at_level("WARNING"):
        (wan,) = comfy_inprocess.run_node(node, text="a cat playing jazz", model="toy WAN2.1")
    [[context, options]] = wan
    assert context.shape == (1, vocab.CONTEXT_TOKENS, vocab.WAN_CONTEXT_WIDTH) and options == {}
    assert "playing, jazz" in caplog.text
