"""Print the Chipmunk cache memory of the reference settings at the shapes that matter (computed).

Usage: python tools/cache_memory.py   (run from the repository root; needs only torch)
"""

import sys
import types
from pathlib import Path

root = Path(__file__).resolve().parents[1]
package = types.ModuleType("chipmunk_pack")
package.__path__ = [str(root)]
sys.modules.setdefault("chipmunk_pack", package)

import torch  # noqa: E402

from chipmunk_pack.chipmunk_core.config import resolve_config  # noqa: E402
from chipmunk_pack.chipmunk_core.memory import ModelDims, cache_bytes  # noqa: E402

CASES = [
    # name, family, dims, tokens, conditionings batched (CFG)
    ("FLUX.1-dev 1024x1024, cfg 1", "flux", ModelDims(57, 24, 128, 12288, 3072), 4096 + 512, 1),
    ("HunyuanVideo 720x1280x129, cfg 1", "hunyuan_video", ModelDims(60, 24, 128, 12288, 3072), 118800 + 256, 1),
    ("WAN2.1-14B 720p 81 frames, cfg", "wan21", ModelDims(40, 40, 128, 13824, 5120), 75600, 2),
    ("WAN2.1-14B 480p 81 frames, cfg", "wan21", ModelDims(40, 40, 128, 13824, 5120), 32760, 2),
    ("WAN2.1-1.3B 480p 81 frames, cfg", "wan21", ModelDims(30, 12, 128, 8960, 1536), 32760, 2),
]

if __name__ == "__main__":
    print(f"{'case':40s} {'defaults':>10s} {'+ MLP 0.7':>10s}")
    for name, family, dims, tokens, batch in CASES:
        config = resolve_config(family)
        with_mlp = config.replace(mlp_sparsity=0.7)
        sizes = [cache_bytes(c, dims, batch, tokens, torch.bfloat16) / 2**30 for c in (config, with_mlp)]
        print(f"{name:40s} {sizes[0]:8.1f} GiB {sizes[1]:8.1f} GiB")
