"""Train the real-scale lab models, one family per command, on one GPU, within a wall-time budget.

    python -m lab.real --family flux --comfyui COMFYUI.tar.gz --data SPRITES.npz --budget 510 \
        --high-share 0.2 --out OUT                       # first command
    python -m lab.real --family flux ... --resume PREVIOUS_OUT --high-share 0.6 --out OUT2

- ``flux``: FLUX.1 architecture (``networks.REAL_FLUX_UNET_CONFIG``) sampling 1024x1024 and
  non-square sizes of about as many pixels (832x1216, 1216x832): 4,096 image tokens.
- ``wan``: WAN2.1 t2v architecture (``networks.REAL_WAN_UNET_CONFIG``) sampling 33 frames of
  832x480: latents 16x9x60x104, 14,040 tokens. ``--tae-seconds S`` first fine-tunes the decoder of
  lighttaew2_1 on rich clips (the encoder, hence the latent space the toy WAN was trained in, is
  kept), and keeps the result only if it reconstructs held-out clips better.

Data: rich scenes and clips (lab/rich.py) rendered on the GPU and encoded by the lab's trained
autoencoders (lab/models/vae_approx, or ``--resume``'s) into a latent bank per picture size that is
refreshed while training (new samples replace the oldest, at a rate that keeps rendering and encoding
near ``GEN_SHARE`` of the time). Most of the budget trains at half the side (RoPE positions carry
over); the last ``--high-share`` of it at the full size. Rectified flow as the toys (lab/train.py),
bf16 autocast, EMA; in the last ``QAT_SHARE`` of the budget every weight is rounded through
float8_e4m3fn in the forward pass (straight-through gradients), so the fp8 file that ComfyUI loads
computes what was trained.

Results in ``OUT`` (at most 5 files, each under 15 MiB): ``models.tar.NN`` holding
``diffusion_models/<name>`` (the fp8 checkpoint ComfyUI loads), ``resume/<family>.safetensors``
(bf16 EMA weights, what ``--resume`` continues from; not installed) and, when the decoder improved,
``vae_approx/lighttaew2_1.safetensors``; ``train_log.json``; ``preview_<family>.png``. The check at
the end samples a few prompts at full size with the full step count and with 1.5x fewer steps
(PSNR between them: what fewer steps cost) and names the main objects with the classifier.
``python -m lab.install OUT`` puts the models into lab/models.

Presets: ``real`` (the GPU run), ``real-check`` (the real sizes, one step per phase, tiny banks:
a shape check), ``tiny`` (toy sizes on a CPU in seconds: the smoke test).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .train import PART_BYTES, write_model_parts  # noqa: F401 (PART_BYTES: the size of the parts)

SEED = 20261206
GEN_SHARE = 0.4
QAT_SHARE = 0.15
LAB = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Plan:
    low: tuple  # picture sizes while training at low resolution: (H, W) or (T, H, W)
    high: tuple  # the real sizes
    batch_low: int
    batch_high: int
    bank_low: int  # latents kept per size
    bank_high: int
    chunk: int  # pictures rendered and encoded at once
    eval_prompts: int
    eval_steps: int
    fixed_steps: int = 0  # >0: each phase runs exactly this many steps (checks and tests)
    tae_crop: tuple = (9, 256, 256)  # decoder fine-tuning clips (T, H, W)
    tae_batch: int = 4
    classifier_batch: int = 192
    classifier_size: int = 256  # side the classifier's training scenes are rendered at


PLANS = {
    "flux": {
        "real": Plan(low=((512, 512), (608, 416), (416, 608)), high=((1024, 1024), (1216, 832), (832, 1216)),
                     batch_low=32, batch_high=8, bank_low=2048, bank_high=384, chunk=16, eval_prompts=8,
                     eval_steps=20),
        "tiny": Plan(low=((32, 32), (48, 32)), high=((64, 64), (64, 48)), batch_low=2, batch_high=1, bank_low=4,
                     bank_high=2, chunk=2, eval_prompts=2, eval_steps=3, fixed_steps=2),
    },
    "wan": {
        "real": Plan(low=((33, 240, 416),), high=((33, 480, 832),), batch_low=8, batch_high=4, bank_low=256,
                     bank_high=128, chunk=2, eval_prompts=4, eval_steps=30),
        "tiny": Plan(low=((5, 16, 32),), high=((9, 32, 48),), batch_low=2, batch_high=1, bank_low=2, bank_high=2,
                     chunk=1, eval_prompts=1, eval_steps=3, fixed_steps=2, tae_crop=(5, 16, 16), tae_batch=1),
    },
}
PLANS["classifier"] = {"real": PLANS["flux"]["real"],
                       "tiny": replace(PLANS["flux"]["tiny"], classifier_batch=6, classifier_size=32)}
for _family in PLANS:
    PLANS[_family]["real-check"] = replace(PLANS[_family]["real"], batch_low=1, batch_high=1, bank_low=1, bank_high=1,
                                           chunk=1, eval_prompts=1, eval_steps=2, fixed_steps=1, tae_batch=1,
                                           classifier_batch=6)


# --- setup ---------------------------------------------------------------------------------------
def _setup(args):
    import torch

    from . import comfy_env

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    comfy_env.import_comfy(comfy_env.resolve(args.comfyui), cpu=device.type == "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = device.type == "cuda"
    return device


def _atlas(args, device):
    from . import data, rich

    sprites, _ = data.load_sprites(args.data)
    return rich.Atlas(sprites, data.load_text(args.data), device)


def _resume_members(path: Path) -> dict[str, bytes]:
    """Files of an earlier run's results (``models.tar.NN`` parts) or of a folder laid out like them."""
    parts = sorted(path.glob("models.tar.[0-9][0-9]"))
    if parts:
        archive = tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts)))
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*.safetensors")}


