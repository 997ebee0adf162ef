"""End-to-end timing inside ComfyUI: stock sampling against Chipmunk Accelerate, same model and seed.

Models are built from ComfyUI's own classes at their real widths (random weights, so the deviation
column says nothing of image quality), sampled with ComfyUI's real sampler (``comfy.sample.sample``)
on the GPU, and patched through the pack's own ``accelerate`` (what the node calls). Prints a table
and writes JSON (device, torch, triton and ComfyUI versions, resolution, steps, settings, seconds,
speed-up, GPU busy share, deviation from stock).

    python bench/e2e_comfy.py --comfyui PATH --case flux --sizes 1024x1024,1280x768 [--out f.json]
    python bench/e2e_comfy.py --comfyui PATH --case wan13b --sizes 832x480x81
    python bench/e2e_comfy.py --smoke --device cpu --comfyui PATH --case flux   # checks the script

"GPU busy" = kernel time in the torch profiler / wall time of a profiled run: well under ~90% means
the host (Python, launches) is the bottleneck. ``--kernels N`` also prints (and keeps in the JSON)
the N kernels that took the most GPU time in that run, a breakdown of where a step's time goes.

``--dynamic-vram`` sets ComfyUI up as ``python main.py`` does on NVIDIA when comfy-aimdo is
installed (v0.19.3's default) and loads the model as ComfyUI's UNETLoader does: from a state dict
on the CPU, through ``comfy.sd.load_diffusion_model_state_dict``, into the dynamic model patcher.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLUX_DEV = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
HUNYUAN = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=768, patch_size=[1, 2, 2],
               axes_dim=[16, 56, 56], meanflow=False, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
               num_heads=24, depth=20, depth_single_blocks=40, theta=256, qkv_bias=True, byt5=False,
               guidance_embed=True)
WAN13B = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=1536, ffn_dim=8960,
              freq_dim=256, text_dim=4096, out_dim=16, num_heads=12, num_layers=30, eps=1e-6)
WAN14B = dict(WAN13B, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

# name: (supported_models class, unet config, conditioning (tokens, width, pooled, valid tokens), video?)
CASES = {
    "flux": ("Flux", FLUX_DEV, (512, 4096, 768, None), False),
    "hunyuan": ("HunyuanVideo", HUNYUAN, (256, 4096, 768, 200), True),
    "wan13b": ("WAN21_T2V", WAN13B, (512, 4096, None, None), True),
    "wan14b": ("WAN21_T2V", WAN14B, (512, 4096, None, None), True),
}
VARIANTS = {
    "stock": None,
    "chipmunk": {},
    "chipmunk+cache": {"step_cache": "fixed"},
    "attention only": {"mlp_sparsity": 0.0},
    "keep lists": {"attention_selection": "warmup_steps"},
    "keep lists+cache": {"attention_selection": "warmup_steps", "step_cache": "fixed"},
    "select every dense step": {"attention_selection": "every_dense_step"},
    "select every dense step+cache": {"attention_selection": "every_dense_step", "step_cache": "fixed"},
    "sparsity 0": {"attention_sparsity": 0.0, "mlp_sparsity": 0.0},
    # Attention delta caches and MLP hidden caches in fp8 with float32 scales (the node's cache_precision "fp8").
    "chipmunk fp8": {"fp8_caches": True},
    "chipmunk+cache fp8": {"fp8_caches": True, "step_cache": "fixed"},
    # CUDA graphs of the sparse steps off (FLUX has them on by default): the eager path.
    "chipmunk eager": {"cuda_graphs": False},
    "chipmunk+cache eager": {"step_cache": "fixed", "cuda_graphs": False},
    # FLUX below its min_sparse_tokens rule (which otherwise runs such sizes stock).
    "chipmunk any size": {"min_sparse_tokens": 0},
    "chipmunk any size eager": {"min_sparse_tokens": 0, "cuda_graphs": False},
    "chipmunk+cache any size": {"min_sparse_tokens": 0, "step_cache": "fixed"},
    # Stock with the conditioning kept on the GPU as Chipmunk runs keep it (hooks.conditioning_on_device):
    # how much of Chipmunk's gain is that host-side fix alone.
    "stock resident": {"_stock": True, "_resident": True},
    # The single and double blocks' per-token work through ComfyUI's own operations instead of the
    # one-pass kernels (as when their self-checks fail).
    "chipmunk unfused": {"_unfused": True},
    "chipmunk+cache unfused": {"step_cache": "fixed", "_unfused": True},
    # The sparse MLP with the kernel configuration in CHIPMUNK_BENCH_MLP (JSON {"up": {...}, "down": {...}}
    # over the defaults, short and long rows alike).
    # Core EasyCache at its defaults, alone (stock model) and after Chipmunk Accelerate.
    "easycache": {"_stock": True, "_easycache": True},
    "chipmunk+easycache": {"_easycache": True},
    "chipmunk mlp": {"_mlp": True},
    "chipmunk+cache mlp": {"step_cache": "fixed", "_mlp": True},
}


def import_pack():
    """The pack's modules as a package named chipmunk_pack (no ComfyUI node registry needed)."""
    for name, path in (("chipmunk_pack", ROOT), ("chipmunk_pack.nodes", ROOT / "nodes")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules.setdefault(name, module)
    from chipmunk_pack.nodes import hooks
    return hooks


def complete_config(unet: dict) -> dict:
    """Fields newer ComfyUI requires that this (older) description lacks, at their neutral values."""
    import comfy.ldm.flux.model
    import comfy.ldm.hunyuan_video.model
    params = {"flux": comfy.ldm.flux.model.FluxParams,
              "hunyuan_video": getattr(comfy.ldm.hunyuan_video.model, "HunyuanVideoParams", None)}
    neutral = {"txt_ids_dims": [], "use_cond_type_embedding": False, "vision_in_dim": None, "meanflow_sum": False}
    cls = params.get(unet.get("image_model"))
    if cls is None or not dataclasses.is_dataclass(cls):
        return dict(unet)
    fields = {f.name for f in dataclasses.fields(cls)}
    return {**unet, **{k: v for k, v in neutral.items() if k in fields and k not in unet}}


def build(name: str, device, dtype, smoke: bool, **overrides):
    """``name``'s model at its real size with random weights (``overrides``: fields of its config,
    e.g. fewer blocks)."""
    import torch
    import comfy.model_patcher
    import comfy.supported_models
    cls_name, unet, _, _ = CASES[name]
    unet = complete_config(unet)
    if smoke:  # narrow and shallow: checks the script, not the speed
        small = dict(depth=1, depth_single_blocks=2, num_layers=3, hidden_size=256, num_heads=2, dim=256,
                     ffn_dim=1024, context_in_dim=64, text_dim=64)
        unet.update({k: v for k, v in small.items() if k in unet})
    unet.update(overrides)
    config = getattr(comfy.supported_models, cls_name)(unet)
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, p in model.diffusion_model.named_parameters():
            if pname.endswith("scale") or ("norm" in pname and pname.endswith("weight")):
                p.fill_(1)
            elif pname.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator, device=device).mul_(0.02).to(p.dtype))
    return comfy.model_patcher.ModelPatcher(model, torch.device(device), torch.device("cpu"))


