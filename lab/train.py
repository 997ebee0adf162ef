"""Train every toy model in one command: the autoencoders, the two diffusion transformers and the
classifier, in parallel on up to three GPUs, each job bounded by a wall-time budget.

    python -m lab.train --comfyui comfyui-v0.19.3.tar.gz --data toy_sprites.npz \
        --gpus 0,1,2 --budget 480 --out OUT_DIR

Jobs (one process each, ``CUDA_VISIBLE_DEVICES`` set to its GPU):
- ``image``: taef1 autoencoder -> latent bank of composed scenes -> toy FLUX -> a check: samples
  with a few CFG scales, decoded and named by the classifier once that job has saved it.
- ``video``: lighttaew2_1 autoencoder -> latent bank of clips -> toy WAN2.1 -> the same check.
- ``classifier``: the CNN that names the emoji in a picture (lab/classifier.py).

Every job stops on its budget and saves (``--dit-steps N`` fixes the transformers' step count, to
re-run a logged training exactly). ``--resume MODELS_DIR`` continues from an earlier run's models (a
lab/models tree): its autoencoders and classifier are kept as they are, both transformers start from
its weights and train for the new budget (a fresh warm-up and cosine decay from ``--dit-lr``), and the
earlier run's log is kept inside the new one, so one GPU command of at most 10 minutes can add to a
model's training time. The results land in ``OUT_DIR`` as at most 6 files: ``models.tar.NN`` (the lab/models tree,
split into parts under 15 MiB), ``train_log.json`` and a preview PNG per model
(``python -m lab.install OUT_DIR`` puts the models into lab/models). ``--preset tiny`` runs the same code
at toy sizes on the CPU (the smoke test); ``--preset check`` runs the GPU run's sizes for one step.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

PART_BYTES = 15 * 1024 * 1024

JOBS = ("image", "video", "classifier")
# Share of a job's budget for each phase (the rest: the final check and saving).
IMAGE_PHASES = {"tae": 0.20, "bank": 0.04, "dit": 0.66}
VIDEO_PHASES = {"tae": 0.25, "bank": 0.04, "dit": 0.60}
# With --resume the autoencoders and the classifier are taken as they are: the budget goes to the DiTs.
RESUME_PHASES = {"tae": 0.0, "bank": 0.04, "dit": 0.86}
SEED = 20260417


@dataclass(frozen=True)
class Sizes:
    image_size: int = 256
    tae_crop: int = 128
    tae_batch: int = 32
    bank_images: int = 60000
    flux_batch: int = 256
    video_size: int = 160
    video_frames: int = 17
    vtae_frames: int = 9
    vtae_crop: int = 128
    vtae_batch: int = 6
    bank_clips: int = 12000
    wan_batch: int = 64
    classifier_batch: int = 256
    eval_images: int = 64
    eval_clips: int = 32
    eval_steps_flux: int = 28
    eval_steps_wan: int = 30
    chunk: int = 512  # encoding batch for the latent banks
    fixed_steps: int = 0  # >0: every phase runs exactly this many steps (smoke tests)


# The smoke test: every phase at toy sizes, two steps each (about a minute per job on two CPU cores).
TINY = Sizes(image_size=32, tae_crop=16, tae_batch=2, bank_images=8, flux_batch=4, video_size=16, video_frames=5,
             vtae_frames=5, vtae_crop=16, vtae_batch=1, bank_clips=2, wan_batch=2, classifier_batch=8, eval_images=2,
             eval_clips=1, eval_steps_flux=2, eval_steps_wan=2, chunk=4, fixed_steps=2)
# The shape check: the GPU run's sizes with one step per phase and tiny banks (several CPU minutes).
CHECK = replace(Sizes(), tae_batch=1, bank_images=4, flux_batch=2, vtae_batch=1, bank_clips=1, wan_batch=1,
                classifier_batch=8, eval_images=1, eval_clips=1, eval_steps_flux=2, eval_steps_wan=2, chunk=2,
                fixed_steps=1)
PRESETS = {"full": Sizes(), "tiny": TINY, "check": CHECK}
EVAL_CFG = (1.0, 2.0, 3.5, 5.0)


# --- helpers -------------------------------------------------------------------------------------
def _setup(args):
    import torch

    from . import comfy_env

    device = torch.device(args.device)
    comfy_env.import_comfy(comfy_env.resolve(args.comfyui), cpu=device.type == "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = device.type == "cuda"
    if device.type == "cpu":
        torch.set_num_threads(1)  # the CPU runs are smoke tests of tiny tensors: threads only wait on each other
    return device


def _sprites(args, device):
    from . import data, scenes

    sprites, meta = data.load_sprites(args.data)
    return scenes.sprites_tensor(sprites, device), meta


def _random_crop(x, size, generator):
    import torch

    h, w = x.shape[-2:]
    top = int(torch.randint(h - size + 1, (1,), generator=generator))
    left = int(torch.randint(w - size + 1, (1,), generator=generator))
    return x[..., top:top + size, left:left + size]


def _wait_for(path: Path, deadline: float) -> bool:
    while not path.exists() and time.time() < deadline:
        time.sleep(2.0)
    return path.exists()


def _psnr(a, b) -> float:
    import torch

    mse = torch.mean((a.float().clamp(0, 1) - b.float().clamp(0, 1)) ** 2).item()
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


class _TokenSampler:
    """Token ids of a latent bank -> the conditioning tensors of a training batch, on the GPU.

    Words other than the class word are dropped with ``drop_word`` each (robustness to short
    prompts); whole prompts with ``drop_prompt`` (the unconditional input for CFG)."""

    def __init__(self, width: int, device, generator, drop_word=0.1, drop_prompt=0.1):
        import torch

        from . import vocab

        self.table = torch.tensor(vocab.embedding_table(width), device=device)
        self.pad, self.empty = vocab.WORD_INDEX[vocab.PAD], vocab.WORD_INDEX[vocab.EMPTY]
        self.classes = torch.tensor([vocab.WORD_INDEX[w] for w in vocab.CLASS_WORDS], device=device)
        self.generator, self.drop_word, self.drop_prompt = generator, drop_word, drop_prompt

    def ids(self, ids):
        import torch

        n = ids.shape[0]
        rand = torch.rand(ids.shape, device=ids.device, generator=self.generator)
        keep = (rand >= self.drop_word) | torch.isin(ids, self.classes) | (ids == self.pad)
        ids = torch.where(keep, ids, torch.full_like(ids, self.pad))
        ids = ids.gather(1, torch.argsort((~keep).int(), dim=1, stable=True))
        uncond = torch.rand(n, device=ids.device, generator=self.generator) < self.drop_prompt
        empty = torch.full_like(ids, self.pad)
        empty[:, 0] = self.empty
        return torch.where(uncond[:, None], empty, ids)

    def condition(self, ids):
        context = self.table[ids]
        weights = (ids != self.pad).float()
        pooled = (context * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
        return context, pooled


def _train_dit(family, bank, ids_bank, device, sizes, seconds, log, args):
    """Rectified-flow training of a toy transformer on a latent bank; returns the EMA model."""
    import torch

    from . import networks, vocab
    from .training import EMA, Budget, dit_step, learning_rate, make_optimizer

    torch.manual_seed(SEED + 2)
    model = networks.build(family, device)
    if args.resume:
        from safetensors.torch import load_file

        start = Path(args.resume) / "diffusion_models" / networks.CHECKPOINT_NAMES[family]
        model.load_state_dict({k: v.float() for k, v in load_file(str(start)).items()})
    optimizer = make_optimizer(model, lr=args.dit_lr)
    ema = EMA(model, decay=0.999)
    generator = torch.Generator(device=device).manual_seed(SEED + 3)
    width = vocab.FLUX_CONTEXT_WIDTH if family == "flux" else vocab.WAN_CONTEXT_WIDTH
    tokens = _TokenSampler(width, device, generator)
    batch = sizes.flux_batch if family == "flux" else sizes.wan_batch
    budget = Budget(seconds, steps=sizes.fixed_steps or args.dit_steps or None)
    phase = log.phase(f"{family}_dit", batch=batch, lr=args.dit_lr, bank=int(bank.shape[0]),
                      params=sum(p.numel() for p in model.parameters()), resumed=bool(args.resume))
    running = None
    with networks.trainable_comfy_blocks():
        while not budget.done():
            lr = learning_rate(args.dit_lr, budget.step, budget.progress())
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = torch.randint(bank.shape[0], (batch,), device=device, generator=generator)
            x0 = bank[index].float()
            context, pooled = tokens.condition(tokens.ids(ids_bank[index]))
            loss, grad_norm = dit_step(model, family, x0, context, pooled, generator, optimizer, ema)
            budget.step += 1
            if budget.step % 10 == 0 or budget.step <= 3:  # .item() waits for the GPU: not every step
                running = loss.item() if running is None else 0.8 * running + 0.2 * loss.item()
            if budget.step % 200 == 0 or budget.step <= 3:
                log.point(f"{family}_dit", budget.step, budget.elapsed(), loss=running, grad_norm=grad_norm, lr=lr)
    phase.update(steps=budget.step, seconds=round(budget.elapsed(), 1), final_loss=running,
                 cut_short=budget.cut_short())
    log.write()
    ema.copy_to(model)
    return model.eval()



def sample_euler(model, family, noise, context, pooled, guidance, cfg, steps, uncond):
    """Euler sampling over ComfyUI's "simple" schedule with CFG (what KSampler euler/simple does)."""
    import torch

    from . import networks

    sigmas = networks.simple_sigmas(networks.model_sampling(family), steps).to(noise.device)
    x = noise * sigmas[0]
    u_context, u_pooled = uncond
    n = x.shape[0]
    for i in range(steps):
        sigma = sigmas[i].expand(n)
        v = networks.predict_v(model, family, x, sigma, context, pooled, guidance)
        if cfg != 1.0:
            v_u = networks.predict_v(model, family, x, sigma, u_context.expand(n, -1, -1),
                                     None if u_pooled is None else u_pooled.expand(n, -1), guidance)
            v = v_u + cfg * (v - v_u)
        x = x + (sigmas[i + 1] - sigmas[i]) * v.float()
    return x