def _load_bytes(payload: bytes) -> dict:
    from safetensors.torch import load as load_bytes

    return load_bytes(payload)


# --- data ----------------------------------------------------------------------------------------
class Bank:
    """Latents of rendered samples of one size on the device, refreshed in a ring."""

    def __init__(self, family, shape, capacity, make, device):
        import torch

        self.family, self.shape, self.capacity, self.make = family, shape, capacity, make
        self.latents = None
        self.ids = torch.zeros((capacity, 8), dtype=torch.long, device=device)
        self.filled = 0
        self.cursor = 0

    def add(self, count: int) -> None:
        import torch

        latents, ids = self.make(self.shape, count)
        if self.latents is None:
            self.latents = torch.empty((self.capacity, *latents.shape[1:]), dtype=torch.bfloat16, device=latents.device)
        for i in range(latents.shape[0]):
            self.latents[self.cursor] = latents[i]
            self.ids[self.cursor] = ids[i]
            self.cursor = (self.cursor + 1) % self.capacity
            self.filled = min(self.capacity, self.filled + 1)

    def sample(self, batch: int, generator):
        import torch

        index = torch.randint(self.filled, (batch,), device=self.ids.device, generator=generator)
        return self.latents[index].float(), self.ids[index]


def _sample_maker(family, atlas, encoder, generator, device, chunk):
    """``make(shape, count)`` -> (model-space latents, token ids) of ``count`` fresh rich samples."""
    import torch

    from . import rich, scenes

    def make(shape, count):
        latents, ids = [], []
        for start in range(0, count, chunk):
            n = min(chunk, count - start)
            if family == "flux":
                height, width = shape
                placement, extras, words = rich.random_images(n, generator, atlas, height, width)
                pixels = rich.render(atlas, placement, extras, height, width)
            else:
                frames, height, width = shape
                placement, extras, words = rich.random_clips(n, frames, generator, atlas)
                pixels = rich.render_clips(atlas, placement, extras, frames, height, width)
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                latents.append(encoder(pixels).float())
            ids.append(scenes.words_to_ids(words).to(device))
        return torch.cat(latents), torch.cat(ids)

    return make


# --- training ------------------------------------------------------------------------------------
def _timed(device, fn):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.time() - start


