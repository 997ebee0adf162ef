"""Core unit tests import the pack's core and kernels as subpackages of the pack, as ComfyUI does,
but without running the pack's __init__ (which needs ComfyUI): the pack is registered as a bare
package named ``chipmunk_pack`` whose path is the repository root."""

from __future__ import annotations

import sys
import types
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]

if "chipmunk_pack" not in sys.modules:
    package = types.ModuleType("chipmunk_pack")
    package.__path__ = [str(_REPO)]
    sys.modules["chipmunk_pack"] = package