def _prompt_condition(width, device, prompts):
    import torch

    from . import vocab

    table = torch.tensor(vocab.embedding_table(width), device=device)
    ids = torch.tensor([vocab.token_ids(vocab.tokenize(p)[0]) for p in prompts], device=device)
    weights = torch.stack([torch.from_numpy(vocab.pooled_weights(i.tolist())) for i in ids]).to(device)
    context = table[ids]
    return context, (context * weights[..., None]).sum(1)


def _check_samples(family, model, decode, device, log, out_root, prompts, latent_shape, steps, deadline):
    """Sample the trained model with several CFG scales; name the samples with the classifier."""
    import torch

    from . import classifier as cls_mod
    from . import vocab

    width = vocab.FLUX_CONTEXT_WIDTH if family == "flux" else vocab.WAN_CONTEXT_WIDTH
    context, pooled = _prompt_condition(width, device, prompts)
    u_context, u_pooled = _prompt_condition(width, device, [""])
    if family != "flux":
        pooled = u_pooled = None
    guidance = torch.full((len(prompts),), 3.5, device=device)
    classifier_path = out_root / "classifier" / cls_mod.FILE
    have_classifier = _wait_for(classifier_path, deadline)
    net = cls_mod.load(classifier_path, device) if have_classifier else None
    labels = torch.tensor([vocab.class_of_prompt(p) for p in prompts], device=device)
    results, pictures = {}, {}
    for cfg in EVAL_CFG:
        generator = torch.Generator(device="cpu").manual_seed(SEED + 7)
        noise = torch.randn((len(prompts), *latent_shape), generator=generator).to(device)
        with torch.no_grad():
            x = sample_euler(model, family, noise, context, pooled, guidance, cfg, steps, (u_context, u_pooled))
            pixels = decode(x)
            entry = {}
            if net is not None:
                frames = pixels if pixels.dim() == 4 else pixels.transpose(1, 2).flatten(0, 1)
                logits = net(frames.float().clamp(0, 1))
                if pixels.dim() == 5:
                    logits = logits.view(pixels.shape[0], pixels.shape[2], -1).mean(1)
                entry["classifier_accuracy"] = round((logits.argmax(-1) == labels).float().mean().item(), 4)
        results[str(cfg)] = entry
        pictures[cfg] = pixels.float().clamp(0, 1).cpu()
    log.set(**{f"{family}_check": {"steps": steps, "samples": len(prompts), "by_cfg": results,
                                   "classifier": have_classifier}})
    return pictures


