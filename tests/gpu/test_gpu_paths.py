"""Real CUDA graphs, compiled kernels, host-streamed caches and a failure inside a real capture."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import subprocess
import sys

import pytest
import torch

from harness import paths

STEPS = 12


def _sample(comfy_gpu, model, seed=1, cfg=1.0, size=(1024, 1024)):
    import comfy.sample
    e2e, _ = comfy_gpu
    latent = torch.zeros(1, 16, size[1] // 8, size[0] // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    positive, negative = e2e.conditioning("flux", 5, False), e2e.conditioning("flux", 6, False)
    with torch.inference_mode():
        out = comfy.sample.sample(model, noise, STEPS, cfg, "euler", "simple", positive, negative, latent, seed=seed,
                                  disable_pbar=True)
    torch.cuda.synchronize()
    return out


def _report(hooks, model) -> str:
    return model.model_options["transformer_options"][hooks.ACCEL_KEY].last_report


def _module(hooks, name):
    return importlib.import_module(hooks.__name__.rsplit(".", 2)[0] + "." + name)


def test_replayed_graphs_equal_eager_steps_bit_for_bit(comfy_gpu, flux_gpu):
    _, hooks = comfy_gpu
    eager_model = hooks.accelerate(flux_gpu, cuda_graphs=False)
    eager = _sample(comfy_gpu, eager_model)
    graphed_model = hooks.accelerate(flux_gpu)
    _sample(comfy_gpu, graphed_model)  # compiles and warms the signatures
    graphed = _sample(comfy_gpu, graphed_model)
    report = _report(hooks, graphed_model)
    assert int(report.split("CUDA graphs: ")[1].split(" ")[0]) > 0, report
    assert "CUDA graphs" not in _report(hooks, eager_model)
    assert torch.equal(graphed, eager)


def test_caches_streamed_from_pinned_host_memory_equal_caches_on_the_gpu(comfy_gpu, flux_gpu, monkeypatch):
    """Every cache placed in pinned host memory and streamed (the placement forced: the plan streams
    no image layer, and an MLP cache only with room on the device for its block means and unit
    lists); the picture is the one with the caches on the GPU."""
    _, hooks = comfy_gpu
    plan = _module(hooks, "chipmunk_core.plan")
    state = _module(hooks, "chipmunk_core.state")
    on_gpu = _sample(comfy_gpu, hooks.accelerate(flux_gpu, cuda_graphs=False))

    def all_streamed(items, budget, cost=None, host_budget=None):
        placement = {(item.layer, item.kind): plan.HOST for item in items}
        return plan.MemoryPlan(placement, budget, host_budget, plan.folded_bytes(items), 0, plan.folded_bytes(items))

    monkeypatch.setattr(state, "plan_memory", all_streamed)
    model = hooks.accelerate(flux_gpu, cuda_graphs=False)
    streamed = _sample(comfy_gpu, model)
    report = _report(hooks, model)
    assert "streamed from host memory" in report and "caches 0.00 GiB on the device" in report, report
    assert torch.equal(streamed, on_gpu)


def test_a_capture_failing_inside_a_real_capture_is_undone(comfy_gpu, flux_gpu, monkeypatch):
    """A real CUDA capture that fails in the middle of a sparse step (raised from the MLP's first
    re-ranking kernel while capturing): the step and the rest of the run run eagerly, bit for bit
    the run without graphs."""
    _, hooks = comfy_gpu
    kernels = _module(hooks, "kernels")
    graphs = _module(hooks, "chipmunk_core.graphs")
    eager = _sample(comfy_gpu, hooks.accelerate(flux_gpu, cuda_graphs=False))
    block_means = kernels.block_means

    def failing_while_capturing(t, *args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("injected: operation not permitted when stream is capturing")
        return block_means(t, *args, **kwargs)

    monkeypatch.setattr(kernels, "block_means", failing_while_capturing)
    graphs.PROCESS_WARM.clear()
    model = hooks.accelerate(flux_gpu)
    failed = _sample(comfy_gpu, model)
    report = _report(hooks, model)
    assert "capturing a step failed (RuntimeError: injected" in report, report
    assert torch.equal(failed, eager)


def test_fc2_transposed_by_the_kernel_gives_the_picture_of_torchs_transpose(comfy_gpu, flux_gpu, monkeypatch):
    """No copy of fc2 is kept: every sparse MLP step transposes it into the run's scratch with the
    Triton kernel (graphs replay it). That is a copy of values: the picture equals the one with
    torch's own transpose in its place, bit for bit."""
    _, hooks = comfy_gpu
    kernels = _module(hooks, "kernels")
    seen = []
    transpose_into = kernels.transpose_into

    def counting(src, out):
        seen.append(src.is_cuda)
        return transpose_into(src, out)

    monkeypatch.setattr(kernels, "transpose_into", counting)
    model = hooks.accelerate(flux_gpu)
    with_kernel = _sample(comfy_gpu, model)
    assert seen and all(seen), "no sparse MLP step transposed fc2 on the GPU"
    monkeypatch.setattr(kernels, "transpose_into", lambda src, out: out.copy_(src.t()))
    assert torch.equal(_sample(comfy_gpu, hooks.accelerate(flux_gpu)), with_kernel)


def test_dynamic_vram_as_main_py_runs_it(tmp_path):
    """ComfyUI's dynamic VRAM (comfy-aimdo, the default of ``python main.py`` on NVIDIA) in its own
    process, the model loaded as Load Diffusion Model loads it (bench/e2e_comfy.py): Chipmunk's
    sparse steps replay CUDA graphs, the pictures are finite, and each variant's picture is the same
    with all memory free and with the card occupied down to 12 GiB."""
    import json
    if importlib.util.find_spec("comfy_aimdo") is None:
        pytest.fail("comfy-aimdo is missing: it is part of ComfyUI v0.19.3's requirements (pip install comfy-aimdo)")
    out = tmp_path / "dynamic.json"
    command = [sys.executable, str(paths.REPO_ROOT / "bench" / "e2e_comfy.py"), "--comfyui", str(paths.comfyui_dir()),
               "--case", "flux", "--blocks", "2,4", "--sizes", "1024x1024", "--steps", str(STEPS),
               "--warmup-steps", str(STEPS), "--dynamic-vram", "--free-gib", "all,12",
               "--variants", "stock,chipmunk,chipmunk+cache", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0 and out.exists(), result.stdout[-4000:] + result.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert {row["variant"] for row in rows} == {"stock", "chipmunk", "chipmunk+cache"} and len(rows) == 6
    for row in rows:
        assert row["dynamic_vram"] and row["finite"], row
        assert row["same_as_first_budget"], row
    for row in (r for r in rows if r["variant"] != "stock"):
        report = row["report"]
        assert int(report.split("CUDA graphs: ")[1].split(" ")[0]) > 0, report


def test_compiled_kernels_match_the_references_at_real_shapes():
    """bench/gpu_parity.py: every kernel configuration against its PyTorch reference."""
    result = subprocess.run([sys.executable, str(paths.REPO_ROOT / "bench" / "gpu_parity.py")],
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@pytest.fixture(autouse=True)
def _logs(caplog):
    caplog.set_level(logging.INFO)
