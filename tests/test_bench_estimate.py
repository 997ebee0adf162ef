"""bench/e2e_comfy.py's run estimate from a run's first steps (``--timed-steps``), used where a whole
run does not fit one device command (WAN2.1-14B at 720p): the kinds of step come from the pack's
own schedules, a run ended early through ComfyUI's sampler callback leaves the pack in order, and
the arithmetic reproduces a whole run measured on the GPU."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from harness import paths

from chipmunk_pack.chipmunk_core.config import FAMILY_DEFAULTS


def _load_script():
    """bench/e2e_comfy.py as a module, without putting bench/ on sys.path (its kernels.py would
    shadow other modules) and without its own registration of the pack (the tests have theirs)."""
    spec = importlib.util.spec_from_file_location("chipmunk_bench_e2e_comfy", paths.REPO_ROOT / "bench" / "e2e_comfy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


e2e_comfy = _load_script()


def _wan(**changes):
    return dataclasses.replace(FAMILY_DEFAULTS["wan"], **changes)


def test_kinds_of_step_follow_the_packs_schedules():
    kinds = e2e_comfy.step_kinds(_wan(step_cache="fixed"), 30)
    assert kinds[:2] == ["dense, choosing lists"] * 2  # WAN chooses its key lists on the warm-up steps
    assert kinds[10] == kinds[20] == "dense"            # refresh steps keep them
    assert kinds.count("skipped") == 13 and kinds.count("sparse") == 13
    assert e2e_comfy.step_kinds(_wan(), 30).count("sparse") == 26
    assert e2e_comfy.step_kinds(None, 4) == ["stock"] * 4


def test_the_estimate_reproduces_a_whole_run_measured_on_the_gpu():
    """WAN2.1-1.3B's template with step cache on an H100 (bench/results/e2e_wan13b_whole_h100.json):
    the first 11 steps as timed give the whole run's step times within half a percent."""
    whole = json.loads((paths.REPO_ROOT / "bench/results/e2e_wan13b_whole_h100.json").read_text())["rows"][1]
    later_steps = [ms for ms, _ in whole["step_ms"]]  # steps 1..29 (the whole run has no start mark)
    kinds = e2e_comfy.step_kinds(_wan(step_cache="fixed"), 30)
    first = 2000.0
    estimate = e2e_comfy.estimate_run([(first, 0)] + [(ms, 0) for ms in later_steps[:10]], kinds)
    assert estimate["stand_ins"] == {}
    assert estimate["seconds"] == pytest.approx((first + sum(later_steps)) / 1e3, rel=5e-3)
    # without a refresh step among the timed ones it is costed as a step choosing lists, and says so
    short = e2e_comfy.estimate_run([(first, 0)] + [(ms, 0) for ms in later_steps[:5]], kinds)
    assert short["stand_ins"] == {"dense": "dense, choosing lists"} and short["seconds"] > estimate["seconds"]
    with pytest.raises(SystemExit, match="no timed step of kind 'skipped'"):
        e2e_comfy.estimate_run([(first, 0), (1.0, 0)], kinds)


@pytest.mark.comfyui
def test_a_run_ended_after_its_first_steps_inside_comfyui(comfyui_dir, tmp_path):
    """The script's own smoke shapes on the CPU, through ComfyUI's real sampler: the runs end at
    the callback after 11 steps, the pack reports them, and every row has its estimate."""
    out = tmp_path / "timed.json"
    env = dict(os.environ, CHIPMUNK_SPARSE_ON_CPU="1")
    subprocess.run([sys.executable, str(paths.REPO_ROOT / "bench" / "e2e_comfy.py"), "--smoke", "--device", "cpu",
                    "--comfyui", str(comfyui_dir), "--case", "wan13b", "--steps", "30", "--cfg", "6",
                    "--sampler", "uni_pc", "--timed-steps", "11", "--variants", "stock,chipmunk+cache",
                    "--out", str(out)], check=True, env=env, timeout=600, capture_output=True)
    stock, cached = json.loads(out.read_text())["rows"]
    assert stock["estimated_from_steps"]["timed_steps"] == 2 and stock["rel_deviation"] is None
    assert cached["estimated_from_steps"]["timed_steps"] == 11
    assert cached["estimated_from_steps"]["step_counts"] == {"dense, choosing lists": 2, "skipped": 13,
                                                              "sparse": 13, "dense": 2}
    assert "steps: 3 dense, 4 sparse, 4 skipped" in cached["report"], cached["report"]
    assert cached["seconds"] > 0 and cached["estimated_without_step_cache_seconds"] > 0
