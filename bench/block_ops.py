"""The single block's per-token work: ComfyUI's operations against the one-pass kernels.

At FLUX.1-dev's single-block shape (1024x1024: 4096 image + 512 text tokens, width 3072, 24 heads
of 128), bf16, on the GPU: each group of operations as ComfyUI runs it (with comfy-kitchen's rotary
kernel where it is installed) and as one kernel, median milliseconds, and the kernels' difference
from ComfyUI's output. Run from the repository root:

    python bench/block_ops.py --comfyui PATH_TO_COMFYUI [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_utils import bench_ms, rel_err  # noqa: E402


def import_kernels():
    module = types.ModuleType("chipmunk_pack")
    module.__path__ = [str(ROOT)]
    sys.modules.setdefault("chipmunk_pack", module)
    from chipmunk_pack import kernels
    return kernels


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--tokens", type=int, default=4608)
    parser.add_argument("--json")
    parser.add_argument("--device", default="cuda", help="cpu: checks the script (references, no timing)")
    ns = parser.parse_args()
    sys.path.insert(0, ns.comfyui)
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = ns.device == "cpu"
    from comfy.ldm.flux.math import apply_rope, rope
    kernels = import_kernels()

    dev, dtype = ns.device, torch.bfloat16
    n, width, heads, head_dim, hidden = ns.tokens, 3072, 24, 128, 12288
    gen = torch.Generator(device=dev).manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32).to(dtype)
    x = randn(1, n, width)
    scale1, shift, gate = 1 + 0.1 * randn(1, 1, width), 0.1 * randn(1, 1, width), 0.1 * randn(1, 1, width)
    linear1_out = randn(1, n, 3 * width + hidden)  # a dense step's qkv columns are a view of this
    qkv = linear1_out[..., :3 * width]
    w_q, w_k = 1 + 0.1 * randn(head_dim), 1 + 0.1 * randn(head_dim)
    eps = torch.finfo(dtype).eps  # ComfyUI's FLUX RMSNorm passes eps=None: torch's default for the dtype
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(n // 64).float(), torch.arange(64).float(),
                                     indexing="ij"), -1).reshape(1, -1, 3).to(dev)
    pe = torch.cat([rope(ids[..., i], d, 10000) for i, d in enumerate((16, 56, 56))], dim=-3).unsqueeze(1)
    attn_part, mlp_part = randn(1, n, width), randn(1, n, width)

    def stock_mod():
        return torch.addcmul(shift, F.layer_norm(x, (width,), eps=1e-6), scale1)

    def stock_qk():
        q, k, v = qkv.view(1, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q = F.rms_norm(q, (head_dim,), weight=w_q, eps=None)
        k = F.rms_norm(k, (head_dim,), weight=w_k, eps=None)
        return apply_rope(q, k, pe)

    def stock_residual(target):
        target += (attn_part + mlp_part) * gate
        return target

    rows = []
    cases = [
        ("norm + modulation", stock_mod, lambda: kernels.layer_norm_modulate(x, scale1, shift, 1e-6), None),
        ("q/k norms + rotary", stock_qk,
         lambda: kernels.qk_norm_rope(qkv, heads, w_q, w_k, eps, eps, pe), None),
        ("gated residual", lambda: stock_residual(x.clone()),
         lambda: kernels.gated_residual_(x.clone(), gate, attn_part, mlp_part), lambda: x.clone()),
    ]
    for name, stock, fused, copy in cases:
        want, got = stock(), fused()
        want = want if isinstance(want, tuple) else (want,)
        got = got if isinstance(got, tuple) else (got,)
        error = max(rel_err(g, w) for g, w in zip(got, want))
        if dev == "cpu":
            print(f"{name:22s} rel err {error:.1e}")
            continue
        stock_ms, fused_ms = bench_ms(stock, 0.1), bench_ms(fused, 0.1)
        if copy is not None:  # both sides clone x first: take the clone out
            copy_ms = bench_ms(copy, 0.02)
            stock_ms, fused_ms = stock_ms - copy_ms, fused_ms - copy_ms
        rows.append(dict(op=name, comfyui_ms=round(stock_ms, 4), fused_ms=round(fused_ms, 4),
                         speedup=round(stock_ms / fused_ms, 2), rel_err=error))
        print(f"{name:22s} ComfyUI {stock_ms:.4f} ms  one pass {fused_ms:.4f} ms  {stock_ms / fused_ms:.2f}x  "
              f"rel err {error:.1e}", flush=True)
    saved = sum(r["comfyui_ms"] - r["fused_ms"] for r in rows)
    print(f"per single block: {saved:.3f} ms saved; x38 blocks = {38 * saved:.1f} ms per step")
    if ns.json:
        import comfyui_version
        import triton
        Path(ns.json).write_text(json.dumps(dict(
            device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
            comfyui=comfyui_version.__version__, tokens=n, rows=rows), indent=1))


if __name__ == "__main__":
    main()
