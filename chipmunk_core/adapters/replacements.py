"""The only model code Chipmunk replaces: MLPs, which no ComfyUI hook reaches.

Two kinds, each used only where a structural fingerprint matches and, once per loaded model, a
parity self-check confirms that the replacement at sparsity 0 gives the stock output bit for bit:

- "sequential": an ``nn.Sequential(Linear, GELU(tanh), Linear)`` MLP (FLUX/HunyuanVideo image MLPs
  of two-stream blocks, WAN FFNs). The block around it stays ComfyUI's.
- "single_block": FLUX's ``SingleStreamBlock``, whose MLP is fused into ``linear1``/``linear2``: the
  block is computed here (same operations, same order), its attention still through ComfyUI's
  attention function and so through the attention override. A call that carries attention patches
  (``attn1_patch`` / ``attn1_output_patch``: NAG, KV caches) runs the stock block instead.
  Its per-token work (norm and modulation; query/key norms and rotary embedding; the gated
  residual) goes through one-pass kernels (``fused``) where the block's norms are ComfyUI's own
  and a second self-check finds the kernels equal to ComfyUI's operations within bf16 rounding;
  otherwise through ComfyUI's own operations. Where the plan folds the layer, ``linear2`` of the
  attention's delta cache lives in the MLP's output cache (the attention keeps its key lists only).

- "double_block": FLUX's ``DoubleStreamBlock`` (text first), only for its per-token work: the
  same operations in the same order with norms, modulation, query/key norms, rotary embedding and
  gated residuals in the one-pass kernels (queries and keys written straight into the joint
  sequence's buffers); its image MLP is still the "sequential" replacement and its attention
  ComfyUI's attention function. Used where its self-check finds it equal to the stock block within
  bf16 rounding; the inputs are not changed in place.

Everything else keeps its stock code and Chipmunk serves its attention only.
ComfyUI is imported lazily: this module must import without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect

import torch
import torch.nn.functional as F

from ... import kernels
from ..mlp import SparseDeltaMLP
from .weights import linear_weights

SINGLE_BLOCK_PARAMETERS = ["x", "vec", "pe", "attn_mask", "modulation_dims", "transformer_options"]
DOUBLE_BLOCK_PARAMETERS = ["img", "txt", "vec", "pe", "attn_mask", "modulation_dims_img", "modulation_dims_txt",
                           "transformer_options"]
ATTENTION_PATCHES = ("attn1_patch", "attn1_output_patch")


# --- fingerprints ---------------------------------------------------------------------------------
def _linear_problem(module, name: str) -> str | None:
    if not isinstance(module, torch.nn.Linear):
        return f"{name} is {type(module).__name__}, not a Linear"
    cls = type(module)
    if cls is not torch.nn.Linear and not cls.__module__.startswith("comfy.ops"):
        return f"{name} is {cls.__module__}.{cls.__name__}, not one of ComfyUI's own Linear ops"
    return None


def _gelu_tanh_problem(module, name: str) -> str | None:
    if type(module) is not torch.nn.GELU or module.approximate != "tanh":
        return f"{name} is {type(module).__name__}, not GELU(tanh)"
    return None


def _flux_block_problem(module, class_name: str, parameters: list[str]) -> str | None:
    cls = type(module)
    if cls.__name__ != class_name or cls.__module__ != "comfy.ldm.flux.layers":
        return f"block is {cls.__module__}.{cls.__name__}"
    found = list(inspect.signature(cls.forward).parameters)[1:]
    if found != parameters:
        return f"forward takes ({', '.join(found)})"
    return None


def fingerprint(kind: str, module) -> str | None:
    """None when ``module`` is a structure Chipmunk's MLP replacement knows, else why not."""
    if kind == "sequential":
        # Subclasses are judged by what they hold and by the self-check against their own forward
        # (newer ComfyUI's WanFeedForward folds the GELU into fc2's kernel).
        if not isinstance(module, torch.nn.Sequential) or len(module) != 3:
            return f"MLP is {type(module).__name__}, not Sequential(Linear, GELU, Linear)"
        fc1, act, fc2 = module
        problem = _linear_problem(fc1, "fc1") or _gelu_tanh_problem(act, "activation") or _linear_problem(fc2, "fc2")
        if problem is None and (fc1.out_features != fc2.in_features or fc1.in_features != fc2.out_features):
            problem = "fc1/fc2 shapes do not chain"
        return problem
    if kind == "single_block":
        problem = _flux_block_problem(module, "SingleStreamBlock", SINGLE_BLOCK_PARAMETERS)
        if problem:
            return problem
        if getattr(module, "yak_mlp", False):
            return "MLP is gated (YakMLP)"
        width, hidden = module.hidden_size, module.mlp_hidden_dim
        if getattr(module, "mlp_hidden_dim_first", hidden) != hidden:
            return "MLP is gated (SiLU-gated, twice as wide)"
        problem = (_gelu_tanh_problem(module.mlp_act, "activation") or _linear_problem(module.linear1, "linear1")
                   or _linear_problem(module.linear2, "linear2"))
        if problem is None and (module.linear1.out_features != 3 * width + hidden
                                or module.linear2.in_features != width + hidden):
            problem = "fused split sizes differ from 3 x width + MLP width"
        return problem
    if kind == "double_block":
        problem = _flux_block_problem(module, "DoubleStreamBlock", DOUBLE_BLOCK_PARAMETERS)
        if problem:
            return problem
        if getattr(module, "flipped_img_txt", False):
            return "image tokens come first"
        for stream in ("img", "txt"):
            attention = getattr(module, f"{stream}_attn", None)
            problem = (_layer_norm_problem(getattr(module, f"{stream}_norm1", None), f"{stream}_norm1")
                       or _layer_norm_problem(getattr(module, f"{stream}_norm2", None), f"{stream}_norm2")
                       or _qk_norm_problem(getattr(attention, "norm", None), module.hidden_size // module.num_heads))
            if problem:
                return problem
        return None
    return f"unknown kind {kind!r}"


def _rms_norm_kind(module, head_dim: int | None = None) -> str | None:
    """"ops" (ComfyUI's RMSNorm op: ``weight``, ``eps``), "scale" (older ComfyUI's FLUX RMSNorm:
    ``scale``, eps 1e-6) or None when ``module`` is neither (over ``head_dim`` channels, when given)."""
    def over_head_dim(t):
        return head_dim is None or tuple(t.shape) == (head_dim,)

    if (isinstance(module, torch.nn.RMSNorm) and type(module).__module__.startswith("comfy.ops")
            and module.weight is not None and over_head_dim(module.weight)):
        return "ops"
    if (type(module).__name__ == "RMSNorm" and type(module).__module__ == "comfy.ldm.flux.layers"
            and isinstance(getattr(module, "scale", None), torch.nn.Parameter) and over_head_dim(module.scale)):
        return "scale"
    return None


def _layer_norm_problem(module, name: str) -> str | None:
    if not isinstance(module, torch.nn.LayerNorm) or module.weight is not None or module.bias is not None:
        return f"{name} is {type(module).__name__}, not a LayerNorm without affine part"
    return None


def _qk_norm_problem(norm, head_dim: int) -> str | None:
    if type(norm).__name__ != "QKNorm":
        return f"query/key norm is {type(norm).__name__}"
    for name in ("query_norm", "key_norm"):
        module = getattr(norm, name, None)
        if _rms_norm_kind(module, head_dim) is None:
            return f"{name} is {type(module).__module__}.{type(module).__name__}, not an RMSNorm over the head dim"
    return None


def fused_problem(block) -> str | None:
    """None when a single block's norms are ones the one-pass kernels compute (``kernels``'
    ``layer_norm_modulate`` and ``qk_norm_rope``), else why not."""
    return (_layer_norm_problem(getattr(block, "pre_norm", None), "pre-norm")
            or _qk_norm_problem(getattr(block, "norm", None), block.hidden_size // block.num_heads))


@contextlib.contextmanager
def _rms_norm_weight(module, like):
    """(weight in ``like``'s dtype and device, eps) of a query/key norm of a kind
    ``_rms_norm_kind`` names (the fingerprint checked it), as its forward uses them."""
    if _rms_norm_kind(module) == "scale":
        yield module.scale.to(device=like.device, dtype=like.dtype), 1e-6
        return
    with linear_weights(module, like) as (weight, _):
        yield weight, module.eps if module.eps is not None else torch.finfo(like.dtype).eps  # torch's default


def _qk_norm_rope(block, qkv, pe, norm=None, out=None):
    """Normed, rotated queries and keys ([B, H, N, D]) and the values' view, from a fused qkv
    projection (``qkv`` [B, N, >= 3 * width]) in one pass; ``norm``: the QKNorm (the single
    block's by default). ``out``: views (q, k, v) to write all three into instead."""
    norm = block.norm if norm is None else norm
    heads, width = block.num_heads, block.hidden_size
    with _rms_norm_weight(norm.query_norm, qkv) as (w_q, eps_q), _rms_norm_weight(norm.key_norm, qkv) as (w_k, eps_k):
        if out is not None:
            return kernels.qk_norm_rope(qkv, heads, w_q, w_k, eps_q, eps_k, pe, out)
        q, k = kernels.qk_norm_rope(qkv, heads, w_q, w_k, eps_q, eps_k, pe)
    return q, k, qkv[..., 2 * width:3 * width].unflatten(-1, (heads, -1)).transpose(1, 2)


# --- the replaced code -----------------------------------------------------------------------------
def _throwaway_dense(x):
    """State and row order for a dense computation that keeps nothing (the self-check)."""
    from ..config import FAMILY_DEFAULTS
    order = torch.arange(x.shape[1], device=x.device, dtype=torch.int32)
    return SparseDeltaMLP(), order, FAMILY_DEFAULTS["flux"]


def sequential_mlp(module, layer, stream: str, x):
    """Sequential(Linear, GELU(tanh), Linear) through the sparse-delta MLP of ``layer``.

    ``layer`` None: a dense computation that keeps nothing (the self-check's "sparsity 0").
    """
    fc1, fc2 = module[0], module[2]
    if layer is None:
        state, order, config = _throwaway_dense(x)
        return fc2(state.dense_step(x, fc1(x), order, config))
    state, order, config = layer.mlp_state(stream), layer.layout.image_order, layer.config
    if layer.mlp_is_dense(state, x):
        y = fc2(state.dense_step(x, fc1(x), order, config))
        state.store_output(y)
        if state.fc2_scratch is not None:
            with linear_weights(fc2, x) as (w2, _):
                state.reserve_fc2(w2)
        return y
    with linear_weights(fc1, x) as (w1, b1), linear_weights(fc2, x) as (w2, _):
        return state.sparse_step(x, w1, b1, w2, order, config, layer.seeds)


def apply_mod(tensor, scale, shift=None, modulation_dims=None):
    """ComfyUI's modulation of a FLUX block's tokens (``comfy.ldm.flux.layers.apply_mod``), or the
    same arithmetic where a newer ComfyUI fused it away."""
    try:
        from comfy.ldm.flux.layers import apply_mod as comfy_apply_mod
    except ImportError:
        comfy_apply_mod = None
    if comfy_apply_mod is not None:
        return comfy_apply_mod(tensor, scale, shift, modulation_dims)
    if modulation_dims is not None:
        raise NotImplementedError("per-token modulation ranges need ComfyUI's apply_mod")
    return tensor * scale if shift is None else torch.addcmul(shift, tensor, scale)


def _modulation(block, vec):
    return vec if block.modulation is None else block.modulation(vec)[0]


def single_block(block, layer, x, vec, pe, attn_mask=None, modulation_dims=None, transformer_options={},
                 fused=False):
    """FLUX's SingleStreamBlock with its fused MLP through the sparse-delta MLP of ``layer``.

    ``layer`` None: dense, keeping nothing (the self-checks).
    ``fused``: the per-token work through the one-pass kernels (see the module docstring).
    """
    from comfy.ldm.flux.math import attention

    fused = fused and modulation_dims is None
    mod = _modulation(block, vec)
    if fused:
        x_mod = kernels.layer_norm_modulate(x, 1 + mod.scale, mod.shift, block.pre_norm.eps)
    else:
        x_mod = apply_mod(block.pre_norm(x), (1 + mod.scale), mod.shift, modulation_dims)
    width, hidden = block.hidden_size, block.mlp_hidden_dim
    if layer is None:
        state, order, config = _throwaway_dense(x)
        dense = True
    else:
        state, order, config = layer.mlp_state("fused"), layer.layout.query_order, layer.config
        dense = layer.mlp_is_dense(state, x_mod)
        # linear2 takes attention and MLP together, so the attention's delta cache C folds into
        # the MLP's output cache as linear2(C): one cache instead of two (see attention.py).
        if layer.folds_attention():
            layer.fold_attention(dense or not state.folded)

    with contextlib.ExitStack() as casts:
        if dense:
            qkv, pre_activation = torch.split(block.linear1(x_mod), [3 * width, hidden], dim=-1)
        else:
            w1, b1 = casts.enter_context(linear_weights(block.linear1, x_mod))
            qkv = F.linear(x_mod, w1[: 3 * width], None if b1 is None else b1[: 3 * width])
        if fused:
            q, k, v = _qk_norm_rope(block, qkv, pe)
            attn = attention(q, k, v, pe=None, mask=attn_mask, transformer_options=transformer_options)
        else:
            q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k = block.norm(q, k, v)
            attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
        del qkv, q, k, v
        folded, delta = layer.take_folded() if layer is not None and layer.fold else (None, None)
        if not dense and state.folded and folded != "sparse":
            # The MLP's cache holds a folded delta the attention did not use this time (it was dense,
            # or not Chipmunk's): the MLP goes dense too, so that the two agree again.
            pre_activation = F.linear(x_mod, w1[3 * width:], None if b1 is None else b1[3 * width:])
            dense = True
            layer.call.run.stats["folded layer made dense"] += 1
        if dense and layer is None:
            parts = (block.linear2(torch.cat((attn, state.dense_step(x_mod, pre_activation, order, config)), 2)),)
        else:
            # linear2 in its two parts: the MLP part is what the cache holds (dense) or updates (sparse).
            w2, b2 = casts.enter_context(linear_weights(block.linear2, attn))
            if dense:
                mlp_out = F.linear(state.dense_step(x_mod, pre_activation, order, config), w2[:, width:])
                state.store_output(mlp_out)
                state.reserve_fc2(w2[:, width:])
            else:
                mlp_out = state.sparse_step(
                    x_mod, w1[3 * width:], None if b1 is None else b1[3 * width:], w2[:, width:], order, config,
                    layer.seeds)
            if delta is not None:  # the attention's new delta joins the output cache as linear2 maps it
                state.fold_in(delta, w2[:, :width])
            parts = (F.linear(attn, w2[:, :width], b2), mlp_out)
    if fused:
        kernels.gated_residual_(x, mod.gate, *parts)
    else:
        x += apply_mod(parts[0] if len(parts) == 1 else parts[0] + parts[1], mod.gate, None, modulation_dims)
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x


def double_block(block, img, txt, vec, pe, attn_mask=None, transformer_options={}):
    """FLUX's DoubleStreamBlock (text first, no per-token modulation ranges) with its per-token work
    in the one-pass kernels (see the module docstring). ``img`` and ``txt`` are not changed."""
    from comfy.ldm.flux.math import attention

    if getattr(block, "modulation", True):
        img_mod1, img_mod2 = block.img_mod(vec)
        txt_mod1, txt_mod2 = block.txt_mod(vec)
    else:
        (img_mod1, img_mod2), (txt_mod1, txt_mod2) = vec
    batch, n_text, n_image = img.shape[0], txt.shape[1], img.shape[1]
    heads, head_dim = block.num_heads, block.hidden_size // block.num_heads
    q = torch.empty((batch, heads, n_text + n_image, head_dim), dtype=img.dtype, device=img.device)
    k, v = torch.empty_like(q), torch.empty_like(q)
    for x, norm1, attn_module, mod, rows in ((txt, block.txt_norm1, block.txt_attn, txt_mod1, slice(0, n_text)),
                                             (img, block.img_norm1, block.img_attn, img_mod1,
                                              slice(n_text, n_text + n_image))):
        qkv = attn_module.qkv(kernels.layer_norm_modulate(x, 1 + mod.scale, mod.shift, norm1.eps))
        _qk_norm_rope(block, qkv, None if pe is None else pe[:, :, rows], attn_module.norm,
                      out=(q[:, :, rows], k[:, :, rows], v[:, :, rows]))
    attn = attention(q, k, v, pe=None, mask=attn_mask, transformer_options=transformer_options)
    del q, k, v
    out = []
    for x, attn_module, norm2, mlp, mod1, mod2, part in (
            (img, block.img_attn, block.img_norm2, block.img_mlp, img_mod1, img_mod2, attn[:, n_text:]),
            (txt, block.txt_attn, block.txt_norm2, block.txt_mlp, txt_mod1, txt_mod2, attn[:, :n_text])):
        x = kernels.gated_residual_(x, mod1.gate, attn_module.proj(part), out=torch.empty_like(x))
        kernels.gated_residual_(x, mod2.gate, mlp(kernels.layer_norm_modulate(x, 1 + mod2.scale, mod2.shift, norm2.eps)))
        out.append(x)
    img, txt = out
    if txt.dtype == torch.float16:
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
    return img, txt


@torch.no_grad()
def double_block_check(block, img, txt, vec, pe=None) -> str | None:
    """None when ``double_block`` gives the stock block's output within ``FUSED_TOLERANCE`` on small
    inputs shaped like the call's (with the call's modulation and the first rows of its rotary
    table), else why not."""
    generator = torch.Generator(device=img.device).manual_seed(0)
    s_img, s_txt, row = _small_inputs(generator, img, 24), _small_inputs(generator, txt, 8), _first_row(vec)
    rows = None if pe is None else pe[:1, :, :s_txt.shape[1] + s_img.shape[1]]
    try:
        stock = type(block).forward(block, s_img.clone(), s_txt.clone(), vec=row, pe=rows, attn_mask=None,
                                    transformer_options={})
        ours = double_block(block, s_img, s_txt, row, rows)
    except Exception as exc:  # the stock code changed its calling convention
        return f"the check could not run ({type(exc).__name__}: {exc})"
    return _update_differs((("image", ours[0], stock[0], s_img), ("text", ours[1], stock[1], s_txt)))


def _small_inputs(generator, like, n):
    """Small values shaped like ``like``'s rows: a block's update is then what its output is made
    of, also in bf16 (the residual stream would hide a wrong update)."""
    return (0.01 * torch.randn((1, min(like.shape[1], n), like.shape[-1]), generator=generator, device=like.device,
                               dtype=torch.float32)).to(like.dtype)


def _update_differs(outputs) -> str | None:
    """None when each (name, ours, stock, input) has ours - stock within ``FUSED_TOLERANCE`` of the
    stock update (stock - input), else which differs and by how much."""
    for name, a, b, x in outputs:
        if a.shape != b.shape:
            return f"{name} output shape {tuple(a.shape)} != stock {tuple(b.shape)}"
        update = b.float() - x.float()
        difference = float((a.float() - b.float()).norm() / update.norm().clamp_min(1e-12))
        if not difference <= FUSED_TOLERANCE:
            return f"{name} update differs from ComfyUI's by {difference:.1e} (relative)"
    return None


@torch.no_grad()
def _single_block_fused_check(block, x, vec, pe) -> str | None:
    """None when ``single_block`` with the one-pass kernels gives the stock block's update within
    ``FUSED_TOLERANCE`` (small inputs, the call's modulation, the first rows of its rotary table)."""
    small = _small_inputs(torch.Generator(device=x.device).manual_seed(0), x, 24)
    row = _first_row(vec)
    rows = None if pe is None else pe[:1, :, :small.shape[1]]
    try:
        stock = type(block).forward(block, small.clone(), vec=row, pe=rows, attn_mask=None, transformer_options={})
        ours = single_block(block, None, small.clone(), row, rows, fused=True)
    except Exception as exc:  # the stock code changed its calling convention
        return f"the check could not run ({type(exc).__name__}: {exc})"
    return _update_differs((("output", ours, stock, small),))


def has_attention_patches(transformer_options) -> bool:
    patches = (transformer_options or {}).get("patches") or {}
    return any(patches.get(name) for name in ATTENTION_PATCHES)


# --- the parity self-check ---------------------------------------------------------------------
def _first_row(value):
    if torch.is_tensor(value):
        return value[:1]
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: _first_row(getattr(value, f.name))
                                             for f in dataclasses.fields(value)})
    if isinstance(value, tuple):
        return type(value)(*(_first_row(v) for v in value)) if hasattr(value, "_fields") else \
            tuple(_first_row(v) for v in value)
    return value


FUSED_TOLERANCE = 3e-2  # relative (norm) difference from ComfyUI's operations: a few bf16 roundings (9e-3 seen)


def self_check(kind: str, module, x: torch.Tensor, vec=None, pe=None, txt=None) -> str | None:
    """None when the replacement at sparsity 0 gives the stock module's output bit for bit on a
    small input shaped like ``x`` (and, for blocks, with the call's modulation ``vec``).

    ``single_block_fused`` and ``double_block``: None when the block with its per-token work in the
    one-pass kernels gives the stock block's update within ``FUSED_TOLERANCE`` (the kernels round
    in other places than separate operations do), with the call's ``pe`` (and text stream ``txt``
    for double blocks, whose image stream is ``x``)."""
    if kind == "single_block_fused":
        return fused_problem(module) or _single_block_fused_check(module, x, vec, pe)
    if kind == "double_block":
        return double_block_check(module, x, txt, vec, pe)
    generator = torch.Generator(device=x.device).manual_seed(0)
    small = torch.randn((1, min(x.shape[1], 24), x.shape[-1]), generator=generator, device=x.device,
                        dtype=torch.float32).to(x.dtype)
    try:
        if kind == "sequential":
            stock = type(module).forward(module, small.clone())
            ours = sequential_mlp(module, None, "check", small.clone())
        else:
            row = _first_row(vec)
            stock = type(module).forward(module, small.clone(), vec=row, pe=None, attn_mask=None,
                                         transformer_options={})
            ours = single_block(module, None, small.clone(), row, None)
    except Exception as exc:  # the stock code changed its calling convention
        return f"the check could not run ({type(exc).__name__}: {exc})"
    if stock.shape == ours.shape and torch.equal(stock, ours):
        return None
    if stock.shape != ours.shape:
        return f"output shape {tuple(ours.shape)} != stock {tuple(stock.shape)}"
    difference = ((ours.float() - stock.float()).norm() / stock.float().norm().clamp_min(1e-12)).item()
    if kind == "sequential" and type(module) is not torch.nn.Sequential and difference <= rounding_tolerance(x.dtype):
        return None  # a forward of its own (a fused activation) rounds elsewhere: the same function
    if kind == "single_block":
        # Newer ComfyUI computes the block's norm and modulation in one fused operation and adds the
        # residual out of place: the same function, rounded elsewhere. Judged by its update.
        update = (stock.float() - small.float()).norm().clamp_min(1e-12)
        changed = ((ours.float() - stock.float()).norm() / update).item()
        if changed <= rounding_tolerance(x.dtype):
            return None
        return f"output update differs from ComfyUI's by {changed:.1e} (relative)"
    return f"output differs from ComfyUI's by {difference:.1e} (relative)"


def rounding_tolerance(dtype: torch.dtype) -> float:
    """How far (relative) a block computing the same function as ComfyUI's code, with its roundings
    in other places, may differ from it: a few roundings of ``dtype``. A changed function (another
    scale, a term left out) differs by more in float32; in half precision only by more than this."""
    return FUSED_TOLERANCE if torch.finfo(dtype).bits <= 16 else 1e-4
