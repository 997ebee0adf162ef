"""Tiny, randomly initialised diffusion transformers built from ComfyUI's own model classes.

No real weights can be used in tests, so this module builds the real FLUX, HunyuanVideo and
WAN2.1 classes of a ComfyUI checkout with small configurations and seeded random weights
(norm scales 1, biases 0, everything else N(0, 0.02)). It offers two things:

* checkpoints: ``.safetensors`` files whose key names and shapes the stock "Load Diffusion Model"
  node (``comfy.sd.load_diffusion_model`` and ``comfy.model_detection``) recognises. Each family's
  ``unet_config`` below is exactly what detection reads back from the weights; ``verify_checkpoint``
  checks that round trip. FLUX detection hard-codes width 3072, 24 heads and text width 4096, so the
  FLUX checkpoint is full width and shallow (1 double + 1 single block, about 540M parameters).
* an in-process ``ModelPatcher`` around a narrow FLUX (width 256) built through the same model
  config and model classes the loader uses, minus the detection step that would reject it.

ComfyUI must be importable before the model functions are called: ``import_comfy(comfyui_dir)``
puts the checkout on ``sys.path`` and selects the CPU unless ``comfy.model_management`` was
already imported by the caller.

Command line (writes missing checkpoints, then loads each through the real loader)::

    python tools/tiny_models.py --comfyui DIR --out DIR/models/diffusion_models [--family flux ...]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Bump when the weights a given (family, seed) produces change, so that stale files are rebuilt.
FORMAT_VERSION = "1"
DEFAULT_SEED = 0

# What comfy.model_detection.detect_unet_config returns for each checkpoint (ComfyUI v0.3.64).
FAMILY_CONFIGS: dict[str, dict] = {
    "flux": {
        "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16,
        "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0,
        "num_heads": 24, "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 56, 56],
        "theta": 10000, "qkv_bias": True, "guidance_embed": True,
    },
    "hunyuan_video": {
        "image_model": "hunyuan_video", "in_channels": 16, "patch_size": [1, 2, 2],
        "out_channels": 16, "vec_in_dim": 768, "axes_dim": [16, 56, 56], "meanflow": False,
        "context_in_dim": 4096, "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 2,
        "depth": 2, "depth_single_blocks": 2, "theta": 256, "qkv_bias": True, "byt5": False,
        "guidance_embed": True,
    },
    "wan_t2v": {
        "image_model": "wan2.1", "dim": 256, "out_dim": 16, "num_heads": 2, "ffn_dim": 1024,
        "num_layers": 4, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1),
        "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16, "model_type": "t2v",
    },
    "wan_i2v": {
        "image_model": "wan2.1", "dim": 256, "out_dim": 16, "num_heads": 2, "ffn_dim": 1024,
        "num_layers": 4, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1),
        "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": 36, "model_type": "i2v",
    },
}

CHECKPOINT_NAMES = {
    "flux": "chipmunk-tiny-flux.safetensors",
    "hunyuan_video": "chipmunk-tiny-hunyuan-video.safetensors",
    "wan_t2v": "chipmunk-tiny-wan21-t2v.safetensors",
    "wan_i2v": "chipmunk-tiny-wan21-i2v.safetensors",
}

# The narrow in-process FLUX: same classes, width 256 (2 heads of 128), short text width.
NARROW_FLUX_CONFIG = dict(
    FAMILY_CONFIGS["flux"], hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2,
    context_in_dim=64,
)


def import_comfy(comfyui_dir: str | os.PathLike) -> None:
    """Make a ComfyUI checkout importable in this process, on the CPU.

    ``args.cpu`` only takes effect if it is set before ``comfy.model_management`` is imported.
    ``utils.extra_config`` has to be imported before ``nodes`` (ComfyUI's own start-up order).
    """
    comfyui_dir = str(Path(comfyui_dir).resolve())
    if comfyui_dir not in sys.path:
        sys.path.insert(0, comfyui_dir)
    from comfy.cli_args import args
    if "comfy.model_management" not in sys.modules:
        args.cpu = True
    import utils.extra_config  # noqa: F401


def init_random_(module: torch.nn.Module, seed: int) -> None:
    """Seeded init in place: norm scales 1, biases 0, every other tensor N(0, 0.02)."""
    norm_params = set()
    for name, sub in module.named_modules():
        if "Norm" in type(sub).__name__:
            for pname, _ in sub.named_parameters(recurse=False):
                norm_params.add(f"{name}.{pname}" if name else pname)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                param.zero_()
            elif name in norm_params:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)


def build_model(unet_config: dict, dtype: torch.dtype, seed: int):
    """A ``comfy.model_base.BaseModel`` for ``unet_config`` with seeded random weights.

    Goes through ``comfy.model_detection.model_config_from_unet_config``, the loader's own
    mapping from a detected config to a ``comfy.supported_models`` entry and model class.
    """
    import comfy.model_detection

    model_config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    if model_config is None:
        raise ValueError(f"ComfyUI knows no model for {unet_config}")
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    init_random_(model.diffusion_model, seed)
    return model


def random_state_dict(family: str, seed: int = DEFAULT_SEED,
                      dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The diffusion-model weights of ``family`` under the key names the loader expects."""
    model = build_model(FAMILY_CONFIGS[family], dtype, seed)
    return {k: v.contiguous() for k, v in model.diffusion_model.state_dict().items()}


def _metadata(family: str, seed: int) -> dict[str, str]:
    return {"chipmunk_tiny_family": family, "chipmunk_tiny_seed": str(seed),
            "chipmunk_tiny_version": FORMAT_VERSION,
            "chipmunk_tiny_config": json.dumps(FAMILY_CONFIGS[family])}


def checkpoint_is_current(path: Path, family: str, seed: int = DEFAULT_SEED) -> bool:
    """Whether ``path`` holds what ``write_checkpoint`` would write (no ComfyUI needed)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as existing:
            return existing.metadata() == _metadata(family, seed)
    except Exception:  # missing, unreadable or truncated
        return False


def write_checkpoint(family: str, out_dir: str | os.PathLike, seed: int = DEFAULT_SEED,
                     force: bool = False) -> Path:
    """Write ``family``'s checkpoint into ``out_dir`` unless an identical one is there."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CHECKPOINT_NAMES[family]
    if not force and checkpoint_is_current(path, family, seed):
        return path
    log.info("building tiny %s checkpoint %s", family, path)
    state_dict = random_state_dict(family, seed)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    save_file(state_dict, str(partial), metadata=_metadata(family, seed))
    os.chmod(partial, 0o644)
    os.replace(partial, path)
    return path


def verify_checkpoint(path: str | os.PathLike, family: str):
    """Load ``path`` through the stock loader; check detection read back the intended config.

    Returns the ``ModelPatcher`` the loader made.
    """
    import comfy.model_detection
    import comfy.sd
    import comfy.utils

    state_dict = comfy.utils.load_torch_file(str(path))
    detected = comfy.model_detection.detect_unet_config(state_dict, "")
    expected = FAMILY_CONFIGS[family]
    mismatched = {k: (detected.get(k), v) for k, v in expected.items()
                  if _normalise(detected.get(k)) != _normalise(v)}
    if mismatched:
        raise AssertionError(f"{path}: detection differs (detected, intended): {mismatched}")
    return comfy.sd.load_diffusion_model(str(path))


def _normalise(value):
    return list(value) if isinstance(value, tuple) else value


def narrow_flux_patcher(seed: int = DEFAULT_SEED, dtype: torch.dtype = torch.float32,
                        **overrides):
    """A real ``comfy.model_patcher.ModelPatcher`` around a narrow FLUX with random weights.

    Mirrors ``comfy.sd.load_diffusion_model_state_dict`` after detection: model config ->
    ``get_model`` -> ``load_model_weights`` -> ``ModelPatcher``. ``overrides`` change the config
    (e.g. ``depth=1``); text width is ``context_in_dim`` (64), pooled width ``vec_in_dim`` (768).
    """
    import comfy.model_management
    import comfy.model_patcher

    unet_config = dict(NARROW_FLUX_CONFIG, **overrides)
    state_dict = build_model(unet_config, dtype, seed).diffusion_model.state_dict()
    model = _model_with_weights(unet_config, dtype, state_dict)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())


