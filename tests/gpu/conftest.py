"""The GPU suite: what the CPU suite cannot show (compiled kernels, real CUDA graphs, pinned host
memory, failures inside a real capture). Collected only where CUDA is available (tests/conftest.py
leaves this folder out elsewhere); run it on an H100 or H200 before a change to kernels, graphs,
hooks or memory lands, and record the result in the README:

    python -m pytest tests/gpu -q      # with CHIPMUNK_COMFYUI_DIR naming a ComfyUI v0.19.3 tree

ComfyUI is imported in this process on the GPU (static VRAM); models are built from its classes at
FLUX.1-dev's width with fewer blocks and random weights (paths and equalities only, no quality).
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from harness import paths


@pytest.fixture(scope="session")
def comfy_gpu():
    """ComfyUI's modules for sampling on the GPU, and the pack's hooks (as bench/e2e_comfy.py)."""
    comfyui = paths.comfyui_dir()
    if not paths.comfyui_present(comfyui):
        pytest.fail(f"no ComfyUI at {comfyui}: set CHIPMUNK_COMFYUI_DIR")
    sys.path.insert(0, str(comfyui))
    from comfy.cli_args import args
    args.cpu = False
    import comfy.model_management  # noqa: F401
    import comfy.sample
    spec = importlib.util.spec_from_file_location("e2e_comfy", paths.REPO_ROOT / "bench" / "e2e_comfy.py")
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    return e2e, e2e.import_pack()


@pytest.fixture(scope="session")
def flux_gpu(comfy_gpu):
    """FLUX.1-dev's width (3072, 24 heads), 2 double + 4 single blocks, bf16, on the GPU."""
    import torch
    e2e, _ = comfy_gpu
    return e2e.build("flux", "cuda", torch.bfloat16, False, depth=2, depth_single_blocks=4)
