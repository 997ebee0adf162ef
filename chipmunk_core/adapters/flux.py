"""FLUX-style blocks (FLUX.1 and HunyuanVideo, which reuses them) computed through Chipmunk.

ComfyUI hands a block replacement the block's inputs; we compute the block from its own
submodules, the same operations in the same order as ComfyUI's DoubleStreamBlock /
SingleStreamBlock, with two changes: the joint attention goes through the layer's attention
override (sparse-delta attention, chained to the user's backend for anything it cannot serve), and
the image MLP (the fused MLP of single blocks) goes through the sparse-delta MLP. With both
sparsities at 0 the result is the stock block's, bit for bit.

ComfyUI is imported lazily: this module must import without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..state import LayerCall
from .weights import linear_weights, weight_identity


def _comfy():
    from comfy.ldm.flux import layers, math as flux_math
    return layers.apply_mod, flux_math.attention


def _split_heads(qkv: torch.Tensor, heads: int):
    """[B, N, 3 * H * D] -> q, k, v as [B, H, N, D] views."""
    batch, tokens, _ = qkv.shape
    return qkv.view(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)


def _mask(args: dict):
    return args.get("attn_mask", args.get("attention_mask"))


def two_layer_mlp(layer: LayerCall, stream: str, sequential, x, row_order):
    """Linear -> activation -> Linear, sparse-delta where the layer's MLP is Chipmunk's."""
    fc1, act, fc2 = sequential[0], sequential[1], sequential[2]
    state = layer.mlp_state(stream)
    if state is None:
        return sequential(x)
    if layer.mlp_is_dense(state, x):
        y = fc2(state.dense_step(x, fc1(x), row_order, layer.config))
        state.store_output(y)
        return y
    w1, b1 = linear_weights(fc1, x)
    w2, _ = linear_weights(fc2, x)
    return state.sparse_step(x, w1, b1, w2, row_order, layer.config, layer.generator(x.device),
                             w2_key=weight_identity(fc2, w2))


def double_block(block, args: dict, layer: LayerCall) -> dict:
    apply_mod, attention = _comfy()
    img, txt, vec, pe = args["img"], args["txt"], args["vec"], args["pe"]
    dims_img, dims_txt = args.get("modulation_dims_img"), args.get("modulation_dims_txt")
    img_mod1, img_mod2 = block.img_mod(vec)
    txt_mod1, txt_mod2 = block.txt_mod(vec)

    def qkv(norm, attn, x, mod, dims):
        q, k, v = _split_heads(attn.qkv(apply_mod(norm(x), (1 + mod.scale), mod.shift, dims)), block.num_heads)
        q, k = attn.norm(q, k, v)
        return q, k, v

    img_q, img_k, img_v = qkv(block.img_norm1, block.img_attn, img, img_mod1, dims_img)
    txt_q, txt_k, txt_v = qkv(block.txt_norm1, block.txt_attn, txt, txt_mod1, dims_txt)
    text_first = layer.call.shape.text_first
    first, second = ((txt_q, txt_k, txt_v), (img_q, img_k, img_v)) if text_first else \
        ((img_q, img_k, img_v), (txt_q, txt_k, txt_v))
    layout = layer.call.layout(txt.shape[1], img.shape[1], img.device)
    options = layer.attention_options(args["transformer_options"], layout)
    joint = attention(*(torch.cat((a, b), dim=2) for a, b in zip(first, second)),
                      pe=pe, mask=_mask(args), transformer_options=options)
    split = txt.shape[1] if text_first else img.shape[1]
    head, tail = joint[:, :split], joint[:, split:]
    txt_attn, img_attn = (head, tail) if text_first else (tail, head)

    img = img + apply_mod(block.img_attn.proj(img_attn), img_mod1.gate, None, dims_img)
    img_in = apply_mod(block.img_norm2(img), (1 + img_mod2.scale), img_mod2.shift, dims_img)
    img = img + apply_mod(two_layer_mlp(layer, "img", block.img_mlp, img_in, layout.image_order),
                          img_mod2.gate, None, dims_img)

    txt += apply_mod(block.txt_attn.proj(txt_attn), txt_mod1.gate, None, dims_txt)
    txt += apply_mod(block.txt_mlp(apply_mod(block.txt_norm2(txt), (1 + txt_mod2.scale), txt_mod2.shift, dims_txt)),
                     txt_mod2.gate, None, dims_txt)
    if txt.dtype == torch.float16:
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
    return {"img": img, "txt": txt}


def single_block(block, args: dict, layer: LayerCall) -> dict:
    apply_mod, attention = _comfy()
    x, vec, pe = args["img"], args["vec"], args["pe"]
    dims = args.get("modulation_dims")
    mod, _ = block.modulation(vec)
    x_in = apply_mod(block.pre_norm(x), (1 + mod.scale), mod.shift, dims)
    width, hidden = block.hidden_size, block.mlp_hidden_dim
    text_len = layer.call.text_len
    layout = layer.call.layout(text_len, x.shape[1] - text_len, x.device)
    state = layer.mlp_state("fused")
    sparse_mlp = state is not None and not layer.mlp_is_dense(state, x_in)

    if sparse_mlp:
        w1, b1 = linear_weights(block.linear1, x_in)
        qkv = F.linear(x_in, w1[: 3 * width], None if b1 is None else b1[: 3 * width])
    else:
        qkv, pre_activation = torch.split(block.linear1(x_in), [3 * width, hidden], dim=-1)
    q, k, v = _split_heads(qkv, block.num_heads)
    q, k = block.norm(q, k, v)
    attn = attention(q, k, v, pe=pe, mask=_mask(args),
                     transformer_options=layer.attention_options(args["transformer_options"], layout))

    if state is None:
        output = block.linear2(torch.cat((attn, block.mlp_act(pre_activation)), 2))
    elif sparse_mlp:
        w2, b2 = linear_weights(block.linear2, attn)
        mlp_out = state.sparse_step(x_in, w1[3 * width:], None if b1 is None else b1[3 * width:],
                                    w2[:, width:], layout.query_order, layer.config, layer.generator(x.device),
                                    w2_key=weight_identity(block.linear2, w2[:, width:]))
        output = F.linear(attn, w2[:, :width], b2) + mlp_out
    else:
        activation = state.dense_step(x_in, pre_activation, layout.query_order, layer.config)
        output = block.linear2(torch.cat((attn, activation), 2))
        w2, _ = linear_weights(block.linear2, attn)
        state.store_output(F.linear(activation, w2[:, width:]))
    x += apply_mod(output, mod.gate, None, dims)
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return {"img": x}
