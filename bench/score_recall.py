"""How well cheaper key scores pick the keys exact column sums pick, on random and structured inputs.

    python bench/score_recall.py [--shape 1024] [--json PATH]       # GPU (Triton kernels)
    python bench/score_recall.py --device cpu --shape small          # CPU (PyTorch references)

For each query group, the reference list is the top-k of the exact column sums (every query of
the group, exact row log-sum-exp); k is the FLUX default (16.5% of the keys, padded to 64), of
which the 512 text keys are forced, as in a real run: only the free picks (the image keys beyond
the forced ones; 256 per group at 1024x1024) are compared. Candidates:
- sums over 64 / 32 / 16 / 8 / 4 sampled queries per group (``attention_score_queries``);
- exact sums normalised by a stale log-sum-exp (the one-pass kernel's hint from a previous step;
  here the exact lse plus N(0, 0.5) noise per row).
Reported per candidate: recall (share of the reference's free picks it also picks, mean and 5th
percentile over groups and heads) and captured mass (sum of the exact scores over its free picks /
over the reference's: what the delta cache misses is what matters, and a swapped key of nearly
equal weight costs little).

Inputs (bf16, 24 heads of 128, FLUX token layout: 512 text tokens + an image grid in tile order):
- random: q, k i.i.d. normal: attention nearly uniform, the hardest case for sampling;
- structured: q and k built from smooth random functions of the 2D position (attention falls off
  with distance; each head with its own length scale), plus a few high-norm "sink" keys and text
  keys with a shared direction: a stand-in for what trained DiT attention looks like.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HEADS, HEAD_DIM, TEXT, GROUP = 24, 128, 512, 192
SHAPES = {"1024": (64, 64), "1280x768": (48, 80), "small": (48, 64)}  # token grids
SAMPLES = (64, 32, 16, 8, 4)


def import_pack():
    if "chipmunk_pack" not in sys.modules:
        package = types.ModuleType("chipmunk_pack")
        package.__path__ = [str(ROOT)]
        sys.modules["chipmunk_pack"] = package
    import importlib
    return (importlib.import_module("chipmunk_pack.kernels"), importlib.import_module("chipmunk_pack.chipmunk_core.layout"),
            importlib.import_module("chipmunk_pack.chipmunk_core.config"))


def random_inputs(n, device, gen):
    return [torch.randn(1, HEADS, n, HEAD_DIM, device=device, generator=gen) for _ in range(2)]


def structured_inputs(grid, n, device, gen):
    """q, k from random Fourier features of the position (per head: its own frequency scale)."""
    rows, cols = grid
    yy, xx = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], -1).float()  # [N_image, 2], raster order
    qs, ks = [], []
    for head in range(HEADS):
        scale = 0.05 + 0.6 * (head / HEADS)  # from long-range heads to local ones
        freqs = torch.randn(2, HEAD_DIM // 2, device=device, generator=gen) * scale
        phase = pos @ freqs
        feat = torch.cat([phase.cos(), phase.sin()], -1) * 2.2  # sharper attention than random
        text_q = torch.randn(TEXT, HEAD_DIM, device=device, generator=gen)
        shared = torch.randn(HEAD_DIM, device=device, generator=gen)
        text_k = 0.5 * torch.randn(TEXT, HEAD_DIM, device=device, generator=gen) + 0.6 * shared
        q = torch.cat([text_q, feat + 0.5 * torch.randn_like(feat) + 0.3 * shared])
        k = torch.cat([text_k, feat + 0.5 * torch.randn_like(feat)])
        sinks = torch.randint(TEXT, n, (4,), device=device, generator=gen)
        k[sinks] *= 3.0
        qs.append(q)
        ks.append(k)
    return torch.stack(qs)[None], torch.stack(ks)[None]


def free_picks(kernels, scores, keep, forced, is_forced):
    """The keys a list holds beyond the forced ones: bool [B, H, G, N]."""
    indices, counts = kernels.build_index_lists(scores, keep, forced=forced, pad_to=64)
    listed = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    chosen = torch.zeros(*scores.shape[:-1], scores.shape[-1] + 1, dtype=torch.bool, device=scores.device)
    chosen.scatter_(-1, torch.where(listed, indices.long(), scores.shape[-1]), True)
    return chosen[..., :-1] & ~is_forced


def evaluate(kernels, layout, q, k, config, label, records):
    n = q.shape[2]
    order = layout.query_order
    out = torch.empty_like(q)
    exact, lse = kernels.attention_with_column_sums(q, k, k, order, GROUP, out)  # no hint: two passes, exact
    keep = round(config.attention_keep * n)
    forced = kernels.forced_columns(layout.forced_keys, n)
    is_forced = forced.mask  # [1, N]: the text keys
    reference = free_picks(kernels, exact, keep, forced, is_forced)
    reference_mass = (exact * reference).sum(-1)
    n_ref = reference.sum(-1).float()
    gen = torch.Generator(device=q.device).manual_seed(7)
    candidates = {f"{s} sampled queries/group": (lambda s=s: kernels.sampled_column_sums(q, k, order, GROUP, s))
                  for s in SAMPLES}
    stale = lse + 0.5 * torch.randn(lse.shape, device=q.device, generator=gen)
    candidates["exact sums, stale lse hint"] = lambda: kernels.attention_with_column_sums(
        q, k, k, order, GROUP, out, stale)[0]
    for name, scores in candidates.items():
        chosen = free_picks(kernels, scores(), keep, forced, is_forced)
        recall = (chosen & reference).sum(-1).float() / n_ref
        captured = (exact * chosen).sum(-1) / reference_mass
        record = {"inputs": label, "candidate": name, "recall_mean": float(recall.mean()),
                  "recall_p05": float(recall.flatten().quantile(0.05)), "mass_mean": float(captured.mean()),
                  "mass_p05": float(captured.flatten().quantile(0.05)), "keys": n, "free_picks": int(n_ref.mean())}
        records.append(record)
        print(f"  {label:10s} {name:30s} recall {record['recall_mean']:.3f} (p05 {record['recall_p05']:.3f})  "
              f"mass {record['mass_mean']:.4f} (p05 {record['mass_p05']:.4f})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1024", choices=list(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default=None, help="default: bench/results/score_recall_<device>.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --device cpu)")
    kernels, layout_module, config_module = import_pack()
    grid = SHAPES[args.shape]
    n_image = math.prod(grid)
    n = n_image + TEXT
    layout = layout_module.joint_layout(TEXT, grid, n_image, True, GROUP, args.device)
    config = config_module.resolve_config("flux")
    gen = torch.Generator(device=args.device).manual_seed(0)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = {"device": device_name, "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "shape": args.shape, "tokens": n,
            "command": " ".join(Path(a).name if Path(a).is_absolute() else a for a in sys.argv)}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    print(meta, flush=True)
    records = []
    # [text, image in raster order]: FLUX's sequence; the layout's query order makes the groups
    for label, (q, k) in (("random", random_inputs(n, args.device, gen)),
                          ("structured", structured_inputs(grid, n, args.device, gen))):
        evaluate(kernels, layout, q.bfloat16(), k.bfloat16(), config, label, records)
    name = device_name.replace("NVIDIA ", "").split()[0].lower()
    path = Path(args.json or ROOT / "bench" / "results" / f"score_recall_{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": records}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
