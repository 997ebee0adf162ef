"""Print the Chipmunk cache memory of the default settings at the shapes that matter (computed),
per kind of cache, as the run plan counts it (bf16 caches, and the total with fp8 caches).

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
from chipmunk_pack.chipmunk_core.memory import ModelDims  # noqa: E402
from chipmunk_pack.chipmunk_core.plan import ATTENTION, MLP, layer_items  # noqa: E402

FLUX = ModelDims(57, 24, 128, 12288, 3072)          # 19 double blocks, then 38 single blocks
HUNYUAN = ModelDims(60, 24, 128, 12288, 3072)       # 20 double blocks, then 40 single blocks
CASES = [
    # name, family, dims, image tokens, text tokens, conditionings batched (CFG), double blocks
    ("FLUX.1-dev 1024x1024, short prompt", "flux", FLUX, 4096, 256, 1, 19),  # ComfyUI pads T5 to 256
    ("FLUX.1-dev 1024x1024, 512 text tokens", "flux", FLUX, 4096, 512, 1, 19),
    ("HunyuanVideo 720x1280x129, cfg 1", "hunyuan_video", HUNYUAN, 118800, 256, 1, 20),
    ("WAN2.1-14B 720p 81 frames, cfg", "wan", ModelDims(40, 40, 128, 13824, 5120), 75600, 0, 2, 0),
    ("WAN2.1-14B 480p 81 frames, cfg", "wan", ModelDims(40, 40, 128, 13824, 5120), 32760, 0, 2, 0),
    ("WAN2.1-1.3B 480p 81 frames, cfg", "wan", ModelDims(30, 12, 128, 8960, 1536), 32760, 0, 2, 0),
]


def sizes(settings, dims, image, text, rows, doubles, element):
    """GiB per kind, as the plan counts them: double blocks' MLPs see the image tokens only, and
    a single block's attention delta folds into its MLP output cache when that cache exists."""
    items = layer_items(settings, dims, rows, image + text, element, range(dims.n_layers), image_tokens=image,
                        image_mlp_layers=frozenset(range(doubles)),
                        folded_layers=frozenset(range(doubles, dims.n_layers)) if doubles else frozenset())
    return [sum(i.nbytes - i.folds for i in items if i.kind == kind) / 2**30
            for kind in (ATTENTION, MLP)]


if __name__ == "__main__":
    element = torch.empty((), dtype=torch.bfloat16).element_size()
    header = " ".join(f"{k:>10s}" for k in (ATTENTION, MLP, "total"))
    print(f"{'case (caches of a bf16 model)':40s} {'settings':>10s} {header}   {'fp8 caches':>10s}")
    for name, family, dims, image, text, rows, doubles in CASES:
        config = resolve_config(family)
        for label, settings in (("defaults", config), ("MLP 0.7", config.replace(mlp_sparsity=0.7))):
            bf16 = sizes(settings, dims, image, text, rows, doubles, element)
            fp8 = sizes(settings.replace(fp8_caches=True), dims, image, text, rows, doubles, element)
            print(f"{name:40s} {label:>10s} " + " ".join(f"{g:6.2f} GiB" for g in bf16 + [sum(bf16)])
                  + f"   {sum(fp8):6.2f} GiB")
