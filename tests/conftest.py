"""Fixtures for testing the pack in a real ComfyUI.

ComfyUI is not on any package registry; the tests use a checkout at ``$CHIPMUNK_COMFYUI_DIR``,
else ``~/.cache/comfyui-chipmunk/ComfyUI-v<version>`` (where tools/setup_env.sh puts it; version
``$CHIPMUNK_COMFYUI_VERSION``, default 0.19.3). Tests that need it skip, saying how to get it, when
it is absent, or fail where ``CHIPMUNK_REQUIRE_COMFYUI=1`` (CI), which also fails the run when any
test marked ``comfyui`` skipped. Every test that uses ``comfyui_dir`` (directly or through another
fixture) is marked ``comfyui``; the pytest header names the ComfyUI version.

- ``comfyui_version``: the version of that ComfyUI as a tuple, e.g. ``(0, 19, 3)``. A test that
  applies to some versions only is marked ``comfyui_versions(since=(0, 19), before=None)`` and is
  deselected on the others. A test that uses the ``comfyui_v19`` fixture (the toy models of the
  quality lab, the browser test) counts as ``comfyui_versions(since=(0, 19))``.

- ``comfy_inprocess``: ComfyUI imported into this process on the CPU (harness.inprocess).
- ``narrow_flux``: a fresh narrow FLUX ModelPatcher for fast in-process sampling.
- ``chipmunk_pack_nodes``: the pack imported the way ComfyUI imports it; its node classes.
- ``tiny_checkpoints``: tiny checkpoints, one per family, built once and cached
  (``$CHIPMUNK_TINY_MODELS_DIR``, else the pytest cache).
- ``comfy_server``: one real ComfyUI server for the whole session, with the pack, the dev
  nodes and the tiny checkpoints.
"""
from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest

from harness import paths


# Unit tests import the core and the kernels as subpackages of the pack (their relative imports
# need it) without running the pack's __init__ (which needs ComfyUI), and without putting the
# pack's folders on sys.path (a top-level ``kernels`` would shadow a PyPI package of that name):
# the repository root is registered as a bare package named ``chipmunk_pack``.
# The tests study the method itself on the CPU: Chipmunk's layers run there with the reference
# kernels (users' CPUs run stock; tests of that take this out again). Servers started by the
# tests inherit it.
os.environ.setdefault("CHIPMUNK_SPARSE_ON_CPU", "1")

if "chipmunk_pack" not in sys.modules:
    _package = types.ModuleType("chipmunk_pack")
    _package.__path__ = [str(Path(__file__).resolve().parents[1])]
    sys.modules["chipmunk_pack"] = _package


def pytest_ignore_collect(collection_path, config):
    """tests/gpu needs CUDA: where there is none (CI, these machines) it is not collected at all
    (run it on a GPU machine: tests/gpu/conftest.py)."""
    if collection_path.name == "gpu" and collection_path.parent == Path(__file__).resolve().parent:
        import torch
        return not torch.cuda.is_available()
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "comfyui: needs the real ComfyUI checkout")
    config.addinivalue_line(
        "markers", "chipmunk_node: needs the pack's ChipmunkAccelerate node (fails without it)")
    config.addinivalue_line(
        "markers", "comfyui_versions(since=None, before=None): runs only against ComfyUI versions "
        "v with since <= v < before (tuples such as (0, 19)); deselected against others")


def _present_comfyui_version() -> tuple[int, ...] | None:
    path = paths.comfyui_dir()
    return paths.comfyui_version(path) if paths.comfyui_present(path) else None


def _version_text(version: tuple[int, ...]) -> str:
    return "v" + ".".join(map(str, version))


def pytest_report_header(config):
    path = paths.comfyui_dir()
    version = _present_comfyui_version()
    if version is not None:
        return f"ComfyUI: {_version_text(version)} at {path}"
    consequence = "fail" if paths.comfyui_required() else "skip"
    return f"ComfyUI: none at {path} (the tests that need it {consequence})"


@pytest.hookimpl(tryfirst=True)  # before `-m comfyui` selects on the marker added here
def pytest_collection_modifyitems(config, items):
    version = _present_comfyui_version()
    kept, deselected = [], []
    for item in items:
        versions = item.get_closest_marker("comfyui_versions")
        if versions is None and "comfyui_v19" in item.fixturenames:
            versions = pytest.mark.comfyui_versions(since=(0, 19)).mark
        if versions is not None or "comfyui_dir" in item.fixturenames:
            item.add_marker(pytest.mark.comfyui)
        if versions is not None and version is not None:
            since, before = versions.kwargs.get("since"), versions.kwargs.get("before")
            if (since is not None and version < tuple(since)) or \
                    (before is not None and version >= tuple(before)):
                deselected.append(item)
                continue
        kept.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


# Outcome of every test (and whether it is a ComfyUI test), for the CI checks below.
_OUTCOMES: dict[str, tuple[str, bool]] = {}