def enable_dynamic_vram(device) -> bool:
    """ComfyUI's dynamic VRAM, switched on the way main.py does it (False: comfy-aimdo missing)."""
    import comfy.memory_management
    import comfy.model_patcher
    import torch
    try:
        import comfy_aimdo.control
    except ImportError:
        return False
    if not comfy_aimdo.control.init_device(torch.device(device).index or 0):
        return False
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return True


def load_like_unet_loader(patcher, weight_dtype="default"):
    """The same weights loaded as UNETLoader loads a checkpoint (state dict on the CPU), with its
    ``weight_dtype`` choice. Pass the built model straight in: its GPU copy is freed before the load."""
    import comfy.sd
    import torch
    state = {k: v.to("cpu") for k, v in patcher.model.diffusion_model.state_dict().items()}
    del patcher
    torch.cuda.empty_cache()
    options = {"fp8_e4m3fn": {"dtype": torch.float8_e4m3fn},
               "fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True},
               "fp8_e5m2": {"dtype": torch.float8_e5m2}}.get(weight_dtype, {})
    return comfy.sd.load_diffusion_model_state_dict(state, model_options=options)


def occupy_all_but(gib: float):
    """A filler tensor that leaves only ``gib`` GiB of the device free (a smaller card), or None."""
    import torch
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    extra = int(free - gib * 2**30)
    return torch.empty(extra, dtype=torch.uint8, device="cuda") if extra > 0 else None


