"""End-to-end timing inside ComfyUI: stock sampling against Chipmunk Accelerate, same model and seed.

Models are built from ComfyUI's own classes at their real widths (random weights, so the numbers
say nothing of image quality), sampled with ComfyUI's real sampler (``comfy.sample.sample``) on the
GPU. Prints a table and writes JSON (device, versions, shapes, seconds per run, speed-up, relative
deviation from stock).

    python bench/e2e_comfy.py --comfyui PATH [--out results.json] [--cases flux,wan13b]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_pack():
    """The core and the hooks as subpackages of the pack, without ComfyUI's node registry."""
    for name, path in (("chipmunk_pack", ROOT), ("chipmunk_pack.nodes", ROOT / "nodes")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules.setdefault(name, module)
    from chipmunk_pack.chipmunk_core import adapter_for, resolve_config
    from chipmunk_pack.nodes import hooks
    return adapter_for, resolve_config, hooks


CASES = {
    # name: (supported_models class, unet config, latent shape, conditioning (tokens, width, pooled), steps)
    # FLUX.1-dev's width with 4 + 8 of its 19 + 38 blocks, and the whole FLUX.1-dev.
    "flux": ("Flux", dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                          hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=4, depth_single_blocks=8,
                          axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True),
             (1, 16, 128, 128), (512, 4096, 768), 20),
    "flux_full": ("Flux", dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                               hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                               axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True),
                  (1, 16, 128, 128), (512, 4096, 768), 50),
    # HunyuanVideo's width with 2 + 6 of its 20 + 40 blocks, 720x1280, 129 frames (118800 video tokens),
    # 256 text tokens of which 200 are real (the rest is padding, masked).
    "hunyuan720": ("HunyuanVideo", dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=768,
                                        patch_size=[1, 2, 2], axes_dim=[16, 56, 56], meanflow=False, context_in_dim=4096,
                                        hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=2, depth_single_blocks=6,
                                        theta=256, qkv_bias=True, byt5=False, guidance_embed=True),
                   (1, 16, 33, 90, 160), (256, 4096, 768, 200), 10),
    "wan13b": ("WAN21_T2V", dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=1536,
                                 ffn_dim=8960, freq_dim=256, text_dim=4096, out_dim=16, num_heads=12, num_layers=30,
                                 eps=1e-6),
               (1, 16, 21, 60, 104), (512, 4096, None), 20),
}


def build(comfy, name, device, dtype):
    import torch
    cls_name, unet, _, _, _ = CASES[name]
    config = getattr(comfy.supported_models, cls_name)(unet)
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, p in model.diffusion_model.named_parameters():
            if pname.endswith("scale") or (("norm" in pname) and pname.endswith("weight")):
                p.fill_(1)
            elif pname.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02).to(p.dtype))
    return comfy.model_patcher.ModelPatcher(model, torch.device(device), torch.device("cpu"))


def conditioning(name, seed):
    import torch
    tokens, width, pooled, *valid = CASES[name][3]
    g = torch.Generator().manual_seed(seed)
    extra = {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=g), "guidance": 3.5}
    if valid:  # text padding, masked as a text encoder's attention mask does
        mask = torch.zeros(1, tokens, dtype=torch.long)
        mask[:, : valid[0]] = 1
        extra["attention_mask"] = mask
    return [[torch.randn(1, tokens, width, generator=g), extra]]


def print_profile(run, title):
    import torch
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
    print(f"--- {title}: top GPU time", flush=True)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--host-caches", default="hunyuan720",
                        help="cases that also run with the caches forced into host memory")
    parser.add_argument("--steps", type=int, default=None, help="override every case's step count")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per variant (the fastest is kept)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script itself")
    parser.add_argument("--profile", action="store_true", help="print where the Chipmunk runs spend GPU time")
    ns = parser.parse_args()
    sys.path.insert(0, ns.comfyui)
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = ns.device == "cpu"
    import torch
    import comfy.model_management  # noqa: F401
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models
    import triton
    adapter_for, resolve_config, hooks = import_pack()
    from chipmunk_pack.chipmunk_core.memory import place_caches
    comfy_ns = types.SimpleNamespace(supported_models=comfy.supported_models, model_patcher=comfy.model_patcher)

    if ns.smoke:
        CASES["flux"][1].update(depth=1, depth_single_blocks=3)
        CASES["wan13b"][1].update(num_layers=3)
        CASES["flux_full"][1].update(depth=1, depth_single_blocks=3)
        CASES["hunyuan720"][1].update(depth=1, depth_single_blocks=3)
        for name, (cls_name, unet, shape, cond, steps) in list(CASES.items()):
            CASES[name] = (cls_name, unet, shape[:2] + (3,) * (len(shape) - 4) + (16, 24), cond, 6)
    sync = torch.cuda.synchronize if ns.device == "cuda" else (lambda: None)
    rows = []
    for name in ns.cases.split(","):
        _, _, latent_shape, _, steps = CASES[name]
        steps = ns.steps or steps
        stock = build(comfy_ns, name, ns.device, torch.bfloat16 if ns.device == "cuda" else torch.float32)
        adapter = adapter_for(stock.get_model_object("diffusion_model"))
        variants = [("stock", None), ("chipmunk auto", resolve_config(adapter.family))]
        if adapter.family == "flux":
            variants.append(("chipmunk attention only", resolve_config(adapter.family, mlp_sparsity=0.0)))
        if name in ns.host_caches.split(","):
            variants.append(("chipmunk auto, caches in host memory", resolve_config(adapter.family)))
        latent = torch.zeros(latent_shape)
        noise = comfy.sample.prepare_noise(latent, 1)
        pos, neg = conditioning(name, 5), conditioning(name, 6)
        reference = None
        for label, config in variants:
            model = stock
            state_module = sys.modules["chipmunk_pack.chipmunk_core.state"]
            state_module.place_caches = (lambda needed, free, device: torch.device("cpu")) if "host" in label \
                else place_caches
            if config is not None:
                model = stock.clone()
                hooks.install(model, adapter, config)

            def run():
                sync()
                start = time.perf_counter()
                out = comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", pos, neg, latent, seed=1,
                                          disable_pbar=True)
                sync()
                return time.perf_counter() - start, out

            run()  # warm-up: model load, kernel compilation
            seconds, out = min((run() for _ in range(ns.repeats)), key=lambda r: r[0])
            if ns.profile:
                print_profile(run, f"{name} {label}")
            if reference is None:
                reference, stock_seconds = out, seconds
            deviation = float((out.float() - reference.float()).norm() / reference.float().norm())
            rows.append(dict(case=name, variant=label, latent=list(latent_shape), steps=steps, seconds=round(seconds, 3),
                             speedup=round(stock_seconds / seconds, 3), rel_deviation=deviation,
                             finite=bool(torch.isfinite(out).all()),
                             settings=None if config is None else config.describe()))
            print(f"{name:8s} {label:26s} {seconds:8.2f} s  x{stock_seconds / seconds:5.2f}  dev {deviation:.2e}",
                  flush=True)
        del stock, reference
        if ns.device == "cuda":
            torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name() if ns.device == "cuda" else "cpu"
    result = dict(date=datetime.date.today().isoformat(), device=device_name,
                  torch=torch.__version__, triton=triton.__version__, rows=rows)
    if ns.out:
        Path(ns.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