def _save_grid(pictures, path, columns=8):
    """A PNG of images [N, 3, H, W] or of clips [N, 3, T, H, W] (one row of frames per clip)."""
    import numpy as np
    from PIL import Image

    if pictures.dim() == 5:
        n, _, t, h, w = pictures.shape
        step = max(1, t // columns)
        frames = pictures[:, :, ::step][:, :, :columns]
        grid = frames.permute(0, 3, 2, 4, 1).reshape(n * h, frames.shape[2] * w, 3)
    else:
        n, _, h, w = pictures.shape
        rows = (n + columns - 1) // columns
        pad = rows * columns - n
        if pad:
            import torch

            pictures = torch.cat([pictures, pictures.new_zeros(pad, 3, h, w)])
        grid = pictures.view(rows, columns, 3, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, 3)
    Image.fromarray((grid.numpy() * 255).round().astype(np.uint8)).save(path)


def _train_tae(tae, make_batch, device, seconds, log, name, sizes, lr=1e-3):
    import torch

    from .tae import init_weights_, loss_terms
    from .training import Budget, autocast, learning_rate

    torch.manual_seed(SEED + 10)
    init_weights_(tae)
    tae.to(device)
    optimizer = torch.optim.AdamW(tae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    generator = torch.Generator(device=device).manual_seed(SEED + 11)
    budget = Budget(seconds, steps=sizes.fixed_steps or None)
    phase = log.phase(name, lr=lr, params=sum(p.numel() for p in tae.parameters()))
    running = None
    while not budget.done():
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(lr, budget.step, budget.progress(), warmup=100)
        pixels = make_batch()
        with autocast(device):
            terms = loss_terms(tae, pixels, generator)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(tae.parameters(), 1.0)
        optimizer.step()
        budget.step += 1
        if budget.step % 10 == 0 or budget.step <= 3:  # .item() waits for the GPU: not every step
            values = {k: v.item() for k, v in terms.items()}
            running = values if running is None else {k: 0.8 * running[k] + 0.2 * values[k] for k in values}
        if budget.step % 200 == 0 or budget.step <= 3:
            log.point(name, budget.step, budget.elapsed(), **running)
    phase.update(steps=budget.step, seconds=round(budget.elapsed(), 1), final=running)
    log.write()
    return tae.eval()


# --- jobs ----------------------------------------------------------------------------------------
def _log_bank(log, phase, bank, seconds, tae_psnr, **counts):
    """Log a latent bank's size, build time, its autoencoder's PSNR and the latents' statistics."""
    z = bank.float()
    log.phase(phase, **counts, seconds=round(seconds, 1), tae_psnr=round(tae_psnr, 2),
              latent_mean=round(z.mean().item(), 4), latent_std=round(z.std().item(), 4),
              latent_abs_max=round(z.abs().max().item(), 3))


def _train_and_save_dit(family, phases, budget, bank, ids_bank, device, sizes, log, args, out_root):
    """Train the toy DiT of ``family`` for its share of the budget (less whatever the earlier phases
    overran, keeping the later phases' share) and save it where ComfyUI's loader finds it."""
    from . import networks

    remaining = args.deadline - time.time()
    dit_seconds = min(budget * phases["dit"], remaining - budget * (1 - sum(phases.values())))
    model = _train_dit(family, bank, ids_bank, device, sizes, dit_seconds, log, args)
    folder = out_root / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    config = {"flux": networks.FLUX_UNET_CONFIG, "wan": networks.WAN_UNET_CONFIG}[family]
    networks.save_checkpoint(model, folder / networks.CHECKPOINT_NAMES[family],
                             {"chipmunk_toy": family, "config": json.dumps(config)})
    return model


def job_image(args, sizes: Sizes, out_root: Path, log) -> None:
    import torch

    from . import networks, scenes, vocab
    from .tae import ImageTAE

    device = _setup(args)
    start, budget = time.time(), args.deadline - time.time()
    sprites, _ = _sprites(args, device)
    cpu = torch.Generator().manual_seed(SEED)
    size = sizes.image_size

    def tae_batch():
        placement, _ = scenes.random_images(sizes.tae_batch, cpu)
        return _random_crop(scenes.render(sprites, placement, size), sizes.tae_crop, cpu).contiguous(
            memory_format=torch.channels_last)

    phases = RESUME_PHASES if args.resume else IMAGE_PHASES
    if args.resume:
        tae = ImageTAE().load(Path(args.resume) / "vae_approx").to(device).eval()
    else:
        tae = _train_tae(ImageTAE(), tae_batch, device, budget * phases["tae"], log, "taef1", sizes)
    folder = out_root / "vae_approx"
    folder.mkdir(parents=True, exist_ok=True)
    tae.save(folder)

    t0 = time.time()
    bank = torch.empty((sizes.bank_images, 16, size // 8, size // 8), dtype=torch.bfloat16, device=device)
    placement, words = scenes.random_images(sizes.bank_images, torch.Generator().manual_seed(SEED + 1))
    ids_bank = scenes.words_to_ids(words).to(device)
    psnr = []
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, sizes.bank_images, sizes.chunk):
            part = scenes.Placement(**{k: v[i:i + sizes.chunk] for k, v in vars(placement).items()})
            pixels = scenes.render(sprites, part, size)
            bank[i:i + sizes.chunk] = tae.encode(pixels).to(torch.bfloat16)
            if i == 0:
                psnr.append(_psnr(tae.decode(bank[i:i + sizes.chunk].float()), pixels))
    _log_bank(log, "flux_bank", bank, time.time() - t0, psnr[0], images=sizes.bank_images)
    model = _train_and_save_dit("flux", phases, budget, bank, ids_bank, device, sizes, log, args, out_root)

    generator = torch.Generator().manual_seed(SEED + 5)
    n = sizes.eval_images
    _, words = scenes.random_images(n, generator)
    classes = torch.arange(n) % len(vocab.CLASSES)
    prompts = [vocab.image_prompt(int(c), w[0], w[2], w[3], w[4], w[5]) for w, c in zip(words, classes)]
    with torch.no_grad():
        pictures = _check_samples("flux", model, lambda x: tae.decode(x), device, log, out_root, prompts,
                                  (16, size // 8, size // 8), sizes.eval_steps_flux, args.deadline)
    _save_grid(pictures[3.5][:16], out_root / "previews" / "preview_flux.png")
    log.set(image_job_seconds=round(time.time() - start, 1), preview_prompts=prompts[:16])


def job_video(args, sizes: Sizes, out_root: Path, log) -> None:
    import torch

    from . import networks, scenes, vocab
    from .tae import VideoTAE

    device = _setup(args)
    start, budget = time.time(), args.deadline - time.time()
    sprites, _ = _sprites(args, device)
    cpu = torch.Generator().manual_seed(SEED + 20)
    size, frames = sizes.video_size, sizes.video_frames

    def tae_batch():
        placement, _ = scenes.random_clips(sizes.vtae_batch, sizes.vtae_frames, cpu)
        clips = scenes.render_clips(sprites, placement, sizes.vtae_frames, size)
        return _random_crop(clips, sizes.vtae_crop, cpu).contiguous()

    phases = RESUME_PHASES if args.resume else VIDEO_PHASES
    if args.resume:
        tae = VideoTAE().load(Path(args.resume) / "vae_approx").to(device).eval()
    else:
        tae = _train_tae(VideoTAE(), tae_batch, device, budget * phases["tae"], log, "lighttaew2_1", sizes)
    folder = out_root / "vae_approx"
    folder.mkdir(parents=True, exist_ok=True)
    tae.save(folder)

    t0 = time.time()
    latent_frames = (frames + 3) // 4
    bank = torch.empty((sizes.bank_clips, 16, latent_frames, size // 8, size // 8), dtype=torch.bfloat16,
                       device=device)
    placement, words = scenes.random_clips(sizes.bank_clips, frames, torch.Generator().manual_seed(SEED + 21))
    ids_bank = scenes.words_to_ids(words).to(device)
    chunk = max(1, sizes.chunk // 16)
    psnr = []
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, sizes.bank_clips, chunk):
            part = scenes.Placement(**{k: v[i * frames:(i + chunk) * frames] for k, v in vars(placement).items()})
            clips = scenes.render_clips(sprites, part, frames, size)
            latents = tae.encode(clips)
            bank[i:i + chunk] = tae.to_model_space(latents.float()).to(torch.bfloat16)
            if i == 0:
                psnr.append(_psnr(tae.decode(latents), clips))
    _log_bank(log, "wan_bank", bank, time.time() - t0, psnr[0], clips=sizes.bank_clips)
    model = _train_and_save_dit("wan", phases, budget, bank, ids_bank, device, sizes, log, args, out_root)

    generator = torch.Generator().manual_seed(SEED + 25)
    n = sizes.eval_clips
    _, words = scenes.random_clips(n, 2, generator)
    motions = {m.split()[1]: m for m in vocab.MOTIONS}
    prompts = [vocab.video_prompt(i % len(vocab.CLASSES), w[0], motions[w[3]], w[4], w[5])
               for i, w in enumerate(words)]
    with torch.no_grad():
        pictures = _check_samples("wan", model, lambda x: tae.decode(tae.from_model_space(x)), device, log,
                                  out_root, prompts, (16, latent_frames, size // 8, size // 8),
                                  sizes.eval_steps_wan, args.deadline)
    _save_grid(pictures[3.5][:6], out_root / "previews" / "preview_wan.png", columns=9)
    log.set(video_job_seconds=round(time.time() - start, 1), preview_prompts=prompts[:6])


def _publish_classifier(out_root: Path, write) -> None:
    """``write(folder, name)`` writes the classifier file under a temporary name; renamed, it
    appears whole (the other jobs poll for it)."""
    from . import classifier as cls_mod

    folder = out_root / "classifier"
    folder.mkdir(parents=True, exist_ok=True)
    partial = cls_mod.FILE + ".partial"
    write(folder, partial)
    (folder / partial).rename(folder / cls_mod.FILE)


def job_classifier(args, sizes: Sizes, out_root: Path, log) -> None:
    import torch
    import torch.nn.functional as F

    from . import classifier as cls_mod
    from . import scenes
    from .training import Budget, autocast, learning_rate

    device = _setup(args)
    if args.resume:  # kept as it is
        kept = (Path(args.resume) / "classifier" / cls_mod.FILE).read_bytes()
        _publish_classifier(out_root, lambda folder, name: (folder / name).write_bytes(kept))
        log.set(classifier_kept_from=str(args.resume))
        return
    sprites, _ = _sprites(args, device)
    torch.manual_seed(SEED + 30)
    net = cls_mod.Classifier().to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.05)
    cpu = torch.Generator().manual_seed(SEED + 31)
    seconds = min(args.classifier_seconds, args.deadline - time.time() - 10)
    budget = Budget(seconds, steps=sizes.fixed_steps or None)
    phase = log.phase("classifier", batch=sizes.classifier_batch, params=sum(p.numel() for p in net.parameters()))

    def batch(generator, n):
        half = n // 2
        images, _ = scenes.random_images(n - half, generator)
        clips, _ = scenes.random_clips(max(1, half // 4), 4, generator)
        a = F.interpolate(scenes.render(sprites, images, sizes.image_size), size=cls_mod.INPUT_SIZE, mode="bilinear",
                          antialias=True, align_corners=False)
        b = F.interpolate(scenes.render(sprites, clips, sizes.video_size), size=cls_mod.INPUT_SIZE, mode="bilinear",
                          antialias=True, align_corners=False)
        return torch.cat([a, b]), torch.cat([images.cls, clips.cls]).to(device)

    running = None
    while not budget.done():
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(2e-3, budget.step, budget.progress(), warmup=100, floor=0.02)
        pixels, labels = batch(cpu, sizes.classifier_batch)
        with autocast(device):
            logits = net(cls_mod.augment(pixels, cpu))
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        budget.step += 1
        if budget.step % 10 == 0 or budget.step <= 3:  # .item() waits for the GPU: not every step
            running = loss.item() if running is None else 0.8 * running + 0.2 * loss.item()
        if budget.step % 200 == 0 or budget.step <= 3:
            log.point("classifier", budget.step, budget.elapsed(), loss=running)
    net.eval()
    held_out = torch.Generator().manual_seed(SEED + 32)
    correct = total = 0
    with torch.no_grad():
        for _ in range(4):
            pixels, labels = batch(held_out, sizes.classifier_batch)
            correct += (net(pixels).argmax(-1) == labels).sum().item()
            total += labels.numel()
    phase.update(steps=budget.step, seconds=round(budget.elapsed(), 1), final_loss=running,
                 held_out_accuracy=round(correct / total, 4))
    log.write()
    _publish_classifier(out_root, lambda folder, name: cls_mod.save(net, folder, name))


# --- the driver ----------------------------------------------------------------------------------
def run_job(args) -> int:
    from .training import Log

    sizes = PRESETS[args.preset]
    out_root = Path(args.work)
    (out_root / "logs").mkdir(parents=True, exist_ok=True)
    (out_root / "previews").mkdir(parents=True, exist_ok=True)
    log = Log(out_root / "logs" / f"{args.job}.json")
    log.set(job=args.job, device=args.device, sizes=asdict(sizes), seed=SEED)
    try:
        import torch

        log.set(torch=torch.__version__, gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
        {"image": job_image, "video": job_video, "classifier": job_classifier}[args.job](args, sizes, out_root, log)
    except BaseException as error:
        import traceback

        log.set(error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-4000:])
        raise
    return 0


def write_model_parts(work: Path, folders, out: Path) -> list[Path]:
    """The ``*.safetensors`` of ``work``'s ``folders`` as one tar archive (paths ``folder/name``),
    written into ``out`` as ``models.tar.NN`` parts under 15 MiB (what a device call can bring back);
    ``lab.install`` joins them again."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for folder in folders:
            for path in sorted((work / folder).glob("*.safetensors")) if (work / folder).is_dir() else []:
                archive.add(path, arcname=f"{folder}/{path.name}")
    payload, written = buffer.getvalue(), []
    for index, start in enumerate(range(0, len(payload), PART_BYTES)):
        part = out / f"models.tar.{index:02d}"
        part.write_bytes(payload[start:start + PART_BYTES])
        written.append(part)
    return written


def pack_results(work: Path, out: Path) -> list[Path]:
    """The models tree as tar parts under 15 MiB, the merged log and the previews, into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = write_model_parts(work, ("diffusion_models", "vae_approx", "classifier"), out)
    logs = {p.stem: json.loads(p.read_text()) for p in sorted((work / "logs").glob("*.json"))}
    (out / "train_log.json").write_text(json.dumps(logs, indent=1))
    written.append(out / "train_log.json")
    for preview in sorted((work / "previews").glob("*.png")):
        target = out / preview.name
        target.write_bytes(preview.read_bytes())
        written.append(target)
    return written


def drive(args) -> int:
    """Start one process per job, wait for all (killing any past the budget), pack the results."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    devices = args.gpus.split(",") if args.gpus else []
    deadline = time.time() + args.budget
    from .comfy_env import resolve

    comfyui = str(resolve(args.comfyui))  # unpacked once, before the jobs start
    processes = {}
    for i, job in enumerate(JOBS):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]
        command = [sys.executable, "-m", "lab.train", "--job", job, "--device", "cuda" if devices else "cpu",
                   "--comfyui", comfyui, "--data", args.data, "--work", str(work),
                   "--deadline", str(deadline), "--classifier-seconds", str(args.classifier_seconds),
                   "--dit-lr", str(args.dit_lr)]
        if args.dit_steps:
            command += ["--dit-steps", str(args.dit_steps)]
        if args.resume:
            command += ["--resume", str(Path(args.resume).resolve())]
        command += ["--preset", args.preset]
        stream = open(work / "logs" / f"{job}.out", "w")
        processes[job] = (subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT,
                                           cwd=Path(__file__).resolve().parents[1]), stream)
    codes = {}
    for job, (process, stream) in processes.items():
        try:
            codes[job] = process.wait(timeout=max(1.0, deadline + 30 - time.time()))
        except subprocess.TimeoutExpired:
            process.kill()
            codes[job] = "killed after the budget"
        stream.close()
    for job in JOBS:
        text = (work / "logs" / f"{job}.out").read_text(errors="replace")
        print(f"--- {job}: exit {codes[job]} ---\n{text[-1500:]}")
    written = pack_results(work, Path(args.out))
    merged = json.loads((Path(args.out) / "train_log.json").read_text())
    merged["exit_codes"] = codes
    earlier = Path(args.resume) / "train_log.json" if args.resume else None
    if earlier is not None and earlier.is_file():
        merged["earlier_run"] = json.loads(earlier.read_text())
    (Path(args.out) / "train_log.json").write_text(json.dumps(merged, indent=1))
    print("wrote", ", ".join(f"{p.name} ({p.stat().st_size} B)" for p in written))
    return 0 if all(c == 0 for c in codes.values()) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", required=True, help="ComfyUI tree or source archive (.tar.gz)")
    parser.add_argument("--data", required=True, help="the sprites file from python -m lab.data")
    parser.add_argument("--out", help="where the packed results go (driver)")
    parser.add_argument("--gpus", default="", help="GPU ids for the image, video and classifier jobs, e.g. 0,1,2 "
                                                   "(empty: all on the CPU)")
    parser.add_argument("--budget", type=float, default=480.0, help="wall seconds for all jobs (driver)")
    parser.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "chipmunk-lab-train"))
    parser.add_argument("--classifier-seconds", type=float, default=150.0)
    parser.add_argument("--dit-lr", type=float, default=6e-4)
    parser.add_argument("--dit-steps", type=int, default=0, help="fixed transformer steps (default: by time)")
    parser.add_argument("--resume", help="a models tree (lab/models) to continue from: the autoencoders and the "
                                         "classifier are kept, both transformers train on from its weights")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="full",
                        help="full (the GPU run), tiny (toy sizes, 2 steps per phase: the CPU smoke test) or "
                             "check (full sizes, 1 step per phase, tiny banks: a CPU shape check)")
    parser.add_argument("--job", choices=JOBS, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job:
        return run_job(args)
    if not args.out:
        parser.error("--out is required")
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
