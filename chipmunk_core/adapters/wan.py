"""WAN2.1 blocks computed through Chipmunk.

A WAN block is self-attention over the video tokens (RoPE), cross-attention to the text (and the
CLIP image tokens of image-to-video models), then an FFN. Only the self-attention goes through
Chipmunk's attention override; the cross-attention keeps the user's options and stays dense; the
FFN is a sparse-delta MLP when MLP sparsity is on. Same operations, same order as ComfyUI's
WanAttentionBlock, so sparsity 0 reproduces the stock block exactly.
"""

from __future__ import annotations

import torch

from ..state import LayerCall
from .flux import two_layer_mlp


def attention_block(block, args: dict, layer: LayerCall, context_img_len) -> dict:
    import comfy.model_management
    from comfy.ldm.wan.model import repeat_e

    x, e, freqs, context = args["img"], args["vec"], args["pe"], args["txt"]
    options = args["transformer_options"]
    modulation = comfy.model_management.cast_to(block.modulation, dtype=x.dtype, device=x.device)
    e = (modulation + e).chunk(6, dim=1) if e.ndim < 4 else (modulation.unsqueeze(0) + e).unbind(2)

    def modulated(norm, shift, scale):
        return torch.addcmul(repeat_e(shift, x), norm(x), 1 + repeat_e(scale, x))

    layout = layer.call.layout(0, x.shape[1], x.device)
    y = block.self_attn(modulated(block.norm1, e[0], e[1]), freqs,
                        transformer_options=layer.attention_options(options, layout))
    x = torch.addcmul(x, y, repeat_e(e[2], x))
    del y
    x = x + block.cross_attn(block.norm3(x), context, context_img_len=context_img_len, transformer_options=options)
    y = two_layer_mlp(layer, "ffn", block.ffn, modulated(block.norm2, e[3], e[4]), layout.image_order)
    return {"img": torch.addcmul(x, y, repeat_e(e[5], x))}
