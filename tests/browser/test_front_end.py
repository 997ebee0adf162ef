"""The pack in ComfyUI's real web front end, used the way a person uses it: find the node through
the node search, open the pack's templates in the template browser, load a workflow from it,
press Run, and see the image and Chipmunk's run report on the canvas.

The tests share one server and one browser page (conftest.py) and run in file order: the last
ones load the workflow under test (``RUN_TEMPLATE``) and run it. Every stage leaves a screenshot.
"""
from __future__ import annotations

import json
import time

import pytest
import requests

from harness.paths import PACK_NAME, REPO_ROOT
from harness.server import ComfyServerError, format_execution_error
from workflow_under_test import RUN_TEMPLATE

pytestmark = [pytest.mark.browser, pytest.mark.comfyui]

ACCELERATE_TITLE = "Chipmunk Accelerate"
ACCELERATE_TYPE = "ChipmunkAccelerate"
BUNDLED = sorted((REPO_ROOT / "workflows").glob("*.json"))
RUN_TIMEOUT = 240.0
PLACEHOLDER = "default-template"  # the front end's picture for a template without one


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def declared_models(workflow: dict) -> list[dict]:
    """The model files a workflow declares for the front end (``properties.models``)."""
    return [model for node in workflow["nodes"] for model in node.get("properties", {}).get("models", [])]


REAL_MODEL_WORKFLOWS = [path for path in BUNDLED if declared_models(load(path))]


def test_node_search_finds_chipmunk_accelerate(frontend):
    results = frontend.search_nodes("Chipmunk")
    frontend.screenshot("node-search-chipmunk")
    frontend.close_dialog()
    assert ACCELERATE_TITLE in results, results


def test_template_browser_shows_the_packs_workflows_with_their_pictures(frontend, browser_server):
    frontend.open_templates(PACK_NAME)
    cards = frontend.template_cards()
    frontend.screenshot("template-browser-pack")
    frontend.close_dialog()
    assert set(cards) == {path.stem for path in BUNDLED}
    for name, card in cards.items():
        # This front end titles a custom node's template with its file name.
        assert card["title"] == name
        # The front end shows its placeholder where the picture is missing; a picture it has
        # fetched shows from a blob: URL.
        assert PLACEHOLDER not in card["thumbnail"] and card["thumbnail_width"] > 0, (
            f"{name}: the card shows {card['thumbnail']}, not workflows/{name}.jpg")
        picture = requests.get(f"{browser_server.url}/api/workflow_templates/{PACK_NAME}/{name}.jpg",
                               timeout=30)
        assert picture.ok and picture.headers["Content-Type"] == "image/jpeg", name


@pytest.mark.parametrize("path", REAL_MODEL_WORKFLOWS, ids=[p.stem for p in REAL_MODEL_WORKFLOWS])
def test_real_model_template_says_which_files_to_download_and_where(frontend, path):
    """Without the weights the workflow opens with its nodes known and a missing-models panel
    that offers each declared file for download into its models folder."""
    frontend.load_template(PACK_NAME, path.stem)
    nodes = frontend.graph_nodes()
    dialogs = frontend.open_dialogs()
    overlay = frontend.error_overlay() or ""
    panel = frontend.missing_models_panel()
    frontend.screenshot(f"template-{path.stem}-missing-models")
    frontend.close_side_panel()
    assert not [n for n in nodes if not n["registered"]], nodes
    assert not dialogs, dialogs
    assert "Missing Models" in overlay, overlay
    for model in declared_models(load(path)):
        assert model["name"] in panel and model["directory"] in panel, (model, panel)


@pytest.fixture(scope="module")
def loaded_run_template(frontend) -> dict:
    frontend.load_template(RUN_TEMPLATE.section, RUN_TEMPLATE.name)
    state = {"nodes": frontend.graph_nodes(), "dialogs": frontend.open_dialogs(),
             "errors": frontend.error_overlay()}
    frontend.screenshot(f"template-{RUN_TEMPLATE.name}-loaded")
    return state


def test_workflow_loads_from_the_template_browser_with_nothing_missing(loaded_run_template):
    state = loaded_run_template
    assert ACCELERATE_TYPE in {n["type"] for n in state["nodes"]}
    assert not [n for n in state["nodes"] if not n["registered"]], state["nodes"]
    assert not state["dialogs"], f"dialogs after loading: {state['dialogs']}"
    assert state["errors"] is None, f"error overlay after loading: {state['errors']}"