def train_dit(family, model, plan, make, device, seconds, args, log, start_step=0):
    """Rectified-flow training on refreshed banks: low sizes first, then the high ones."""
    import torch

    from . import networks, vocab
    from .train import _TokenSampler
    from .training import EMA, Budget, dit_step, learning_rate, make_optimizer

    optimizer = make_optimizer(model, lr=args.lr)
    ema = EMA(model, decay=args.ema)
    generator = torch.Generator(device=device).manual_seed(SEED + 3 + start_step)
    width = vocab.FLUX_CONTEXT_WIDTH if family == "flux" else vocab.WAN_CONTEXT_WIDTH
    tokens = _TokenSampler(width, device, generator)
    curve = log.setdefault("curve", [])
    phases = [("low", plan.low, plan.batch_low, plan.bank_low, 1.0 - args.high_share),
              ("high", plan.high, plan.batch_high, plan.bank_high, args.high_share)]
    total_start = time.time()
    deadline = total_start + seconds
    step = 0
    for name, shapes, batch, capacity, share in phases:
        if share <= 0:
            continue
        phase_seconds = seconds * share if name == "low" else deadline - time.time()
        t0 = time.time()
        banks = []
        for shape in shapes:
            bank = Bank(family, shape, capacity, make, device)
            bank.add(min(capacity, max(batch, capacity // 4)))
            banks.append(bank)
        fill_seconds = time.time() - t0
        budget = Budget(max(0.0, phase_seconds - fill_seconds), steps=plan.fixed_steps or None)
        rate, owed, gen_time, step_time = max(1.0, batch / 4), 0.0, None, None
        entry = {"shapes": [list(s) for s in shapes], "batch": batch, "bank": capacity,
                 "fill_seconds": round(fill_seconds, 1)}
        running = None
        while not budget.done():
            progress_all = min(1.0, (time.time() - total_start) / max(1e-6, seconds))
            if plan.fixed_steps:
                progress_all = 1.0 if name == "high" else 0.5
            lr = learning_rate(args.lr, step, progress_all, warmup=args.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            bank = banks[step % len(banks)]
            owed += rate
            if owed >= 1.0:
                count = int(owed)
                owed -= count
                _, seconds_gen = _timed(device, lambda: bank.add(count))
                per = seconds_gen / count
                gen_time = per if gen_time is None else 0.9 * gen_time + 0.1 * per
            x0, ids = bank.sample(batch, generator)
            context, pooled = tokens.condition(tokens.ids(ids))
            qat = progress_all >= 1.0 - QAT_SHARE

            @contextmanager
            def around():  # ComfyUI's in-place residuals made trainable; fp8-rounded weights for QAT
                with networks.trainable_comfy_blocks(), (networks.fp8_weights(model) if qat else nullcontext()):
                    yield

            def train_step():
                return dit_step(model, family, x0, context, pooled, generator, optimizer, ema, around)

            (loss, grad), seconds_step = _timed(device, train_step)
            step_time = seconds_step if step_time is None else 0.9 * step_time + 0.1 * seconds_step
            if gen_time:  # generation near GEN_SHARE of the time, at least one new sample per 50 steps
                rate = min(float(batch), max(0.02, GEN_SHARE / (1 - GEN_SHARE) * step_time / gen_time))
            budget.step += 1
            step += 1
            if budget.step % 10 == 0 or budget.step <= 3:
                running = loss.item() if running is None else 0.8 * running + 0.2 * loss.item()
            if budget.step % 100 == 0 or budget.step <= 2:
                curve.append({"phase": name, "step": step, "s": round(time.time() - total_start, 1),
                              "loss": round(running, 5), "grad_norm": round(float(grad), 4), "lr": lr,
                              "new_per_step": round(rate, 3), "qat": qat})
                log.write()
        entry.update(steps=budget.step, seconds=round(budget.elapsed(), 1), final_loss=running,
                     step_seconds=None if step_time is None else round(step_time, 4),
                     sample_seconds=None if gen_time is None else round(gen_time, 4))
        log.setdefault("phases", {})[name] = entry
        log.write()
    ema.copy_to(model)
    return model.eval()


class JsonLog(dict):
    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def write(self):
        self.path.write_text(json.dumps(self, indent=1, default=str))


# --- the decoder of lighttaew2_1 -----------------------------------------------------------------
def _clip_psnr(tae, clips) -> float:
    import torch

    from .train import _psnr

    with torch.no_grad():
        return _psnr(tae.decode(tae.encode(clips)), clips)


def finetune_video_decoder(tae, atlas, plan, device, seconds, log):
    """Train lighttaew2_1's decoder (encoder frozen) on rich clips; returns whether it improved on
    held-out rich clips and on the toy clips (lab/scenes.py) alike."""
    import torch
    import torch.nn.functional as F

    from . import rich, scenes
    from .training import Budget, autocast, learning_rate

    frames, height, width = plan.tae_crop
    held = torch.Generator().manual_seed(SEED + 40)
    placement, extras, _ = rich.random_clips(4 if plan.fixed_steps == 0 else 1, frames, held, atlas)
    held_rich = rich.render_clips(atlas, placement, extras, frames, height, width)
    toy_p, _ = scenes.random_clips(held_rich.shape[0], frames, held)
    held_toy = scenes.render_clips(atlas.emoji, toy_p, frames, min(height, width))
    before = {"rich": _clip_psnr(tae, held_rich), "toy": _clip_psnr(tae, held_toy)}
    original = {k: v.detach().clone() for k, v in tae.state_dict().items()}
    decoder = tae.net.decoder
    for p in tae.parameters():
        p.requires_grad_(False)
    for p in decoder.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=2e-4, betas=(0.9, 0.99), weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED + 41)
    budget = Budget(seconds, steps=plan.fixed_steps or None)
    running = None
    while not budget.done():
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(2e-4, budget.step, budget.progress(), warmup=50)
        half = max(1, plan.tae_batch // 2)
        placement, extras, _ = rich.random_clips(half, frames, generator, atlas)
        clips = [rich.render_clips(atlas, placement, extras, frames, height, width)]
        toy_p, _ = scenes.random_clips(plan.tae_batch - half or 1, frames, generator)
        clips.append(F.interpolate(scenes.render(atlas.emoji, toy_p, min(height, width)), size=(height, width),
                                   mode="bilinear", align_corners=False)
                     .view(-1, frames, 3, height, width).transpose(1, 2))
        pixels = torch.cat(clips)
        with torch.no_grad(), autocast(device):
            latents = tae.encode(pixels).float()
        noisy = latents + torch.randn(latents.shape, device=device) * 0.03 * tae.std
        with autocast(device):
            out = tae.decode(noisy).float()
        loss = F.l1_loss(out, pixels) + sum(F.l1_loss(torch.diff(out, dim=d), torch.diff(pixels, dim=d)) for d in (-2, -1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        optimizer.step()
        budget.step += 1
        if budget.step % 10 == 0 or budget.step <= 3:
            running = loss.item() if running is None else 0.8 * running + 0.2 * loss.item()
    tae.eval()
    after = {"rich": _clip_psnr(tae, held_rich), "toy": _clip_psnr(tae, held_toy)}
    improved = after["rich"] > before["rich"] and after["toy"] >= before["toy"] - 0.1
    if not improved:
        tae.load_state_dict(original)
    log["video_decoder"] = {"steps": budget.step, "seconds": round(budget.elapsed(), 1), "final_loss": running,
                            "held_out_psnr_before": {k: round(v, 2) for k, v in before.items()},
                            "held_out_psnr_after": {k: round(v, 2) for k, v in after.items()},
                            "kept": improved, "clip": list(plan.tae_crop)}
    log.write()
    return improved


# --- the classifier --------------------------------------------------------------------------------
def _classifier_batch(atlas, generator, n, side, device):
    """Pixels [n, 3, 128, 128] and labels: toy scenes, rich pictures of three shapes, rich clip frames."""
    import torch
    import torch.nn.functional as F

    from . import classifier as cls_mod
    from . import rich, scenes

    def small(x):
        return F.interpolate(x, size=(cls_mod.INPUT_SIZE, cls_mod.INPUT_SIZE), mode="bilinear", antialias=True,
                             align_corners=False)

    third = max(1, n // 3)
    toy, _ = scenes.random_images(third, generator)
    parts, labels = [small(scenes.render(atlas.emoji, toy, side))], [toy.cls]
    shape = [(side, side), (side * 19 // 13 // 8 * 8, side), (side, side * 19 // 13 // 8 * 8)][
        int(torch.randint(3, (1,), generator=generator))]
    placement, extras, _ = rich.random_images(third, generator, atlas, *shape)
    parts.append(small(rich.render(atlas, placement, extras, *shape)))
    labels.append(placement.cls)
    clips = max(1, (n - 2 * third) // 4)
    placement, extras, _ = rich.random_clips(clips, 4, generator, atlas)
    frames = rich.render_clips(atlas, placement, extras, 4, side * 9 // 16 // 8 * 8, side)
    parts.append(small(frames.transpose(1, 2).flatten(0, 1)))
    labels.append(placement.cls)
    return torch.cat(parts), torch.cat(labels).to(device)


def finetune_classifier(atlas, plan, device, seconds, log, models: Path, work: Path) -> bool:
    """Continue the classifier's training on toy and rich scenes; keep it if rich accuracy rises and
    toy accuracy stays within a point."""
    import torch
    import torch.nn.functional as F

    from . import classifier as cls_mod
    from .training import Budget, autocast, learning_rate

    net = cls_mod.load(models / "classifier" / cls_mod.FILE, device)
    held = [_classifier_batch(atlas, torch.Generator().manual_seed(SEED + 60 + i), plan.classifier_batch,
                              plan.classifier_size, device) for i in range(2)]

    def accuracy():
        net.eval()
        with torch.no_grad():
            third = max(1, plan.classifier_batch // 3)
            right = [(net(x).argmax(-1) == y).float() for x, y in held]
            toy = torch.cat([r[:third] for r in right]).mean().item()
            rich_ = torch.cat([r[third:] for r in right]).mean().item()
        return {"toy": round(toy, 4), "rich": round(rich_, 4)}

    before = accuracy()
    original = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(SEED + 61)
    budget = Budget(seconds, steps=plan.fixed_steps or None)
    running = None
    while not budget.done():
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(1e-3, budget.step, budget.progress(), warmup=50, floor=0.02)
        pixels, labels = _classifier_batch(atlas, generator, plan.classifier_batch, plan.classifier_size, device)
        with autocast(device):
            logits = net(cls_mod.augment(pixels, generator))
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        budget.step += 1
        if budget.step % 10 == 0 or budget.step <= 3:
            running = loss.item() if running is None else 0.8 * running + 0.2 * loss.item()
    after = accuracy()
    kept = after["rich"] > before["rich"] and after["toy"] >= before["toy"] - 0.01
    if kept:
        (work / "classifier").mkdir(parents=True, exist_ok=True)
        cls_mod.save(net, work / "classifier")
    else:
        net.load_state_dict(original)
    log["classifier"] = {"steps": budget.step, "seconds": round(budget.elapsed(), 1), "final_loss": running,
                         "held_out_accuracy_before": before, "held_out_accuracy_after": after, "kept": kept}
    log.write()
    return kept


# --- the check at the end ------------------------------------------------------------------------
def check_samples(family, model, plan, decode, device, log, classifier_path, preview_path):
    """Full-size samples of held-out prompts: full steps against 1.5x fewer, and the classifier."""
    import torch

    from . import classifier as cls_mod
    from . import scenes, vocab
    from .train import _prompt_condition, _psnr, _save_grid, sample_euler

    generator = torch.Generator().manual_seed(SEED + 50)
    n = plan.eval_prompts
    if family == "flux":
        _, words = scenes.random_images(n, generator)
        prompts = [vocab.image_prompt(i % len(vocab.CLASSES), w[0], w[2], w[3], w[4], w[5]) for i, w in enumerate(words)]
    else:
        _, words = scenes.random_clips(n, 2, generator)
        motions = {m.split()[1]: m for m in vocab.MOTIONS}
        prompts = [vocab.video_prompt(i % len(vocab.CLASSES), w[0], motions[w[3]], w[4], w[5])
                   for i, w in enumerate(words)]
    width = vocab.FLUX_CONTEXT_WIDTH if family == "flux" else vocab.WAN_CONTEXT_WIDTH
    context, pooled = _prompt_condition(width, device, prompts)
    uncond = _prompt_condition(width, device, [""])
    if family != "flux":
        pooled, uncond = None, (uncond[0], None)
    guidance = torch.full((n,), 3.5, device=device)
    shape = plan.high[0]
    latent = (16, shape[0] // 8, shape[1] // 8) if family == "flux" else (16, (shape[0] + 3) // 4, shape[1] // 8,
                                                                         shape[2] // 8)
    fewer = max(1, round(plan.eval_steps / 1.5))
    net = cls_mod.load(classifier_path, device) if Path(classifier_path).is_file() else None
    labels = torch.tensor([vocab.class_of_prompt(p) for p in prompts], device=device)
    results, pictures = {}, {}
    start = time.time()
    for steps in (plan.eval_steps, fewer):
        noise = torch.randn((n, *latent), generator=torch.Generator().manual_seed(SEED + 51)).to(device)
        frames = []
        with torch.no_grad():
            for i in range(n):  # one at a time: the full-size video samples are large
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    x = sample_euler(model, family, noise[i:i + 1], context[i:i + 1],
                                     None if pooled is None else pooled[i:i + 1], guidance[i:i + 1], 3.5, steps, uncond)
                    frames.append(decode(x.float()).float().clamp(0, 1).cpu())
        pictures[steps] = torch.cat(frames)
        entry = {}
        if net is not None:
            with torch.no_grad():
                p = pictures[steps].to(device)
                flat = p if p.dim() == 4 else p.transpose(1, 2).flatten(0, 1)
                logits = net(flat)
                if p.dim() == 5:
                    logits = logits.view(p.shape[0], p.shape[2], -1).mean(1)
                entry["classifier_accuracy"] = round((logits.argmax(-1) == labels).float().mean().item(), 4)
        results[str(steps)] = entry
    results["psnr_fewer_vs_full_db"] = round(_psnr(pictures[fewer], pictures[plan.eval_steps]), 2)
    log["check"] = {"prompts": prompts, "size": list(shape), "steps": plan.eval_steps, "fewer_steps": fewer, "cfg": 3.5,
                    "by_steps": results, "seconds": round(time.time() - start, 1)}
    log.write()
    full = pictures[plan.eval_steps]
    import torch.nn.functional as F

    if full.dim() == 4:
        small = F.interpolate(full[:8], scale_factor=0.5, mode="area") if full.shape[-1] >= 256 else full[:8]
        _save_grid(small, preview_path, columns=4)
    else:
        small = full[:4].transpose(1, 2).flatten(0, 1)
        small = F.interpolate(small, scale_factor=0.5, mode="area") if small.shape[-1] >= 256 else small
        _save_grid(small.view(full[:4].shape[0], full.shape[2], 3, *small.shape[-2:]).transpose(1, 2),
                   preview_path, columns=9)


# --- the command ---------------------------------------------------------------------------------
def run(args) -> int:
    import torch

    from . import networks, tae as tae_mod
    from .classifier import FILE as CLASSIFIER_FILE

    plan = PLANS[args.family][args.preset]
    work = Path(args.work)
    for folder in ("diffusion_models", "vae_approx", "resume"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    log = JsonLog(work / "train_log.json")
    started = time.time()
    deadline = started + args.budget
    log.update(family=args.family, preset=args.preset, plan=asdict(plan), seed=SEED, budget=args.budget,
               lr=args.lr, high_share=args.high_share, resumed=bool(args.resume),
               config=networks.UNET_CONFIGS.get((args.family, "real")))
    log.write()
    device = _setup(args)
    log.update(torch=torch.__version__, gpu=torch.cuda.get_device_name() if device.type == "cuda" else None)
    atlas = _atlas(args, device)
    members = _resume_members(Path(args.resume)) if args.resume else {}
    models = Path(args.models)
    if args.family == "classifier":
        finetune_classifier(atlas, plan, device, max(1.0, deadline - time.time() - 20.0), log, models, work)
        log["seconds"] = round(time.time() - started, 1)
        log.write()
        return 0

    if args.family == "flux":
        tae = tae_mod.ImageTAE().load(models / "vae_approx").to(device).eval()

        def encoder(pixels):
            return tae.encode(pixels)

        def decode(x):
            return tae.decode(x)
    else:
        tae = tae_mod.VideoTAE()
        tae.load(models / "vae_approx")
        if f"vae_approx/{tae_mod.VIDEO_TAE_FILE}" in members:
            tae.net.load_state_dict({k: v.float() for k, v in _load_bytes(members[f"vae_approx/{tae_mod.VIDEO_TAE_FILE}"]).items()})
            log["video_decoder_from_resume"] = True
        tae = tae.to(device).eval()
        if args.tae_seconds > 0:
            if finetune_video_decoder(tae, atlas, plan, device, args.tae_seconds, log):
                tae.save(work / "vae_approx")
        elif f"vae_approx/{tae_mod.VIDEO_TAE_FILE}" in members:
            tae.save(work / "vae_approx")  # carried on, so that installing the last run installs it

        def encoder(clips):
            return tae.to_model_space(tae.encode(clips))

        def decode(x):
            return tae.decode(tae.from_model_space(x))

    torch.manual_seed(SEED + 2)
    model = networks.build(args.family, device, scale="real")
    resume_key = f"resume/{args.family}.safetensors"
    if resume_key in members:
        model.load_state_dict({k: v.float() for k, v in _load_bytes(members[resume_key]).items()})
    log["params"] = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(SEED + 10 + (7 if args.resume else 0))
    make = _sample_maker(args.family, atlas, encoder, generator, device, plan.chunk)
    check_seconds = 0.0 if plan.fixed_steps else args.check_seconds
    seconds = max(1.0, deadline - time.time() - check_seconds - 15.0)
    model = train_dit(args.family, model, plan, make, device, seconds, args, log)
    name = networks.REAL_CHECKPOINT_NAMES[args.family]
    config = networks.REAL_FLUX_UNET_CONFIG if args.family == "flux" else networks.REAL_WAN_UNET_CONFIG
    networks.save_checkpoint(model, work / "diffusion_models" / name,
                             {"chipmunk_lab": args.family, "config": json.dumps(config)}, dtype=networks.FP8)
    networks.save_checkpoint(model, work / "resume" / f"{args.family}.safetensors")
    log["saved_after_seconds"] = round(time.time() - started, 1)
    log.write()
    if not args.no_check:  # sample what the fp8 file holds
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(networks.fp8_round(p))
        classifier_path = Path(args.classifier or models / "classifier" / CLASSIFIER_FILE)
        check_samples(args.family, model, plan, decode, device, log, classifier_path,
                      work / f"preview_{args.family}.png")
    log["seconds"] = round(time.time() - started, 1)
    log.write()
    return 0


def pack(work: Path, out: Path) -> list[Path]:
    """The model files as tar parts under 15 MiB, the log and the preview, into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = write_model_parts(work, ("diffusion_models", "vae_approx", "classifier", "resume"), out)
    for name in ["train_log.json", *sorted(p.name for p in work.glob("preview_*.png"))]:
        if (work / name).is_file():
            (out / name).write_bytes((work / name).read_bytes())
            written.append(out / name)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("flux", "wan", "classifier"), required=True,
                        help="classifier: continue the classifier's training on toy and rich scenes")
    parser.add_argument("--comfyui", required=True, help="ComfyUI tree or source archive (.tar.gz)")
    parser.add_argument("--data", required=True, help="the data file from python -m lab.data (with --fonts)")
    parser.add_argument("--out", required=True, help="where the packed results go")
    parser.add_argument("--preset", choices=("real", "real-check", "tiny"), default="real")
    parser.add_argument("--budget", type=float, default=510.0, help="wall seconds for the whole command")
    parser.add_argument("--high-share", type=float, default=0.2, help="share of the training time at the real size")
    parser.add_argument("--resume", help="an earlier run's --out folder (or a folder holding resume/<family>.safetensors)")
    parser.add_argument("--tae-seconds", type=float, default=0.0, help="wan: fine-tune lighttaew2_1's decoder first")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--check-seconds", type=float, default=60.0, help="time kept for the final check")
    parser.add_argument("--no-check", action="store_true", help="skip the samples at the end")
    parser.add_argument("--models", default=str(LAB / "models"), help="where the autoencoders and classifier are read")
    parser.add_argument("--classifier", help="classifier file for the check (default: the models folder's)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument("--work", help="working folder (default: OUT/../<family>-work under the temp dir)")
    args = parser.parse_args(argv)
    if args.work is None:
        import tempfile

        args.work = str(Path(tempfile.mkdtemp(prefix=f"chipmunk-lab-{args.family}-")))
    code = 1
    try:
        code = run(args)
    finally:
        written = pack(Path(args.work), Path(args.out))
        print("wrote", ", ".join(f"{p.name} ({p.stat().st_size} B)" for p in written))
        log = Path(args.work) / "train_log.json"
        if log.is_file():
            text = json.loads(log.read_text())
            print(json.dumps({k: text.get(k) for k in ("params", "phases", "video_decoder", "classifier", "check",
                                                       "seconds")},
                             default=str)[:4000])
    return code


if __name__ == "__main__":
    sys.exit(main())