def pytest_runtest_logreport(report):
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    elif report.failed:
        outcome = "failed" if report.when == "call" else "error"
    elif report.skipped:
        outcome = "skipped"
    elif report.when == "call":
        outcome = "passed"
    else:
        return
    previous = _OUTCOMES.get(report.nodeid, ("", False))[0]
    if previous not in ("failed", "error"):
        _OUTCOMES[report.nodeid] = (outcome, "comfyui" in report.keywords)


def _skipped_comfyui_tests() -> list[str]:
    return [node for node, (outcome, comfyui) in _OUTCOMES.items()
            if comfyui and outcome == "skipped"]


def pytest_sessionfinish(session, exitstatus):
    """Where ComfyUI is required, a skipped ComfyUI test fails the run. With
    ``$CHIPMUNK_TEST_REPORT`` set, write the ComfyUI version and the outcome counts there (JSON)."""
    skipped = _skipped_comfyui_tests()
    if paths.comfyui_required() and skipped and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    report_path = os.environ.get("CHIPMUNK_TEST_REPORT")
    if report_path:
        counts: dict[str, dict[str, int]] = {"all": {}, "comfyui": {}}
        for outcome, comfyui in _OUTCOMES.values():
            for group in ("all", "comfyui") if comfyui else ("all",):
                counts[group][outcome] = counts[group].get(outcome, 0) + 1
        version = _present_comfyui_version()
        Path(report_path).write_text(json.dumps({
            "comfyui_version": None if version is None else _version_text(version),
            "comfyui_dir": str(paths.comfyui_dir()), "exitstatus": int(session.exitstatus),
            "counts": counts, "skipped_comfyui_tests": skipped}, indent=1))


def pytest_terminal_summary(terminalreporter):
    skipped = _skipped_comfyui_tests()
    if paths.comfyui_required() and skipped:
        terminalreporter.write_sep("=", f"ComfyUI tests skipped: {len(skipped)}, but "
                                   f"{paths.REQUIRE_ENV}=1: that fails the run", red=True)
        for node in skipped:
            terminalreporter.write_line(node)


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    path = paths.comfyui_dir()
    if not paths.comfyui_present(path):
        reason = paths.comfyui_missing_reason(path)
        if paths.comfyui_required():
            pytest.fail(f"{paths.REQUIRE_ENV}=1, but {reason}", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def comfyui_version(comfyui_dir) -> tuple[int, ...]:
    return paths.comfyui_version(comfyui_dir)


@pytest.fixture(scope="session")
def comfyui_v19(comfyui_dir, comfyui_version, comfy_inprocess):
    """For what targets ComfyUI v0.19.3 only: the quality lab's toy models (taef1 and lighttaew2_1
    in "Load VAE", the toy architectures in "Load Diffusion Model") and the browser test, which
    runs a toy workflow in the v0.19.3 front end. Deselected against older versions (see
    pytest_collection_modifyitems); skips if reached there anyway. ComfyUI imported in-process."""
    if comfyui_version < (0, 19):
        pytest.skip(f"needs ComfyUI v0.19.3 or newer; {comfyui_dir} is {_version_text(comfyui_version)} "
                    "(set CHIPMUNK_COMFYUI_DIR to a v0.19.3 tree)")
    return comfy_inprocess


@pytest.fixture(scope="session")
def comfy_inprocess(comfyui_dir):
    from harness.inprocess import InProcessComfy

    return InProcessComfy(comfyui_dir)


@pytest.fixture
def narrow_flux(comfy_inprocess):
    return comfy_inprocess.narrow_flux()


@pytest.fixture(scope="session")
def chipmunk_pack_nodes(comfy_inprocess, tmp_path_factory) -> dict:
    return comfy_inprocess.load_pack(tmp_path_factory.mktemp("custom_nodes"))


@pytest.fixture(scope="session")
def tiny_models_dir(request, tmp_path_factory) -> Path:
    override = os.environ.get("CHIPMUNK_TINY_MODELS_DIR")
    if override:
        return Path(override)
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("chipmunk-tiny-models"))
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_checkpoints(comfy_inprocess, tiny_models_dir) -> dict[str, Path]:
    """Family -> checkpoint path (built on first use; later sessions reuse identical files)."""
    tiny = comfy_inprocess.tiny_models
    return {family: tiny.write_checkpoint(family, tiny_models_dir)
            for family in tiny.FAMILY_CONFIGS}


@pytest.fixture(scope="session")
def comfy_server(comfyui_dir, tiny_checkpoints, tiny_models_dir, tmp_path_factory):
    from harness.server import ComfyServer

    server = ComfyServer(comfyui_dir, tmp_path_factory.mktemp("comfyui-server"),
                         model_folders={"diffusion_models": [tiny_models_dir]})
    server.start()
    try:
        yield server
    finally:
        server.stop()
