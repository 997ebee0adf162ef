"""The quality harness: how close Chipmunk's samples stay to dense sampling on the toy models.

    python -m lab.quality [--settings default "attention_sparsity=0.9,mlp_sparsity=0.5" ...]
                          [--family flux wan] [--prompts N] [--seeds N] [--tiny] [--out FILE.json]

ComfyUI runs in this process (``CHIPMUNK_COMFYUI_DIR``, see lab/comfy_env.py), on the CPU unless
``--gpu``. The toy models load through ComfyUI's stock loaders from lab/models (or ``--models``),
conditioning comes from the pack's toy prompt node, and sampling is the KSampler's own function
(euler, simple). For every prompt x seed the dense sample is the reference; every setting samples
the same prompt and seed, and both are decoded by the toy autoencoder. Reported per setting:

- PSNR (dB, capped at 100) and SSIM (11x11 Gaussian window, sigma 1.5, per channel) of the decoded
  sample against the dense one, averaged over samples (a clip: over all its frames);
- classifier accuracy: the share of samples in which the lab's classifier (trained on real
  scenes) names the prompt's emoji; the dense row is the model's own accuracy;
- wall seconds of the sampling.

A setting is ``default`` (the pack's reference settings for the family), ``dense`` or
comma-separated ``key=value`` pairs: any Chipmunk config field (attention_sparsity, mlp_sparsity,
query_group, mlp_block, dense_warmup_steps, dense_interval, first_dense_layers, local_window=4x6x8,
...; Chipmunk's defaults fill the rest) and the sampler fields ``steps`` and ``cfg`` (a setting
with only sampler fields runs dense: e.g. ``steps=14`` is the plain fewer-steps baseline).

The paper's statistic, measured on dense runs of the toy models (``StructureProbe``): between two
consecutive model evaluations of the same conditioning branch, in each layer,
- attention: each (head, query q, key k) contributes p_qk * v_k to the output; its change is
  m_qk = || p'_qk v'_k - p_qk v_k ||_2 (' = the later step; joint text+image attention for FLUX,
  self-attention for WAN);
- MLP: each (token t, hidden unit j) contributes h_tj * W2[:, j]; its change is
  m_tj = |h'_tj - h_tj| * ||W2[:, j]||_2 (FLUX: image MLP of double blocks and the fused MLP of
  single blocks; WAN: the FFN);
the fraction of values needed to explain X of the change is the smallest share of (q, k) pairs
per head (of (t, j) pairs per layer) whose largest m add up to X of the sum of all m. Reported: its
mean over layers, heads, batch entries and step pairs, for X = 70% and 90%. The attention pairs
are those of ``STRUCTURE_QUERIES`` evenly spaced queries (all keys) per head, to keep it cheap.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import comfy_env, scenes, vocab
from .networks import CHECKPOINT_NAMES
from .tae import VIDEO_TAE_FILE

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_MODULE = "chipmunk_pack"
PSNR_CAP = 100.0
SAMPLER_KEYS = {"steps", "cfg"}
PROMPT_SEED = 4242
STRUCTURE_QUERIES = 128  # evenly spaced queries per head on which the attention statistic is taken


@dataclass(frozen=True)
class FamilyRun:
    family: str  # "flux" or "wan"
    latent_shape: tuple  # of EmptySD3LatentImage / EmptyHunyuanLatentVideo at the chosen size
    steps: int
    cfg: float
    vae_name: str


def family_runs(tiny: bool) -> dict[str, FamilyRun]:
    if tiny:
        return {"flux": FamilyRun("flux", (1, 16, 8, 8), 4, 3.5, "taef1"),
                "wan": FamilyRun("wan", (1, 16, 2, 4, 4), 4, 3.5, VIDEO_TAE_FILE)}
    return {"flux": FamilyRun("flux", (1, 16, 32, 32), 28, 3.5, "taef1"),
            "wan": FamilyRun("wan", (1, 16, 5, 20, 20), 30, 3.5, VIDEO_TAE_FILE)}


# --- the pack -----------------------------------------------------------------------------------
def pack():
    """The pack imported as a package (the repository root registered as ``chipmunk_pack``)."""
    if PACK_MODULE not in sys.modules:
        module = types.ModuleType(PACK_MODULE)
        module.__path__ = [str(REPO_ROOT)]
        sys.modules[PACK_MODULE] = module
    import importlib

    importlib.import_module(f"{PACK_MODULE}.nodes")
    importlib.import_module(f"{PACK_MODULE}.chipmunk_core")
    return sys.modules[PACK_MODULE]


def apply_chipmunk(model, overrides: dict):
    """The lab's one contact with the pack's API: a MODEL in, a Chipmunk-patched clone out.

    The pack is moving from ``hooks.install(clone, adapter, config)`` to
    ``hooks.accelerate(model, **overrides)``; whichever it offers is used.
    """
    p = pack()
    hooks = p.nodes.hooks
    if hasattr(hooks, "accelerate"):
        return hooks.accelerate(model, **overrides)
    adapter = p.chipmunk_core.adapter_for(model.get_model_object("diffusion_model"))
    config = p.chipmunk_core.resolve_config(adapter.family, **overrides)
    patched = model.clone()
    hooks.install(patched, adapter, config)
    return patched


# --- settings -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    name: str
    chipmunk: dict | None  # None: dense
    sampler: dict = field(default_factory=dict)
    easycache: bool = False  # core's EasyCache node at its defaults, after Chipmunk where both are on


def _value(text: str):
    text = text.strip()
    if text in ("()", "none", ""):
        return ()
    parts = text.replace("/", "x").split("x")
    if len(parts) > 1 and all(p.strip().lstrip("-").replace(".", "", 1).isdigit() for p in parts):
        return tuple(_value(t) for t in parts)  # numbers joined by x: a tuple (local_window=4x6x8)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_setting(text: str) -> Setting:
    """``dense``, ``default``, ``easycache`` (core's EasyCache alone), or ``key=value`` pairs; the
    pair ``easycache=1`` adds core's EasyCache after Chipmunk (``default,easycache=1``: both at their
    defaults)."""
    text = text.strip()
    if text == "dense":
        return Setting("dense", None)
    if text == "default":
        return Setting("default", {})
    if text == "easycache":
        return Setting("easycache", None, easycache=True)
    items = [item for item in text.split(",") if item.strip()]
    defaults = "default" in (item.strip() for item in items)
    pairs = dict(item.split("=", 1) for item in items if item.strip() != "default")
    values = {k.strip(): _value(v) for k, v in pairs.items()}
    easycache = bool(values.pop("easycache", 0))
    sampler = {k: v for k, v in values.items() if k in SAMPLER_KEYS}
    chipmunk = {k: v for k, v in values.items() if k not in SAMPLER_KEYS}
    return Setting(text, chipmunk or ({} if defaults else None), sampler, easycache)


def equal_cost_setting(name: str, speedup: float, steps: int) -> Setting:
    """Plain dense sampling with the step count that costs what ``name`` costs at ``speedup`` (its
    measured GPU speed-up at the family's size): the baseline a setting must beat."""
    fewer = max(1, round(steps / speedup))
    return Setting(f"steps={fewer} (equal cost of {name}, {speedup:g}x)", None, {"steps": fewer})


def with_easycache(model):
    """``model`` through core's EasyCache node at its defaults (the node's own default inputs)."""
    from comfy_extras.nodes_easycache import EasyCacheNode

    inputs = EasyCacheNode.define_schema().inputs
    defaults = {i.id: i.default for i in inputs if i.id != "model" and getattr(i, "default", None) is not None}
    return EasyCacheNode.execute(model, **defaults).result[0]


# --- metrics ------------------------------------------------------------------------------------
def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else 10.0 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of images [N, H, W, 3] in [0, 1]."""
    x, y = a.permute(0, 3, 1, 2).double(), b.permute(0, 3, 1, 2).double()
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5 ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)

    def blur(t):
        return F.conv2d(t, window, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    value = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return value.mean().item()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sets of feature vectors ([N, D] each):
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2). With fewer samples than
    dimensions the covariances are singular; the formula still holds (a distance of the fitted,
    degenerate Gaussians), so only compare values measured over the same number of samples."""
    a, b = a.double(), b.double()
    mean = (a.mean(0) - b.mean(0)).pow(2).sum()
    if a.shape[0] < 2 or b.shape[0] < 2:
        return float(mean)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)

    def sqrtm(m):
        values, vectors = torch.linalg.eigh((m + m.T) / 2)
        return (vectors * values.clamp_min(0).sqrt()) @ vectors.T

    root_a = sqrtm(cov_a)
    cross = sqrtm(root_a @ cov_b @ root_a)
    return float(mean + torch.trace(cov_a) + torch.trace(cov_b) - 2 * torch.trace(cross))


