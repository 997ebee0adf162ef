"""Fixtures for testing the pack in a real ComfyUI.

ComfyUI is not on any package registry; the tests use a checkout at ``$CHIPMUNK_COMFYUI_DIR``,
else ``~/.cache/comfyui-chipmunk/ComfyUI`` (where tools/setup_env.sh puts it). Tests that need it
skip, saying how to get it, only when neither exists.

- ``comfy_inprocess``: ComfyUI imported into this process on the CPU (harness.inprocess).
- ``narrow_flux``: a fresh narrow FLUX ModelPatcher for fast in-process sampling.
- ``chipmunk_pack_nodes``: the pack imported the way ComfyUI imports it; its node classes.
- ``tiny_checkpoints``: tiny checkpoints, one per family, built once and cached
  (``$CHIPMUNK_TINY_MODELS_DIR``, else the pytest cache).
- ``comfy_server``: one real ComfyUI server for the whole session, with the pack, the dev
  nodes and the tiny checkpoints.
"""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from harness import paths


# Unit tests import the core and the kernels as subpackages of the pack (their relative imports
# need it) without running the pack's __init__ (which needs ComfyUI), and without putting the
# pack's folders on sys.path (a top-level ``kernels`` would shadow a PyPI package of that name):
# the repository root is registered as a bare package named ``chipmunk_pack``.
if "chipmunk_pack" not in sys.modules:
    _package = types.ModuleType("chipmunk_pack")
    _package.__path__ = [str(Path(__file__).resolve().parents[1])]
    sys.modules["chipmunk_pack"] = _package


def pytest_configure(config):
    config.addinivalue_line("markers", "comfyui: needs the real ComfyUI checkout")
    config.addinivalue_line(
        "markers", "chipmunk_node: needs the pack's ChipmunkAccelerate node (fails without it)")


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    path = paths.comfyui_dir()
    if not paths.comfyui_present(path):
        pytest.skip(paths.comfyui_missing_reason(path))
    return path


@pytest.fixture(scope="session")
def comfy_inprocess(comfyui_dir):
    from harness.inprocess import InProcessComfy

    return InProcessComfy(comfyui_dir)


@pytest.fixture
def narrow_flux(comfy_inprocess):
    return comfy_inprocess.narrow_flux()


@pytest.fixture(scope="session")
def chipmunk_pack_nodes(comfy_inprocess, tmp_path_factory) -> dict:
    return comfy_inprocess.load_pack(tmp_path_factory.mktemp("custom_nodes"))


@pytest.fixture(scope="session")
def tiny_models_dir(request, tmp_path_factory) -> Path:
    override = os.environ.get("CHIPMUNK_TINY_MODELS_DIR")
    if override:
        return Path(override)
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("chipmunk-tiny-models"))
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_checkpoints(comfy_inprocess, tiny_models_dir) -> dict[str, Path]:
    """Family -> checkpoint path (built on first use; later sessions reuse identical files)."""
    tiny = comfy_inprocess.tiny_models
    return {family: tiny.write_checkpoint(family, tiny_models_dir)
            for family in tiny.FAMILY_CONFIGS}


@pytest.fixture(scope="session")
def comfy_server(comfyui_dir, tiny_checkpoints, tiny_models_dir, tmp_path_factory):
    from harness.server import ComfyServer

    server = ComfyServer(comfyui_dir, tmp_path_factory.mktemp("comfyui-server"),
                         model_folders={"diffusion_models": [tiny_models_dir]})
    server.start()
    try:
        yield server
    finally:
        server.stop()
