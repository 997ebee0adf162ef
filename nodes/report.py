"""The run report: what ran in a sampling run, as one console line and as text on the node."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def _percent(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def lines(accelerator, run, seconds: float) -> list[str]:
    """The report, a line per topic (the node shows them as they are)."""
    data = run.report()
    config, plan = accelerator.config, accelerator.plan
    out = [f"Chipmunk: {plan.model_name}, {data['steps']} steps in {seconds:.1f} s"]
    if data["stock_reason"] and config.sparse:  # the first thing to know: Chipmunk could not help here
        out[0] += f", ran stock: {data['stock_reason']}"
    if not config.sparse and config.step_cache == "off":
        out.append("stock sampling: both sparsities are 0 and step caching is off")
    else:
        parts = [f"{data[k]} {k}" for k in ("dense", "sparse", "skipped", "stock") if data[k]]
        out.append("steps: " + (", ".join(parts) or "none"))
        if config.sparse and not data["stock_reason"]:
            out.append(f"achieved sparsity on sparse steps: attention {_percent(data['attention_sparsity'])}, "
                       f"MLP {_percent(data['mlp_sparsity'])}")
            graphs = data["graphs"]
            if graphs["replayed"] or graphs["captured"]:
                out.append(f"CUDA graphs: {graphs['replayed']} sparse model calls replayed, {graphs['captured']} "
                           f"captured, {graphs['eager']} eager")
            out.append(f"memory: {data['plan']}" if data["plan"] else f"cache: {data['cache_gib']:.2f} GiB")
    out.append(f"settings: {config.describe()}; dense steps {sorted(run.schedule.dense_steps)}")
    out.extend(f"note: {note}" for note in data["notes"])
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
        server.send_progress_text("\n".join(text), accelerator.node_id)
    except Exception as exc:  # the report must never fail a finished run
        logger.debug("Chipmunk: could not send the run report to the node: %s", exc)
