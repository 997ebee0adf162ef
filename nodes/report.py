"""The run report: what ran in a sampling run, as one console line with every detail, and as a few
short lines on the node (the front end shows about two lines of a node's progress text)."""

from __future__ import annotations

import logging

from .options import FUSED_CHECK

logger = logging.getLogger(__name__)


def _percent(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def _step_counts(data) -> str:
    return ", ".join(f"{data[k]} {k}" for k in ("dense", "sparse", "skipped", "stock") if data[k]) or "none"


def lines(accelerator, run, seconds: float) -> list[str]:
    """The whole report, a line per topic (the console gets them joined)."""
    data = run.report()
    config, plan = accelerator.config, accelerator.plan
    out = [f"Chipmunk: {plan.model_name}, {data['steps']} steps in {seconds:.1f} s"]
    stock = data["stock_reason"] if config.sparse else None
    if stock:  # the first thing to know: Chipmunk could not help here
        out[0] += f", ran stock: {stock.detail}"
    if not config.sparse and config.step_cache == "off":
        out.append("stock sampling: both sparsities are 0 and step caching is off")
    else:
        out.append("steps: " + _step_counts(data))
        if config.sparse and not stock:
            out.append(f"achieved sparsity on sparse steps: attention {_percent(data['attention_sparsity'])}, "
                       f"MLP {_percent(data['mlp_sparsity'])}" + _rounding(config, data))
            graphs = data["graphs"]
            if graphs["replayed"] or graphs["captured"]:
                out.append(f"CUDA graphs: {graphs['replayed']} sparse model calls replayed, {graphs['captured']} "
                           f"captured, {graphs['eager']} eager")
            out.append(f"memory: {data['plan']}" if data["plan"] else f"cache: {data['cache_gib']:.2f} GiB")
    out.append(f"settings: {config.describe()}; dense steps {sorted(run.schedule.dense_steps)}")
    out.extend(f"note: {note}" for note in data["notes"])
    return out


def _rounding(config, data) -> str:
    """Why the achieved attention sparsity differs from the setting, where it does by more than a
    point: key lists are whole tiles of keys, plus the keys every group keeps (text, window)."""
    achieved = data["attention_sparsity"]
    if achieved is None or abs(achieved - config.attention_sparsity) <= 0.01:
        return ""
    return (f" (setting {config.attention_sparsity:g}: each query group keeps whole {config.selection_tile}-key "
            "tiles and the keys all groups keep)")


# The front end shows about two lines of a node's progress text, some 45 characters each.
NODE_LINE = 45


def node_lines(accelerator, run, seconds: float) -> list[str]:
    """The report as the node shows it: two short lines of what ran (``NODE_LINE``); the console
    line, which the second line points to when it has notes, holds the rest."""
    data = run.report()
    config = accelerator.config
    stock = data["stock_reason"] if config.sparse else None
    notes = len(data["notes"])
    time = f"{data['steps']} steps, {seconds:.1f} s"
    if stock:
        out = [f"Chipmunk ran stock: {stock.headline}", time]
    elif not config.sparse and config.step_cache == "off":
        out = ["Chipmunk: stock (sparsities 0, no cache)", time]
    else:
        out = [f"Chipmunk, steps: {_step_counts(data)}", f"{seconds:.1f} s"]
        if config.sparse:
            out[1] += f", skipped attn {_percent(data['attention_sparsity'])} MLP {_percent(data['mlp_sparsity'])}"
    if notes:
        out[1] = f"{out[1].split(',')[0]}; {notes} note{'s' if notes > 1 else ''} in the log"
    return out


def publish(accelerator, run, seconds: float):
    """Log the report and show it on the Chipmunk Accelerate node that made the model."""
    text = lines(accelerator, run, seconds)
    accelerator.last_report = " | ".join(text)
    logger.info(accelerator.last_report)
    if accelerator.node_id is None:
        return
    try:
        from server import PromptServer
        server = PromptServer.instance
    except (ImportError, AttributeError):  # ComfyUI used as a library: no front end to tell
        return
    try:
        server.send_progress_text("\n".join(node_lines(accelerator, run, seconds)), accelerator.node_id)
    except Exception as exc:  # the report must never fail a finished run
        logger.debug("Chipmunk: could not send the run report to the node: %s", exc)


def note_setup(context):
    """Say once in the run what of the node's set-up is not in effect, and why (unused inputs, refusals,
    failed self-checks)."""
    accelerator, run = context.accelerator, context.run
    plan, config = accelerator.plan, accelerator.config
    for text in accelerator.unused_inputs:
        run.note(f"unused {text}", text, logging.INFO)
    if plan.attention_only_reason:
        run.note("plan", plan.attention_only_reason)
    elif config.sparse_mlp and plan.mlp_refusals:
        run.note("mlp", "MLP kept dense where the block is not one Chipmunk knows: " + "; ".join(plan.mlp_refusals))
    if not plan.attention_only_reason and config.sparse_mlp and plan.block_refusals:
        run.note("blocks", "double blocks run ComfyUI's own per-token code (their MLP is still Chipmunk's): "
                           + "; ".join(plan.block_refusals), logging.INFO)
    if run.step_cache_schedule.disabled_reason:
        run.note("step cache", run.step_cache_schedule.disabled_reason)
    for kind, problem in context.checks.items():
        if problem and kind == "double_block":
            run.note(f"check {kind}", "double blocks run ComfyUI's own code (their MLP is still Chipmunk's): the "
                                      f"self-check of their one-pass per-token kernels failed ({problem})", logging.INFO)
        elif problem and kind == FUSED_CHECK:
            run.note(f"check {kind}", "single blocks use ComfyUI's own per-token operations (norms, modulation, "
                                      f"rotary embedding) instead of one-pass kernels: their self-check failed ({problem})",
                     logging.INFO)
        elif problem:
            run.note(f"check {kind}", f"MLP of {kind.replace('_', ' ')}s kept dense: the self-check failed ({problem})")
