"""Where things are: the repository, the ComfyUI checkout, and the folder that links the pack."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# ComfyUI names a custom-node package after its folder; users' clones are named like this, and
# the workflow templates are served under /api/workflow_templates/<PACK_NAME>/.
PACK_NAME = "ComfyUI-Chipmunk"
DEV_NODES_NAME = "chipmunk_dev_nodes"
DEV_NODES_DIR = REPO_ROOT / "tools" / "dev_nodes"
TINY_MODELS_SCRIPT = REPO_ROOT / "tools" / "tiny_models.py"

COMFYUI_ENV = "CHIPMUNK_COMFYUI_DIR"
DEFAULT_COMFYUI_DIR = Path.home() / ".cache" / "comfyui-chipmunk" / "ComfyUI"
COMFYUI_COMMIT = "a125cd84b054a57729b5eecab930ca9408719832"  # v0.3.64, as in tools/setup_env.sh


def comfyui_dir() -> Path:
    """The ComfyUI checkout the tests use (it may not exist)."""
    override = os.environ.get(COMFYUI_ENV)
    return Path(override).expanduser() if override else DEFAULT_COMFYUI_DIR


def comfyui_present(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir()


def comfyui_missing_reason(path: Path) -> str:
    return (f"no ComfyUI checkout at {path}: run tools/setup_env.sh (clones ComfyUI v0.3.64 "
            f"there), or `git clone https://github.com/Comfy-Org/ComfyUI {path}` and "
            f"`git -C {path} checkout {COMFYUI_COMMIT[:8]}`, or set {COMFYUI_ENV} to a checkout")


def link_custom_nodes(folder: Path) -> Path:
    """Make ``folder`` a custom_nodes folder holding links to the pack and the dev nodes.

    The pack is linked, never copied, so ComfyUI imports the working tree as it is.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in ((PACK_NAME, REPO_ROOT), (DEV_NODES_NAME, DEV_NODES_DIR)):
        link = folder / name
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    return folder


def load_module(name: str, path: Path):
    """Import a file or package folder under a module name of our choosing (no sys.path edits)."""
    if name in sys.modules:
        return sys.modules[name]
    location = path / "__init__.py" if path.is_dir() else path
    spec = importlib.util.spec_from_file_location(name, location)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def tiny_models_module():
    """tools/tiny_models.py, imported as a module."""
    return load_module("chipmunk_tools_tiny_models", TINY_MODELS_SCRIPT)


def dev_nodes_module():
    """tools/dev_nodes, imported as a module (for ``random_conditioning``)."""
    return load_module("chipmunk_tools_dev_nodes", DEV_NODES_DIR)
