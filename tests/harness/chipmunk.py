"""The pack's node as tests drive it: its inputs in the form the running ComfyUI expects, and the
run report it writes after every sampling run.

ComfyUI v0.19 and later get dynamic inputs (``preset`` and ``step_cache`` are DynamicCombo values
whose sliders nest under them: a dict in-process, ``"preset.attention_sparsity"`` keys in an API
prompt); older ComfyUI gets flat inputs.
"""
from __future__ import annotations

import re

AUTO = "auto (per model)"
CUSTOM = "custom"
DENSE = dict(attention_sparsity=0.0, mlp_sparsity=0.0, dense_warmup_steps=2, dense_interval=10, first_dense_layers=0)
SLIDERS = ("attention_sparsity", "mlp_sparsity", "dense_warmup_steps", "dense_interval", "first_dense_layers",
           "cache_precision")
CACHE_SETTINGS = ("step_cache_threshold", "step_cache_max_skips")
SLIDER_DEFAULTS = dict(attention_sparsity=0.835, mlp_sparsity=0.70, dense_warmup_steps=2, dense_interval=10,
                       first_dense_layers=2, cache_precision="model")
CACHE_DEFAULTS = dict(step_cache_threshold=0.1, step_cache_max_skips=2)


def is_dynamic(node_cls) -> bool:
    """Whether the node declares dynamic inputs (ComfyUI v0.19+)."""
    spec = node_cls.INPUT_TYPES()["required"]["preset"]
    return spec[0] == "COMFY_DYNAMICCOMBO_V3"


def node_inputs(node_cls, preset: str = AUTO, step_cache: str = "off", **values) -> dict:
    """Keyword inputs for running the node in-process (``InProcessComfy.run_node``)."""
    sliders = {k: values.get(k, SLIDER_DEFAULTS[k]) for k in SLIDERS}
    cache = {k: values.get(k, CACHE_DEFAULTS[k]) for k in CACHE_SETTINGS}
    unknown = set(values) - set(SLIDERS) - set(CACHE_SETTINGS)
    assert not unknown, f"not inputs of the node: {unknown}"
    if is_dynamic(node_cls):
        return {"preset": {"preset": preset, **(sliders if preset == CUSTOM else {})},
                "step_cache": {"step_cache": step_cache, **(cache if step_cache == "adaptive" else {})}}
    return {"preset": preset, **sliders, "step_cache": step_cache, **cache}


def prompt_inputs(dynamic: bool, preset: str = AUTO, step_cache: str = "off", **values) -> dict:
    """The node's inputs in an API-format prompt."""
    sliders = {k: values.get(k, SLIDER_DEFAULTS[k]) for k in SLIDERS}
    cache = {k: values.get(k, CACHE_DEFAULTS[k]) for k in CACHE_SETTINGS}
    if not dynamic:
        return {"preset": preset, **sliders, "step_cache": step_cache, **cache}
    out = {"preset": preset, "step_cache": step_cache}
    if preset == CUSTOM:
        out.update({f"preset.{k}": v for k, v in sliders.items()})
    if step_cache == "adaptive":
        out.update({f"step_cache.{k}": v for k, v in cache.items()})
    return out


REPORT_PREFIX = "Chipmunk: "


def reports(caplog) -> list[str]:
    """The run reports logged during a test (one line per sampling run)."""
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith(REPORT_PREFIX) and " steps in " in r.getMessage()]


def step_counts(report: str) -> dict[str, int]:
    """{"dense": n, "sparse": n, "skipped": n, "stock": n} from a run report."""
    counts = {kind: 0 for kind in ("dense", "sparse", "skipped", "stock")}
    found = re.search(r"steps: ([^|\n]*)", report)
    if found:
        for number, kind in re.findall(r"(\d+) (dense|sparse|skipped|stock)", found.group(1)):
            counts[kind] = int(number)
    if "stock sampling" in report:
        counts["stock"] = int(re.search(r", (\d+) steps in", report).group(1))
    return counts
