"""The MLP replacements ComfyUI's object patches put in place of fingerprinted modules: shallow
copies of the stock modules whose forward runs Chipmunk's sparse-delta MLP (``adapters.replacements``)
where the layer's plan serves it and the module passed its self-check, else the module's own code."""

from __future__ import annotations

import copy
import functools

import torch

from ..chipmunk_core.adapters import replacements
from . import report
from .options import FUSED_CHECK, LAYER_KEY

def mlp_proxy(stock, accelerator, site):
    """A shallow copy of ``stock`` (same children and parameters) whose forward is Chipmunk's."""
    proxy = copy.copy(stock)
    forward = {"sequential": sequential_forward, "single_block": single_block_forward,
               "double_block": double_block_forward}[site.kind]
    proxy.forward = functools.partial(forward, stock, accelerator, site)
    return proxy


def _checked(layer, kind: str, module, x, vec=None, pe=None, txt=None) -> bool:
    """Run the parity self-check of a kind of block once; True when it passed. A check that fails
    (an error inside it, out of memory included) keeps ComfyUI's code for this run only."""
    context = layer.call.context
    if kind not in context.checks:
        passed = context.accelerator.passed_checks
        problem = None if kind in passed else replacements.self_check(kind, module, x, vec, pe, txt)
        context.checks[kind] = problem
        if problem:
            report.note_setup(context)
        else:  # this model's code passed: later runs need not check it again (a failure is retried)
            passed.add(kind)
    return context.checks[kind] is None


@torch.compiler.disable
def sequential_forward(stock, accelerator, site, x):
    layer = accelerator.layer(site.layer)
    if (layer is None or not layer.serves_mlp() or x.shape[1] != layer.image_len
            or not _checked(layer, site.kind, stock, x)):
        return type(stock).forward(stock, x)  # the module's own forward (a subclass may fuse)
    return replacements.sequential_mlp(stock, layer, site.stream, x)


@torch.compiler.disable
def single_block_forward(stock, accelerator, site, x, vec, pe, attn_mask=None, modulation_dims=None,
                         transformer_options={}):
    layer = (transformer_options or {}).get(LAYER_KEY)
    if (layer is None or not layer.serves_mlp() or replacements.has_attention_patches(transformer_options)
            or not _checked(layer, site.kind, stock, x, vec)):
        if layer is not None and layer.serves_mlp() and replacements.has_attention_patches(transformer_options):
            layer.call.run.note("patches", "attention patches (NAG, KV caches) are present: single blocks run "
                                           "ComfyUI's own code with Chipmunk attention, their MLP dense")
        return type(stock).forward(stock, x, vec=vec, pe=pe, attn_mask=attn_mask, modulation_dims=modulation_dims,
                                   transformer_options=transformer_options)
    fused = _checked(layer, FUSED_CHECK, stock, x, vec, pe)
    return replacements.single_block(stock, layer, x, vec, pe, attn_mask, modulation_dims, transformer_options,
                                     fused=fused)


@torch.compiler.disable
def double_block_forward(stock, accelerator, site, img, txt, vec, pe, attn_mask=None,
                         modulation_dims_img=None, modulation_dims_txt=None, transformer_options={}):
    """FLUX's double block with its per-token work in one-pass kernels where the block serves a
    sparse MLP (the same rule as the single blocks), else ComfyUI's own forward."""
    layer = (transformer_options or {}).get(LAYER_KEY)
    if (layer is None or not layer.serves_mlp() or modulation_dims_img is not None or modulation_dims_txt is not None
            or (pe is not None and pe.shape[2] < txt.shape[1] + img.shape[1])
            or replacements.has_attention_patches(transformer_options)
            or not _checked(layer, site.kind, stock, img, vec, pe, txt=txt)):
        return type(stock).forward(stock, img, txt, vec, pe, attn_mask, modulation_dims_img, modulation_dims_txt,
                                   transformer_options)
    return replacements.double_block(stock, img, txt, vec, pe, attn_mask, transformer_options)