def _model_with_weights(unet_config: dict, dtype: torch.dtype, state_dict: dict):
    import comfy.model_detection
    import comfy.model_management

    model_config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    manual_cast = comfy.model_management.unet_manual_cast(
        dtype, comfy.model_management.get_torch_device(), model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    model = model_config.get_model(state_dict, "")
    model = model.to(comfy.model_management.unet_offload_device())
    model.load_model_weights(state_dict, "")
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", required=True, help="ComfyUI checkout to import")
    parser.add_argument("--out", required=True, help="folder for the checkpoints")
    parser.add_argument("--family", action="append", choices=sorted(FAMILY_CONFIGS),
                        help="family to build (repeatable; default: all)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--force", action="store_true", help="rebuild existing files")
    parser.add_argument("--verify", action="store_true",
                        help="load each checkpoint through the stock loader afterwards")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[tiny_models] %(message)s")

    for family in ns.family or sorted(FAMILY_CONFIGS):
        path = Path(ns.out) / CHECKPOINT_NAMES[family]
        if ns.force or ns.verify or not checkpoint_is_current(path, family, ns.seed):
            import_comfy(ns.comfyui)  # only when needed: importing ComfyUI takes seconds
            write_checkpoint(family, ns.out, ns.seed, ns.force)
        if ns.verify:
            patcher = verify_checkpoint(path, family)
            params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
            log.info("%s loads through the stock loader: %s, %.1fM parameters", path.name,
                     type(patcher.model).__name__, params / 1e6)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
