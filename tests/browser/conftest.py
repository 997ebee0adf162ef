"""Fixtures for the browser tests: a real ComfyUI server with the pack, its real web front end
(the ``comfyui-frontend-package`` ComfyUI installs), and a headless Chromium driving it.

The workflow the tests load from the template browser and run is ``RUN_TEMPLATE`` in
workflow_under_test.py; ``run_template_models`` below provides its model folders.

Screenshots of every stage go to .run/screenshots/browser/ (git-ignored); the path is printed at
the end of the run.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from comfy_frontend import ComfyFrontEnd
from harness.browser import Browser, find_chromium
from harness.paths import REPO_ROOT
from harness.server import ComfyServer, frontend_package_installed
from workflow_under_test import RUN_TEMPLATE, TEST_TEMPLATES, write_random_tae, write_test_templates

SCREENSHOT_DIR = REPO_ROOT / ".run" / "screenshots" / "browser"


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives ComfyUI's web front end in headless Chromium")


def pytest_terminal_summary(terminalreporter):
    shots = sorted(SCREENSHOT_DIR.glob("*.png")) if SCREENSHOT_DIR.is_dir() else []
    if shots:
        terminalreporter.write_line(f"browser screenshots ({len(shots)}): {SCREENSHOT_DIR}")


# --- the browser -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        reason = ("no Chromium: run tools/setup_browser.sh (installs Debian's chromium), or set "
                  "CHIPMUNK_CHROMIUM to a Chromium binary")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    if SCREENSHOT_DIR.exists():
        shutil.rmtree(SCREENSHOT_DIR)
    SCREENSHOT_DIR.mkdir(parents=True)
    print(f"\nbrowser screenshots: {SCREENSHOT_DIR}")
    return SCREENSHOT_DIR


@pytest.fixture(scope="session")
def run_template_models(comfy_inprocess, tiny_models_dir, tmp_path_factory) -> dict[str, list[Path]]:
    """Model folders (ComfyUI folder name -> paths) the workflow under test needs (the pack's toy
    workflows need none: the pack registers its toy models itself)."""
    if RUN_TEMPLATE.section != TEST_TEMPLATES:
        return {}
    comfy_inprocess.tiny_models.write_checkpoint("flux", tiny_models_dir)
    tae_dir = write_random_tae(tmp_path_factory.mktemp("vae_approx"))
    return {"diffusion_models": [tiny_models_dir], "vae_approx": [tae_dir]}


# --- server and front end ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def browser_server(comfyui_v19, comfyui_dir, run_template_models, tmp_path_factory):
    if not frontend_package_installed():
        pytest.fail("comfyui-frontend-package is not installed in this Python: the browser tests "
                    "need ComfyUI's real web front end (it is in ComfyUI's requirements.txt)")
    workdir = tmp_path_factory.mktemp("comfyui-browser")
    if RUN_TEMPLATE.section == TEST_TEMPLATES:
        write_test_templates(workdir / "custom_nodes")
    server = ComfyServer(comfyui_dir, workdir, model_folders=run_template_models)
    # As a user's server: on this CPU Chipmunk runs stock and says why (the rest of the suite
    # sets CHIPMUNK_SPARSE_ON_CPU to study the method on the CPU).
    sparse_on_cpu = os.environ.pop("CHIPMUNK_SPARSE_ON_CPU", None)
    try:
        server.start()
    finally:
        if sparse_on_cpu is not None:
            os.environ["CHIPMUNK_SPARSE_ON_CPU"] = sparse_on_cpu
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def frontend(chromium, browser_server, screenshot_dir, tmp_path_factory):
    browser = Browser(chromium, tmp_path_factory.mktemp("chromium"), width=1600, height=1000)
    browser.start()
    try:
        page = ComfyFrontEnd(browser, browser_server.url, screenshot_dir)
        page.open()
        page.screenshot("app-opened")
        yield page
    finally:
        browser.close()
