"""Where the lab finds ComfyUI, and how it imports it into this process.

The training scripts run on machines without ComfyUI installed: they take a ComfyUI tree, or the
source archive of one (unpacked once into a temporary folder), and import ComfyUI's model
classes from it. The quality harness uses the checkout named by ``CHIPMUNK_COMFYUI_DIR``, else the
default location below.
"""
from __future__ import annotations

import os
import sys
import tarfile
import tempfile
from pathlib import Path

COMFYUI_ENV = "CHIPMUNK_COMFYUI_DIR"
DEFAULT_LOCATIONS = (Path.home() / ".cache" / "comfyui-chipmunk" / "ComfyUI-v0.19.3",
                     Path.home() / ".cache" / "comfyui-chipmunk" / "ComfyUI")


def is_comfyui(path: Path) -> bool:
    return (path / "comfy").is_dir() and (path / "nodes.py").is_file()


def comfyui_dir() -> Path:
    """The ComfyUI checkout to use: ``$CHIPMUNK_COMFYUI_DIR``, else the first default that exists."""
    override = os.environ.get(COMFYUI_ENV)
    if override:
        return Path(override).expanduser()
    return next((p for p in DEFAULT_LOCATIONS if is_comfyui(p)), DEFAULT_LOCATIONS[0])


def resolve(source: str | os.PathLike) -> Path:
    """A ComfyUI tree from a tree or a source archive (``*.tar.gz`` holding ``ComfyUI/``)."""
    source = Path(source)
    if source.is_dir():
        if not is_comfyui(source):
            raise FileNotFoundError(f"{source} is not a ComfyUI tree (no comfy/ and nodes.py)")
        return source
    name = source.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        name = name.removesuffix(suffix)
    target = Path(tempfile.gettempdir()) / f"chipmunk-lab-{name}"
    tree = target / "ComfyUI"
    if not is_comfyui(tree):
        with tarfile.open(source) as archive:
            archive.extractall(target, filter="data")
    if not is_comfyui(tree):
        raise FileNotFoundError(f"{source} holds no ComfyUI/ tree")
    return tree


def import_comfy(tree: str | os.PathLike, cpu: bool) -> None:
    """Make ComfyUI importable and choose its device and attention before it decides itself.

    ``args`` only count before ``comfy.model_management`` is first imported; if something imported
    it earlier, its choices stand. PyTorch's SDPA is chosen for attention on every device (what
    ComfyUI picks on NVIDIA GPUs), so CPU runs compute what GPU runs compute.
    """
    tree = str(Path(tree).resolve())
    if tree not in sys.path:
        sys.path.insert(0, tree)
    from comfy.cli_args import args

    if "comfy.model_management" not in sys.modules:
        args.cpu = cpu
        args.use_pytorch_cross_attention = True
    import utils.extra_config  # noqa: F401  (ComfyUI's own start-up imports it before nodes)