def conditioning(name: str, seed: int, smoke: bool, text_tokens: int = 0):
    """Random text conditioning of the case's shape (``text_tokens``: its length instead of the case's)."""
    import torch
    tokens, width, pooled, valid = CASES[name][2]
    tokens = text_tokens or tokens
    if smoke:
        tokens, width, valid = 32, 64, None if valid is None else 24
    generator = torch.Generator().manual_seed(seed)
    extra = {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=generator), "guidance": 3.5}
    if valid is not None:  # text padding, masked as a text encoder's attention mask does
        mask = torch.zeros(1, tokens, dtype=torch.long)
        mask[:, :valid] = 1
        extra["attention_mask"] = mask
    return [[torch.randn(1, tokens, width, generator=generator), extra]]


def latent_shape(name: str, size: str, batch: int, smoke: bool) -> tuple:
    numbers = [int(n) for n in size.split("x")]
    width, height = numbers[:2]
    if smoke:
        width, height = 128, 96
    if CASES[name][3]:
        frames = numbers[2] if len(numbers) > 2 else 81
        frames = 5 if smoke else frames
        return (batch, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    return (batch, 16, height // 8, width // 8)


def gpu_busy(run, top: int = 0):
    """Kernel time / wall time of one profiled run, and the ``top`` kernels by GPU time as
    (name, milliseconds, launches); (None, []) on the CPU."""
    import collections
    import torch
    if not torch.cuda.is_available():
        return None, []
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        wall, _ = run()
    kernels = [e for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_name, launches = collections.Counter(), collections.Counter()
    for e in kernels:
        name = e.name[:90]
        per_name[name] += e.device_time_total
        launches[name] += 1
    ranked = [(name, round(us / 1e3, 2), launches[name]) for name, us in per_name.most_common(top)]
    return sum(e.device_time_total for e in kernels) / 1e6 / wall, ranked


def step_milliseconds(events):
    """Per step: (milliseconds between this step's and the previous step's callback on the GPU's
    timeline, the same on the host). The first step counts from a mark at the run's start where
    there is one (a run timed on its first steps), else it is left out."""
    if len(events) < 2:
        return []
    if events[-1][2] is None:  # no GPU (a smoke check of the script): host times for both
        return [(round((b[1] - a[1]) * 1e3, 2),) * 2 for a, b in zip(events, events[1:])]
    events[-1][2].synchronize()
    return [(round(a[2].elapsed_time(b[2]), 2), round((b[1] - a[1]) * 1e3, 2))
            for a, b in zip(events, events[1:])]


class EnoughSteps(Exception):
    """Raised from the sampler's callback to end a run timed on its first steps only."""


def step_kinds(config, steps: int) -> list[str]:
    """What each step of a ``steps``-step run does: stock (no Chipmunk), dense (choosing the key
    lists or keeping them), sparse or skipped, from the pack's own schedules (fixed step cache only:
    adaptive skips are decided per run)."""
    if config is None:
        return ["stock"] * steps
    schedule = importlib.import_module("chipmunk_pack.chipmunk_core.schedule")
    step_cache = importlib.import_module("chipmunk_pack.chipmunk_core.step_cache")
    if config.step_cache == "adaptive":
        raise SystemExit("--timed-steps: the adaptive step cache decides its skips during the run")
    attention = importlib.import_module("chipmunk_pack.chipmunk_core.attention")
    dense = schedule.DenseSchedule(config, steps)
    skips = step_cache.StepCacheSchedule(config, steps, dense)
    selecting = config.sparse_attention

    def kind(step):
        if dense.is_dense(step):  # a dense step that chooses the key lists costs more than one that keeps them
            return "dense, choosing lists" if selecting and attention.selects_keys(config, step) else "dense"
        return "skipped" if skips.decide(step, lambda: False) else "sparse"
    return [kind(s) for s in range(steps)]


def estimate_run(per_step, kinds: list[str]) -> dict:
    """A whole run's seconds from its first steps: the first step as timed (it carries the run's
    set-up), every later step at the median time of the timed steps of its kind."""
    import statistics
    times = [gpu for gpu, _ in per_step]
    if not times:
        raise SystemExit("--timed-steps: no step was timed")
    by_kind = {}
    for kind, ms in zip(kinds[1:], times[1:]):
        by_kind.setdefault(kind, []).append(ms)
    per_kind = {kind: round(statistics.median(values), 1) for kind, values in by_kind.items()}
    # A kind no timed step had: a dense step keeping its lists is costed as one choosing them (an
    # overestimate, named in the result); anything else cannot be estimated.
    stand_ins = {}
    for kind in sorted(set(kinds[1:]) - set(per_kind)):
        if kind == "dense" and "dense, choosing lists" in per_kind:
            stand_ins[kind] = "dense, choosing lists"
        else:
            raise SystemExit(f"--timed-steps: no timed step of kind {kind!r}; time more steps")
    cost = {**per_kind, **{kind: per_kind[like] for kind, like in stand_ins.items()}}
    total_ms = times[0] + sum(cost[kind] for kind in kinds[1:])
    counts = {kind: kinds.count(kind) for kind in dict.fromkeys(kinds)}
    return dict(seconds=total_ms / 1e3, timed_steps=len(times), first_step_ms=times[0], per_kind_ms=per_kind,
                stand_ins=stand_ins, step_counts=counts, kinds=kinds)


def with_resident_conditioning(model, hooks):
    """A clone of the stock model whose runs keep the conditioning on the device (the probe
    variant "stock resident")."""
    import comfy.patcher_extension
    clone = model.clone()

    def wrapper(executor, *args, **kwargs):
        hooks.conditioning_on_device(args[0].conds, args[4].device)
        return executor(*args, **kwargs)

    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, "bench", wrapper)
    return clone


class _StandIn(types.ModuleType):
    """A module whose every public attribute is an empty class."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def with_easycache(model):
    """The model through core's EasyCache node at its defaults (as a workflow would put it after
    Chipmunk Accelerate). ComfyUI's node API imports PyAV for its video types, which the device
    machines lack: stand-ins then take its place (EasyCache touches no video)."""
    try:
        import av  # noqa: F401
    except ImportError:
        for name in ("av", "av.container", "av.subtitles", "av.subtitles.stream"):
            sys.modules.setdefault(name, _StandIn(name))
    from comfy_extras.nodes_easycache import EasyCacheNode
    return EasyCacheNode.execute(model, reuse_threshold=0.2, start_percent=0.15, end_percent=0.95,
                                 verbose=False).result[0]


def versions(torch) -> dict:
    import comfyui_version
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    try:
        import importlib.metadata
        kitchen = importlib.metadata.version("comfy-kitchen")
    except Exception:
        kitchen = None
    return dict(date=datetime.date.today().isoformat(), device=device, torch=torch.__version__,
                triton=triton_version, comfyui=comfyui_version.__version__, comfy_kitchen=kitchen)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--sizes", default="1024x1024", help="comma list: WxH (images) or WxHxFRAMES (video)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=0,
                        help="text conditioning length instead of the case's (FLUX: 512, the T5 length of diffusers and "
                             "of prompts past 256 tokens; ComfyUI pads FLUX's T5 to 256, so a short prompt gives 256)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=1.0)
    parser.add_argument("--sampler", default="euler", help="ComfyUI sampler name (WAN's template: uni_pc)")
    parser.add_argument("--variants", default="stock,chipmunk,chipmunk+cache", help=", ".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per variant (the fastest is kept)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps of the untimed warm-up run per size")
    parser.add_argument("--busy", action="store_true", help="also profile one run per variant for the GPU busy share")
    parser.add_argument("--kernels", type=int, default=0, help="with --busy: list the N kernels with the most GPU time")
    parser.add_argument("--step-times", action="store_true",
                        help="also time each sampling step on the GPU's timeline (events at the sampler's callback)")
    parser.add_argument("--timed-steps", type=int, default=0,
                        help="time only the first K steps of each --steps run, each on the GPU's timeline, and "
                             "estimate the whole run from the schedule's kinds of step (dense, sparse, skipped): "
                             "for runs longer than one device command")
    parser.add_argument("--dynamic-vram", action="store_true",
                        help="ComfyUI's dynamic VRAM as main.py enables it, model loaded as UNETLoader does")
    parser.add_argument("--weight-dtype", default="default",
                        choices=("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"),
                        help="with --dynamic-vram: Load Diffusion Model's weight_dtype")
    parser.add_argument("--free-gib", default="all",
                        help="comma list of device memory budgets: after the model is loaded, the card is occupied "
                             "so that only this many GiB stay free (all: nothing occupied)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--blocks", default=None,
                        help="fewer blocks than the real model: FLUX/HunyuanVideo 'DOUBLE,SINGLE', WAN 'LAYERS'")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script itself")
    parser.add_argument("--out", default=None)
    ns = parser.parse_args()

    sys.path.insert(0, ns.comfyui)
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = ns.device == "cpu"
    if ns.dynamic_vram:  # before torch starts CUDA, as in main.py
        try:
            import comfy_aimdo.control
            comfy_aimdo.control.init()
        except ImportError:
            pass
    import torch
    import comfy.model_management  # noqa: F401
    import comfy.sample
    hooks = import_pack()

    dtype = torch.bfloat16 if ns.device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if ns.device == "cuda" else (lambda: None)
    dynamic = ns.dynamic_vram and enable_dynamic_vram(ns.device)
    if ns.dynamic_vram and not dynamic:
        sys.exit("--dynamic-vram: comfy-aimdo is not installed or found no device")
    blocks = {}
    if ns.blocks:
        counts = [int(n) for n in ns.blocks.split(",")]
        blocks = dict(num_layers=counts[0]) if ns.case.startswith("wan") else \
            dict(depth=counts[0], depth_single_blocks=counts[1] if len(counts) > 1 else 0)
    if dynamic:
        stock = load_like_unet_loader(build(ns.case, ns.device, dtype, ns.smoke, **blocks), ns.weight_dtype)
        print(f"model patcher: {type(stock).__name__}", flush=True)
    else:
        stock = build(ns.case, ns.device, dtype, ns.smoke, **blocks)
    pos, neg = (conditioning(ns.case, seed, ns.smoke, ns.text_tokens) for seed in (5, 6))
    rows = []
    mlp_triton = importlib.import_module("chipmunk_pack.kernels.mlp_triton")
    mlp_tables = (mlp_triton.MLP_CONFIGS["big"], mlp_triton.MLP_LONG_CONFIGS["hopper"])  # what "chipmunk mlp" overrides
    mlp_defaults = [{part: dict(values) for part, values in table.items()} for table in mlp_tables]
    mlp_override = json.loads(os.environ.get("CHIPMUNK_BENCH_MLP", "{}"))
    budgets = [None if b == "all" else float(b) for b in ns.free_gib.split(",")]
    first_outputs = {}  # (size, variant) -> output at the first budget: is it the same at the others?
    for size, budget in ((size, budget) for size in ns.sizes.split(",") for budget in budgets):
        filler = None
        shape = latent_shape(ns.case, size, ns.batch, ns.smoke)
        latent = torch.zeros(shape)
        noise = comfy.sample.prepare_noise(latent, 1)
        reference = stock_seconds = None
        outputs = {}
        replacements = importlib.import_module("chipmunk_pack.chipmunk_core.adapters.replacements")
        fused_problem, double_check = replacements.fused_problem, replacements.double_block_check
        for label in ns.variants.split(","):
            settings = VARIANTS[label]
            probes = {k: v for k, v in (settings or {}).items() if k.startswith("_")}
            settings = None if settings is None or probes.get("_stock") else \
                {k: v for k, v in settings.items() if not k.startswith("_")}
            model = stock if settings is None else hooks.accelerate(stock, **settings)
            unfused = probes.get("_unfused")
            replacements.fused_problem = (lambda block: "off in this variant") if unfused else fused_problem
            replacements.double_block_check = (lambda *a: "off in this variant") if unfused else double_check
            for table, defaults in zip(mlp_tables, mlp_defaults):
                for part in ("up", "down"):
                    table[part] = dict(defaults[part])
                    if probes.get("_mlp"):
                        table[part].update(mlp_override.get(part, {}))
            if probes.get("_mlp"):  # a kernel configuration this process has not compiled: no capture before an eager call
                importlib.import_module("chipmunk_pack.chipmunk_core.graphs").PROCESS_WARM.clear()
            if probes.get("_resident"):
                model = with_resident_conditioning(model, hooks)
            if probes.get("_easycache"):
                model = with_easycache(model)
            step_events = []
            timing = (ns.device == "cuda" and ns.step_times) or ns.timed_steps
            stop_after = [0]  # a run that times only its first steps ends after this many (0: all)

            def mark(step):
                event = torch.cuda.Event(enable_timing=True) if ns.device == "cuda" else None
                step_events.append((step, time.perf_counter(), event))
                if event is not None:
                    event.record()

            def callback(step, x0, x, total):
                if timing:
                    mark(step)
                if stop_after[0] and step + 1 >= stop_after[0]:
                    raise EnoughSteps()

            def run(steps=ns.steps, stop=0):
                sync()
                step_events.clear()
                stop_after[0] = stop
                start = time.perf_counter()
                if timing and stop:
                    mark(-1)  # the first step counts from the start of the run
                out = None
                with torch.inference_mode():  # as ComfyUI's executor runs a prompt
                    try:
                        out = comfy.sample.sample(model, noise, steps, ns.cfg, ns.sampler, "simple", pos, neg, latent,
                                                  seed=1, disable_pbar=True, callback=callback)
                    except EnoughSteps:
                        pass
                sync()
                return time.perf_counter() - start, out

            # Timing the first steps only: stock steps are all alike, so two are enough (the first
            # carries the run's set-up).
            stock_like = settings is None
            timed = min(ns.timed_steps, 2) if stock_like and ns.timed_steps else ns.timed_steps
            warmup = 1 if timed and stock_like else ns.warmup_steps
            run(warmup)  # model load, kernel compilation and autotuning
            if budget is not None and filler is None and ns.device == "cuda":
                filler = occupy_all_but(budget)  # the model is loaded: what stays free is the budget
                run(warmup)
            seconds, out = min((run(stop=timed) for _ in range(ns.repeats)), key=lambda r: r[0])
            per_step = step_milliseconds(step_events)
            accelerator = None if settings is None else model.model_options["transformer_options"]["chipmunk"]
            config = None if accelerator is None else accelerator.config
            estimate = estimate_run(per_step, step_kinds(config, ns.steps)) if timed else None
            if estimate is not None:
                seconds = estimate["seconds"]
            busy, top_kernels = gpu_busy(run, ns.kernels) if ns.busy else (None, [])
            if stock_seconds is None:
                stock_seconds = seconds
            compared = out is not None  # a run timed on its first steps only has no output
            if compared and reference is None:
                reference = out
            deviation = float((out.float() - reference.float()).norm() / reference.float().norm()) if compared else None
            first = first_outputs.setdefault((size, label), out) if compared else None
            outputs[label] = out
            graphed = outputs.get(label[:-len(" eager")]) if label.endswith(" eager") else None
            vs_graphed = None if graphed is None or not compared else float(
                (out.float() - graphed.float()).norm() / graphed.float().norm().clamp_min(1e-30))
            rows.append(dict(case=ns.case, size=size, batch=ns.batch, latent=list(shape), steps=ns.steps, cfg=ns.cfg,
                             sampler=ns.sampler, text_tokens=pos[0][0].shape[1],
                             variant=label, settings=None if config is None else config.describe(),
                             seconds=round(seconds, 3), speedup=round(stock_seconds / seconds, 3),
                             gpu_busy=None if busy is None else round(busy, 3), rel_deviation=deviation,
                             rel_deviation_vs_graphed=vs_graphed,
                             finite=bool(torch.isfinite(out).all()) if compared else None, dynamic_vram=dynamic,
                             weight_dtype=ns.weight_dtype, free_gib=budget,
                             same_as_first_budget=bool(torch.equal(out, first)) if compared else None))
            if estimate is not None:
                rows[-1]["estimated_from_steps"] = estimate
                if config is not None and config.step_cache != "off":
                    # the same settings without the step cache, from the dense and sparse steps timed here
                    plain = step_kinds(dataclasses.replace(config, step_cache="off"), ns.steps)
                    rows[-1]["estimated_without_step_cache_seconds"] = estimate_run(per_step, plain)["seconds"]
            if top_kernels:
                rows[-1]["top_kernels"] = top_kernels
            if per_step:
                rows[-1]["step_ms"] = per_step
            extra = "" if busy is None else f"  busy {busy:4.0%}"
            if vs_graphed is not None:
                extra += f"  vs graphed {vs_graphed:.2e}"
            if compared and first is not out:
                extra += "  same as first budget" if torch.equal(out, first) else "  differs from first budget"
            extra += "" if deviation is None else f"  dev {deviation:.2e}"
            if estimate is not None:
                extra += f"  (estimated from {timed} timed steps: {estimate['per_kind_ms']})"
            print(f"{ns.case:8s} {size:12s} {'all' if budget is None else f'{budget:g} GiB':>7s} {label:18s} "
                  f"{seconds:8.2f} s  x{stock_seconds / seconds:5.2f}{extra}", flush=True)
            for name, ms, count in top_kernels:
                print(f"    {ms:9.1f} ms {count:6d}x  {name}", flush=True)
            if per_step:
                print("    step ms (GPU timeline / host): " + " ".join(f"{g:.0f}/{h:.0f}" for g, h in per_step),
                      flush=True)
            if settings is not None:
                rows[-1]["report"] = accelerator.last_report
            del model
        del filler
        if ns.device == "cuda":
            torch.cuda.empty_cache()
    result = dict(versions(torch), command=" ".join(["e2e_comfy.py"] + sys.argv[1:]), rows=rows)
    result["command"] = result["command"].replace(ns.comfyui, "COMFYUI")
    if ns.out:
        Path(ns.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