@pytest.fixture(scope="module")
def finished_run(frontend, browser_server, loaded_run_template) -> list[dict]:
    """Press Run; wait until the image node shows an image. Returns that node's images."""
    image_nodes = [n["id"] for n in frontend.graph_nodes() if n["type"] == RUN_TEMPLATE.image_node]
    assert image_nodes, f"no {RUN_TEMPLATE.image_node} node on the canvas"
    history_before = set(browser_server.get_json("/history"))
    frontend.press_run()
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while True:
            images = [i for i in frontend.node_images(image_nodes[0]) if i["complete"] and i["width"]]
            if images:
                return images
            for prompt_id, entry in browser_server.get_json("/history").items():
                status = entry.get("status", {})
                if prompt_id not in history_before and status.get("status_str") == "error":
                    raise ComfyServerError(f"the run failed:\n{format_execution_error(status)}\n"
                                           f"{browser_server.log_tail()}")
            if time.monotonic() > deadline:
                raise ComfyServerError(f"no image on the canvas {RUN_TIMEOUT:.0f} s after Run\n"
                                       f"{browser_server.log_tail()}")
            time.sleep(1.0)
    finally:
        frontend.screenshot(f"template-{RUN_TEMPLATE.name}-after-run")


def test_run_shows_an_image(finished_run):
    assert finished_run[0]["src"].split("?")[0].endswith("/view"), finished_run
    assert finished_run[0]["width"] > 1 and finished_run[0]["height"] > 1


def test_run_report_appears_on_the_chipmunk_node(frontend, finished_run):
    """The pack sends a run report as ComfyUI progress text to the Chipmunk node after each
    sampling run (front end: text under the node). Fails until nodes/ sends it."""
    deadline = time.monotonic() + 10
    text = frontend.progress_text(ACCELERATE_TYPE)
    while not text and time.monotonic() < deadline:
        time.sleep(0.5)
        text = frontend.progress_text(ACCELERATE_TYPE)
    frontend.screenshot("chipmunk-run-report")
    assert text and text.startswith("Chipmunk"), (
        f"no run report on the {ACCELERATE_TITLE} node (progress text: {text!r}); the pack must "
        "send one with PromptServer.send_progress_text after each sampling run")
    if RUN_TEMPLATE.section == PACK_NAME:  # a toy template, run on this CPU as a user runs it
        first_line = text.splitlines()[0]
        assert "ran stock" in first_line and "needs a CUDA GPU" in first_line, text


def test_on_the_cpu_the_chipmunk_picture_is_the_dense_picture(browser_server, finished_run):
    """The toy template saves Chipmunk's picture and the dense one: on a CPU the node runs stock,
    so they are the same picture."""
    if RUN_TEMPLATE.section != PACK_NAME:
        pytest.skip("the tiny stand-in workflow has one picture")
    from PIL import Image

    history = browser_server.get_json("/history")
    entry = list(history.values())[-1]
    pictures = [browser_server.output_dir / image["subfolder"] / image["filename"]
                for output in entry["outputs"].values() for image in output.get("images", [])]
    assert len(pictures) == 2, pictures
    chipmunk, dense = (Image.open(path).convert("RGB").tobytes() for path in pictures)
    assert chipmunk == dense, pictures


OTHER_TOY_TEMPLATES = [path.stem for path in BUNDLED
                       if not declared_models(load(path)) and path.stem != RUN_TEMPLATE.name]


@pytest.mark.parametrize("name", OTHER_TOY_TEMPLATES)
def test_every_other_template_without_downloads_runs_and_tells_the_truth(frontend, browser_server, finished_run,
                                                                         name):
    """Each of the other templates that need no download (the toy video) runs from the template
    browser on this CPU: the node's first report line says it ran stock and why, and Chipmunk's
    clip is the dense clip, frame for frame, and not blank."""
    from PIL import Image, ImageSequence

    frontend.load_template(PACK_NAME, name)
    before = set(browser_server.get_json("/history"))
    frontend.press_run()
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        new = [entry for key, entry in browser_server.get_json("/history").items() if key not in before]
        failed = [entry for entry in new if entry.get("status", {}).get("status_str") == "error"]
        if failed:
            raise ComfyServerError(f"{name} failed:\n{format_execution_error(failed[0]['status'])}\n"
                                   f"{browser_server.log_tail()}")
        done = [entry for entry in new if entry.get("status", {}).get("completed")]
        if done:
            break
        if time.monotonic() > deadline:
            raise ComfyServerError(f"{name}: not finished {RUN_TIMEOUT:.0f} s after Run\n{browser_server.log_tail()}")
        time.sleep(1.0)
    text = frontend.progress_text(ACCELERATE_TYPE)
    while not text and time.monotonic() < deadline:
        time.sleep(0.5)
        text = frontend.progress_text(ACCELERATE_TYPE)
    frontend.screenshot(f"template-{name}-after-run")
    assert text, f"no run report on the {ACCELERATE_TITLE} node"
    first_line = text.splitlines()[0]
    assert "ran stock" in first_line and "needs a CUDA GPU" in first_line, text
    pictures = [browser_server.output_dir / image["subfolder"] / image["filename"]
                for output in done[0]["outputs"].values() for image in output.get("images", [])]
    assert len(pictures) == 2, pictures
    clips = [[frame.convert("RGB").tobytes() for frame in ImageSequence.Iterator(Image.open(path))]
             for path in pictures]
    assert clips[0] == clips[1], pictures
    assert len(set(clips[0][0])) > 16, "the first frame is blank"
