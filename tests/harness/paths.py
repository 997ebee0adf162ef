"""Where things are: the repository, the ComfyUI checkout, and the folder that links the pack."""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# ComfyUI names a custom-node package after its folder; users' clones are named like this, and
# the workflow templates are served under /api/workflow_templates/<PACK_NAME>/.
PACK_NAME = "ComfyUI-Chipmunk"
DEV_NODES_NAME = "chipmunk_dev_nodes"
DEV_NODES_DIR = REPO_ROOT / "tools" / "dev_nodes"
TINY_MODELS_SCRIPT = REPO_ROOT / "tools" / "tiny_models.py"

# Which ComfyUI the tests run against. tools/setup_env.sh prepares it and exports its location in
# CHIPMUNK_COMFYUI_DIR; without that variable the tests look where the set-up puts the version
# CHIPMUNK_COMFYUI_VERSION names (default: the primary one). Keep these in step with setup_env.sh.
COMFYUI_ENV = "CHIPMUNK_COMFYUI_DIR"
VERSION_ENV = "CHIPMUNK_COMFYUI_VERSION"
REQUIRE_ENV = "CHIPMUNK_REQUIRE_COMFYUI"
PRIMARY_COMFYUI_VERSION = "0.19.3"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "comfyui-chipmunk"


def requested_version() -> str:
    return os.environ.get(VERSION_ENV, "").strip().removeprefix("v") or PRIMARY_COMFYUI_VERSION


def comfyui_dir() -> Path:
    """The ComfyUI checkout the tests use (it may not exist)."""
    override = os.environ.get(COMFYUI_ENV)
    if override:
        return Path(override).expanduser()
    return cache_dir() / f"ComfyUI-v{requested_version()}"


def comfyui_present(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir()


def comfyui_version(path: Path) -> tuple[int, ...]:
    """The version a ComfyUI tree declares in its comfyui_version.py, e.g. (0, 19, 3)."""
    match = re.search(r"""^__version__\s*=\s*["']([0-9.]+)["']""",
                      (path / "comfyui_version.py").read_text(), re.MULTILINE)
    if match is None:
        raise ValueError(f"no __version__ in {path / 'comfyui_version.py'}")
    return tuple(int(part) for part in match.group(1).split("."))


def comfyui_required() -> bool:
    """True where a missing ComfyUI is an error, not a reason to skip (CI sets the variable)."""
    return os.environ.get(REQUIRE_ENV) == "1"


def comfyui_missing_reason(path: Path) -> str:
    version = requested_version()
    return (f"no ComfyUI checkout at {path}: run tools/setup_env.sh (it clones ComfyUI v{version} "
            f"there, or unpacks the archive CHIPMUNK_COMFYUI_ARCHIVE names), or "
            f"`git clone --branch v{version} https://github.com/Comfy-Org/ComfyUI {path}`, or set "
            f"{COMFYUI_ENV} to a checkout")


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