def fraction_explaining(changes: torch.Tensor, shares=(0.7, 0.9)) -> list[torch.Tensor]:
    """For each row of non-negative ``changes`` [R, M]: the smallest share of its entries whose largest
    values sum to each given share of the row's total."""
    ordered = changes.float().sort(dim=-1, descending=True).values
    total = ordered.sum(-1, keepdim=True).clamp_min(1e-30)
    cumulative = ordered.cumsum(-1) / total
    m = changes.shape[-1]
    return [((cumulative < s).sum(-1) + 1).clamp(max=m).float() / m for s in shares]


class StructureProbe:
    """Measures the paper's statistic (module docstring) during a dense sampling run."""

    def __init__(self, diffusion_model, family: str):
        self.family = family
        self.current = ()
        self.previous: dict = {}
        self.values = {("attention", 0.7): [], ("attention", 0.9): [], ("mlp", 0.7): [], ("mlp", 0.9): []}
        self.handles = []
        for name, act, w2 in self._mlps(diffusion_model):
            self.handles.append(act.register_forward_hook(self._mlp_hook(name, w2)))

    @staticmethod
    def _mlps(model):
        if hasattr(model, "double_blocks"):
            d = model.hidden_size
            for i, b in enumerate(model.double_blocks):
                yield f"double{i}", b.img_mlp[1], lambda b=b: b.img_mlp[2].weight
            for i, b in enumerate(model.single_blocks):
                yield f"single{i}", b.mlp_act, lambda b=b, d=d: b.linear2.weight[:, d:]
        else:
            for i, b in enumerate(model.blocks):
                yield f"block{i}", b.ffn[1], lambda b=b: b.ffn[2].weight

    def install(self, model_patcher):
        """A clone of ``model_patcher`` that reports to this probe."""
        import comfy.patcher_extension

        clone = model_patcher.clone()
        clone.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = self._attention
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "chipmunk_lab_probe",
                                   self._diffusion_model)
        return clone

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def _diffusion_model(self, executor, *args, **kwargs):
        options = args[-1] if args and isinstance(args[-1], dict) else kwargs.get("transformer_options", {})
        self.current = tuple(options.get("cond_or_uncond", ()))
        return executor(*args, **kwargs)

    def _record(self, kind, changes):
        for share, value in zip((0.7, 0.9), fraction_explaining(changes)):
            self.values[(kind, share)].extend(value.tolist())

    def _mlp_hook(self, name, w2):
        def hook(module, inputs, output):
            key = ("mlp", name, self.current)
            hidden = output.detach().float()
            before = self.previous.get(key)
            if before is not None and before.shape == hidden.shape:
                norms = w2().detach().float().norm(dim=0)
                self._record("mlp", ((hidden - before).abs() * norms).flatten(1))
            self.previous[key] = hidden
        return hook

    def _attention(self, func, q, k, v, heads, **kwargs):
        out = func(q, k, v, heads, **kwargs)
        if k.shape[-2 if kwargs.get("skip_reshape") else 1] != q.shape[-2 if kwargs.get("skip_reshape") else 1]:
            return out  # cross-attention (WAN's text): not part of the statistic
        if not kwargs.get("skip_reshape"):
            q, k, v = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        options = kwargs.get("transformer_options") or {}
        key = ("attention", options.get("block_type"), options.get("block_index"), self.current)
        q, k, v = q.detach().float(), k.detach().float(), v.detach().float()
        rows = torch.linspace(0, q.shape[-2] - 1, min(q.shape[-2], STRUCTURE_QUERIES)).round().long()
        p = torch.softmax(q[..., rows, :] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        before = self.previous.get(key)
        if before is not None and before[0].shape == p.shape:
            p0, v0 = before
            a, b, c = (v * v).sum(-1), (v0 * v0).sum(-1), (v * v0).sum(-1)
            m2 = p * p * a[..., None, :] + p0 * p0 * b[..., None, :] - 2 * p * p0 * c[..., None, :]
            self._record("attention", m2.clamp_min(0).sqrt().flatten(2).flatten(0, 1))
        self.previous[key] = (p, v)
        return out

    def summary(self) -> dict:
        return {f"{kind}_fraction_for_{int(share * 100)}": (round(sum(v) / len(v), 4) if v else None)
                for (kind, share), v in self.values.items()}


# --- running ------------------------------------------------------------------------------------
class Lab:
    """ComfyUI, the pack and the toy models, loaded once."""

    def __init__(self, models_dir: Path | None, gpu: bool):
        comfy_env.import_comfy(comfy_env.comfyui_dir(), cpu=not gpu)
        import comfy.utils
        import folder_paths
        import nodes

        comfy.utils.PROGRESS_BAR_ENABLED = False
        self.nodes = nodes
        self.pack = pack()  # registers lab/models with ComfyUI's model folders
        if models_dir is not None:
            for kind in ("diffusion_models", "vae_approx"):
                folder_paths.add_model_folder_path(kind, str(models_dir / kind), is_default=True)
        self.models_dir = models_dir or self.pack.nodes.toy.MODELS_DIR
        self.folder_paths = folder_paths
        self._models, self._vaes = {}, {}
        self._classifier = None

    def model(self, family: str):
        if family not in self._models:
            import comfy.sd

            path = self.folder_paths.get_full_path_or_raise("diffusion_models", CHECKPOINT_NAMES[family])
            self._models[family] = comfy.sd.load_diffusion_model(path)
        return self._models[family]

    def vae(self, name: str):
        if name not in self._vaes:
            (self._vaes[name],) = self.nodes.VAELoader().load_vae(name)
        return self._vaes[name]

    def classifier(self):
        if self._classifier is None:
            from .classifier import FILE, load

            self._classifier = load(self.models_dir / "classifier" / FILE)
        return self._classifier

    def conditioning(self, text: str, family: str):
        return self.pack.nodes.toy.toy_conditioning(text, family)

    def sample(self, model, run: FamilyRun, prompt: str, seed: int, sampler: dict) -> torch.Tensor:
        latent = {"samples": torch.zeros(run.latent_shape)}
        (out,) = self.nodes.common_ksampler(
            model, seed, sampler.get("steps", run.steps), sampler.get("cfg", run.cfg), "euler", "simple",
            self.conditioning(prompt, run.family), self.conditioning("", run.family), latent)
        return out["samples"]

    def decode(self, run: FamilyRun, latent: torch.Tensor) -> torch.Tensor:
        """Frames [N, H, W, 3] in [0, 1] (a clip's frames in order)."""
        pixels = self.vae(run.vae_name).decode(latent)
        return pixels.reshape(-1, *pixels.shape[-3:]).float().clamp(0, 1)

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """The classifier's pooled features of a sample (a clip: the mean over its frames)."""
        with torch.no_grad():
            return self.classifier().embed(frames.permute(0, 3, 1, 2)).mean(0).double().cpu()

    def predicted_class(self, frames: torch.Tensor) -> int:
        with torch.no_grad():
            logits = self.classifier()(frames.permute(0, 3, 1, 2))
        return int(logits.mean(0).argmax())


def prompts_for(family: str, count: int) -> list[str]:
    """``count`` prompts spread over the classes, with seeded sizes, positions and colours."""
    generator = torch.Generator().manual_seed(PROMPT_SEED)
    step = max(1, len(vocab.CLASSES) // max(1, count))
    if family == "flux":
        _, words = scenes.random_images(count, generator)
        return [vocab.image_prompt((i * step) % len(vocab.CLASSES), w[0], w[2], w[3], w[4], w[5])
                for i, w in enumerate(words)]
    _, words = scenes.random_clips(count, 2, generator)
    motions = {m.split()[1]: m for m in vocab.MOTIONS}
    return [vocab.video_prompt((i * step) % len(vocab.CLASSES), w[0], motions[w[3]], w[4], w[5])
            for i, w in enumerate(words)]


def measure(lab: Lab, run: FamilyRun, settings: list[Setting], prompts: list[str], seeds: list[int],
            structure_samples: int) -> dict:
    base = lab.model(run.family)
    rows = {s.name: {"psnr": [], "ssim": [], "correct": [], "seconds": 0.0, "skipped": []}
            for s in [Setting("dense", None), *settings]}
    structure = None
    patched = {}
    features = {s.name: [] for s in [Setting("dense", None), *settings]}
    for s in settings:
        if s.chipmunk is not None:
            patched[s.name] = apply_chipmunk(base, s.chipmunk)
        if s.easycache:
            patched[s.name] = with_easycache(patched.get(s.name, base))
    sample_index = 0
    for prompt in prompts:
        label = vocab.class_of_prompt(prompt)
        for seed in seeds:
            model = base
            probe = None
            if sample_index < structure_samples:
                probe = StructureProbe(base.get_model_object("diffusion_model"), run.family)
                model = probe.install(base)
            t0 = time.time()
            try:
                dense_latent = lab.sample(model, run, prompt, seed, {})
            finally:
                if probe is not None:
                    probe.remove()
            rows["dense"]["seconds"] += time.time() - t0
            if probe is not None:
                structure = _merge_structure(structure, probe)
            dense = lab.decode(run, dense_latent)
            dense_class = lab.predicted_class(dense)
            features["dense"].append(lab.features(dense))
            rows["dense"]["psnr"].append(PSNR_CAP)
            rows["dense"]["ssim"].append(1.0)
            rows["dense"]["correct"].append(dense_class == label)
            for s in settings:
                t0 = time.time()
                latent = lab.sample(patched.get(s.name, base), run, prompt, seed, s.sampler)
                rows[s.name]["seconds"] += time.time() - t0
                rows[s.name]["skipped"].append(skipped_steps(patched.get(s.name)))
                frames = lab.decode(run, latent)
                rows[s.name]["psnr"].append(psnr(frames, dense))
                rows[s.name]["ssim"].append(ssim(frames, dense))
                rows[s.name]["correct"].append(lab.predicted_class(frames) == label)
                features[s.name].append(lab.features(frames))
            sample_index += 1
            print(f"[quality] {run.family}: {sample_index}/{len(prompts) * len(seeds)} samples", flush=True)
    table = {}
    for name, r in rows.items():
        n = len(r["psnr"])
        table[name] = {"psnr_db": round(sum(r["psnr"]) / n, 2), "ssim": round(sum(r["ssim"]) / n, 4),
                       "classifier_accuracy": round(sum(r["correct"]) / n, 4), "samples": n,
                       "sampling_seconds": round(r["seconds"], 1),
                       "skipped_steps": round(sum(r["skipped"]) / len(r["skipped"]), 2) if r["skipped"] else 0.0,
                       "feature_distance": round(frechet_distance(torch.stack(features[name]),
                                                                  torch.stack(features["dense"])), 4)}
    return {"family": run.family, "steps": run.steps, "cfg": run.cfg, "latent_shape": list(run.latent_shape),
            "prompts": prompts, "seeds": seeds, "settings": table,
            "structure": structure.summary() if structure is not None else None}


def skipped_steps(model) -> int:
    """Steps the last run of a Chipmunk-patched model skipped (step caching), from its run report."""
    accelerator = None if model is None else model.model_options["transformer_options"].get("chipmunk")
    report = getattr(accelerator, "last_report", None) or ""
    found = re.search(r"(\d+) skipped", report)
    return int(found.group(1)) if found else 0


def _merge_structure(total, probe):
    if total is None:
        return probe
    for key, values in probe.values.items():
        total.values[key].extend(values)
    return total


def markdown(results: dict) -> str:
    lines = []
    for family, r in results["families"].items():
        lines.append(f"### Toy {'FLUX' if family == 'flux' else 'WAN2.1'}: {len(r['prompts'])} prompts x "
                     f"{len(r['seeds'])} seeds, {r['steps']} steps, cfg {r['cfg']}, latent {r['latent_shape']}")
        lines.append("")
        lines.append(f"| setting | PSNR vs dense (dB) | SSIM vs dense | classifier accuracy | feature distance "
                     f"to dense | steps skipped (of {r['steps']}) | sampling s |")
        lines.append("|---|---|---|---|---|---|---|")
        for name, row in r["settings"].items():
            lines.append(f"| {name} | {row['psnr_db']:.2f} | {row['ssim']:.4f} | {row['classifier_accuracy']:.1%} | "
                         f"{row.get('feature_distance', 0.0):.3f} | {row.get('skipped_steps', 0.0):.1f} | "
                         f"{row['sampling_seconds']:.1f} |")
        s = r["structure"]
        if s:
            lines.append("")
            lines.append(f"Share of values explaining 70% / 90% of the step-to-step change (dense runs): attention "
                         f"{s['attention_fraction_for_70']:.1%} / {s['attention_fraction_for_90']:.1%}, MLP "
                         f"{s['mlp_fraction_for_70']:.1%} / {s['mlp_fraction_for_90']:.1%}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="*", default=["default"], help="settings to compare with dense")
    parser.add_argument("--family", nargs="*", choices=("flux", "wan"), default=["flux", "wan"])
    parser.add_argument("--prompts", type=int, help="prompts per family (default 12 FLUX, 4 WAN; --tiny 1)")
    parser.add_argument("--seeds", type=int, help="seeds per prompt (default 1)")
    parser.add_argument("--equal-cost", nargs="*", default=[], metavar="SETTING=SPEEDUP",
                        help="for each, also plain dense sampling with the step count of equal cost: the family's "
                             "steps divided by SETTING's measured GPU speed-up (e.g. default=1.47)")
    parser.add_argument("--structure-samples", type=int, default=1,
                        help="dense samples per family on which the paper's statistic is measured")
    parser.add_argument("--tiny", action="store_true", help="tiny latents, 4 steps, 1 prompt x 1 seed (tests)")
    parser.add_argument("--models", type=Path, help="a folder with diffusion_models/, vae_approx/, classifier/ "
                                                    "(default: lab/models)")
    parser.add_argument("--gpu", action="store_true", help="sample on the GPU (default: CPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: these models are small, and on a shared "
                             "2-core machine two threads wait on each other far longer than they compute)")
    parser.add_argument("--out", type=Path, help="write the JSON here and the markdown table next to it")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    start = time.time()
    lab = Lab(args.models, args.gpu)
    runs = family_runs(args.tiny)
    settings = [parse_setting(s) for s in args.settings]
    results = {"settings": args.settings, "families": {}}
    for family in args.family:
        count = args.prompts or (1 if args.tiny else {"flux": 12, "wan": 4}[family])
        seeds = list(range(args.seeds or 1))
        baselines = []
        for item in args.equal_cost:
            name, speedup = item.rsplit("=", 1)
            baselines.append(equal_cost_setting(name, float(speedup), runs[family].steps))
        results["families"][family] = measure(lab, runs[family], settings + baselines, prompts_for(family, count),
                                              seeds, args.structure_samples)
    results["seconds"] = round(time.time() - start, 1)
    import comfyui_version

    results["comfyui"] = comfyui_version.__version__
    results["torch"] = torch.__version__
    table = markdown(results)
    print(table)
    print(f"[quality] {results['seconds']} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        args.out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
