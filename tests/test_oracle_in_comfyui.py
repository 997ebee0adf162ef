"""Oracle tests: the node's path through ComfyUI against Chipmunk's core driven directly.

The oracle uses none of the pack's glue (no node, wrappers, block patches, run plan, step clock or
report): on a clone of the model it installs ComfyUI's own attention override, which hands each
self-attention call to the core's ``SparseDeltaAttention`` of that layer with the core's dense
schedule, token layout, seeds and key-selection rule, and, for WAN's FFNs, object patches that call
the core's ``SparseDeltaMLP``. A few dozen lines a reader can check against the method. The same
seed through the node must give the same picture: any shift in the step count, a layer numbered
otherwise, a stale cache or a wrongly laid out sequence shows here, where the end-to-end bounds
elsewhere (the dense picture within 0.2) would let it pass.

Both run ComfyUI's own KSampler (cfg 3.5: cond and uncond in one batch); the reference kernels run
on the CPU in float32.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from harness import chipmunk as cm
from test_accelerate import _loaded, _relative, kind, wan  # noqa: F401 (flux_narrow, hunyuan_video and wan21_t2v)

pytestmark = [pytest.mark.comfyui, pytest.mark.chipmunk_node]

STEPS = 8
CFG = 3.5


def _core(kind, name):
    return _loaded(kind, f"chipmunk_core.{name}")


class Oracle:
    """Chipmunk's method for one sampling run, from the core's pieces alone."""

    def __init__(self, kind, config, latent_shape, seed: int):
        self.kind, self.config, self.seed = kind, config, seed
        attention, layout, schedule = (_core(kind, n) for n in ("attention", "layout", "schedule"))
        self.attention_module, self.layout_module = attention, layout
        self.seeds_module, self.state_module, self.mlp_module = (_core(kind, n) for n in ("seeds", "state", "mlp"))
        self.schedule = schedule.DenseSchedule(config, STEPS)
        video = len(latent_shape) == 5
        patch = (1, 2, 2) if video else (2, 2)
        self.grid = tuple(-(-s // p) for s, p in zip(latent_shape[2:], patch))
        # the joint sequence's order: ComfyUI v0.19's HunyuanVideo puts the text first, as FLUX
        # does; v0.3.64's put the image first (its double blocks are built "flipped")
        blocks = getattr(kind.model.get_model_object("diffusion_model"), "double_blocks", None)
        self.text_first = bool(blocks) and not getattr(blocks[0], "flipped_img_txt", False)
        self.states, self.mlps = {}, {}
        self.sigmas, self.layer = [], 0
        self.calls_per_step: dict[int, int] = {}

    # --- the step and the layer of a call -------------------------------------------------------
    def _enter(self, options) -> int:
        sigma = float(options["sigmas"].flatten()[0])
        if not self.sigmas or sigma != self.sigmas[-1]:
            self.sigmas.append(sigma)  # (one model call per step: euler, cond and uncond batched)
            self.layer = 0
        return len(self.sigmas) - 1

    def _seeds(self, options, batch: int, step: int, layer: int, device):
        cond_or_uncond = tuple(options.get("cond_or_uncond") or (0,))
        return self.seeds_module.row_seeds(self.seed, batch, cond_or_uncond, step, device) + layer * 1_000_003

    def _layout(self, n_tokens: int, device):
        image_len = math.prod(self.grid)
        text_len = n_tokens - image_len
        return self.layout_module.joint_layout(text_len, self.grid, image_len, self.text_first,
                                               self.config.query_group, device, grid_first=True,
                                               window=self.config.local_window, extra_before=0)

    # --- attention ----------------------------------------------------------------------------
    def attention(self, func, q, k, v, heads, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        n_tokens = q.shape[2] if kwargs.get("skip_reshape", False) else q.shape[1]
        if k.shape != q.shape or args or n_tokens < math.prod(self.grid):
            # cross-attention, or attention over the text alone (HunyuanVideo's token refiner)
            return func(q, k, v, heads, *args, **kwargs)
        step, layer = self._enter(options), self.layer
        self.layer += 1
        self.calls_per_step[step] = self.calls_per_step.get(step, 0) + 1
        if layer < self.config.first_dense_layers:
            return func(q, k, v, heads, *args, **kwargs)
        skip_reshape = kwargs.get("skip_reshape", False)
        if skip_reshape:
            batch, _, n_tokens, head_dim = q.shape
        else:
            batch, n_tokens, width = q.shape
            head_dim = width // heads
            q, k, v = (t.view(batch, n_tokens, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        layout = self._layout(n_tokens, q.device)
        kind, value = self.state_module.key_padding(kwargs.get("mask"), n_tokens)
        forced = None
        if kind == "prefix":
            k, v = k[:, :, :value], v[:, :, :value]
        elif kind == "index":
            k, v = k.index_select(2, value), v.index_select(2, value)
            forced = layout.forced_among(value)
        state = self.states.setdefault(layer, self.attention_module.SparseDeltaAttention())
        if self.schedule.is_dense(step) or not state.ready_for(q, k):
            out = state.dense_step(q, k, v, layout, self.config, self._seeds(options, batch, step, layer, q.device),
                                   select=self.attention_module.selects_keys(self.config, step), forced=forced)
        else:
            out = state.sparse_step(q, k, v, layout, self.config)
        if kwargs.get("skip_output_reshape", False):
            return out.view(batch, n_tokens, heads, head_dim).transpose(1, 2)
        return out

    # --- WAN's feed-forward (Linear, GELU(tanh), Linear) --------------------------------------------
    def feed_forward(self, module, layer: int):
        oracle = self

        class Proxy(torch.nn.Module):
            def forward(self, x):
                step = len(oracle.sigmas) - 1  # (self-attention ran first in this block)
                if layer < oracle.config.first_dense_layers:
                    return module(x)
                fc1, fc2 = module[0], module[2]
                state = oracle.mlps.setdefault(layer, oracle.mlp_module.SparseDeltaMLP())
                order = oracle._layout(x.shape[1], x.device).image_order
                if oracle.schedule.is_dense(step) or not state.ready_for(x):
                    y = fc2(state.dense_step(x, fc1(x), order, oracle.config))
                    state.store_output(y)
                    return y
                seeds = oracle._seeds(oracle.options, x.shape[0], step, layer, x.device)
                return state.sparse_step(x, fc1.weight, fc1.bias, fc2.weight, order, oracle.config, seeds)

        return Proxy()

    def install(self, model, mlp: bool = False):
        """A clone of ``model`` that samples with this oracle (its FFNs too with ``mlp``)."""
        patched = model.clone()
        options = patched.model_options.setdefault("transformer_options", {})
        oracle = self

        def override(func, *args, **kwargs):
            oracle.options = kwargs.get("transformer_options") or {}
            return oracle.attention(func, *args, **kwargs)

        options["optimized_attention_override"] = override
        if mlp:
            blocks = patched.get_model_object("diffusion_model").blocks
            for i, block in enumerate(blocks):
                patched.add_object_patch(f"diffusion_model.blocks.{i}.ffn", self.feed_forward(block.ffn, i))
        return patched


def _node_and_oracle(kind, caplog, **settings):
    size = kind.sizes[0]
    patched = kind.accelerate(preset=cm.CUSTOM, step_cache="off", **settings)
    config = patched.model_options["transformer_options"]["chipmunk"].config
    positive, negative, latent = kind.inputs(size)
    with caplog.at_level(logging.INFO):
        node = kind.sample(patched, size, cfg=CFG, steps=STEPS)
    report = cm.reports(caplog)[-1]
    oracle = Oracle(kind, config, tuple(latent["samples"].shape), seed=1)
    expected = kind.sample(oracle.install(kind.model, mlp=config.sparse_mlp), size, cfg=CFG, steps=STEPS)
    return node, expected, report, oracle, kind.sample(kind.model, size, cfg=CFG, steps=STEPS)


def test_attention_through_the_node_is_the_core_driven_directly(kind, caplog):
    """Every family, attention sparse (MLP off): the node's picture is the oracle's."""
    node, expected, report, oracle, stock = _node_and_oracle(kind, caplog, mlp_sparsity=0.0, first_dense_layers=1)
    counts = cm.step_counts(report)
    assert counts["sparse"] > 0 and counts["stock"] == 0, report
    assert len(oracle.sigmas) == STEPS and len(set(oracle.calls_per_step.values())) == 1, oracle.calls_per_step
    gap = _relative(node, expected)
    print(f"{kind.name}: node vs oracle {gap:.1e}; vs stock {_relative(node, stock):.1e}")
    assert gap <= 1e-5, gap  # float32 on the CPU: the same operations in the same order
    assert _relative(node, stock) > 1e-4  # (the sparse steps did change the picture)


def test_wan_feed_forward_through_the_node_is_the_core_driven_directly(wan, caplog):
    """WAN's FFNs sparse too (the MLP ranking cadence, its row order and seeds). (FLUX's fused
    single blocks are compared with ComfyUI's own block in test_accelerate.)"""
    node, expected, report, _, stock = _node_and_oracle(wan, caplog, mlp_sparsity=0.5, first_dense_layers=1)
    assert "MLP 50%" in report, report
    gap = _relative(node, expected)
    print(f"{wan.name}: node vs oracle with the MLP {gap:.1e}")
    assert gap <= 1e-5, gap
