"""What a person does in ComfyUI's web front end, as browser actions (front end 1.42, ComfyUI
v0.19.3): open the app, search for a node, open the template browser, load a template, press Run,
and read back what the page shows.

Elements are found the way a person finds them (visible text, the front end's own
``data-testid`` attributes and button classes) and clicked with real mouse events; the graph is
read through ``window.app``, the object the front end exposes to extensions.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from harness.browser import Browser, BrowserError

TEMPLATE_DIALOG = "document.querySelector('[data-testid=\"template-workflows-content\"]')"
ERROR_OVERLAY = "document.querySelector('[data-testid=\"error-overlay\"]')"
# The widget the front end adds to a node to show its progress text (``progress_text`` messages).
PROGRESS_TEXT_WIDGET = "$$node-text-preview"
# The canvas draws nodes without text once their text would be smaller than this many pixels
# (default 8); 0 keeps the text at every zoom, since the screenshots are for people to read.
MIN_FONT_SIZE_FOR_DETAIL = 0


def js(value) -> str:
    """A Python value as a JavaScript literal."""
    return json.dumps(value)


def visible_text_element(selector: str, text: str, root: str = "document") -> str:
    """JS expression: the first visible element matching ``selector`` whose text is ``text``."""
    return (f"[...{root}.querySelectorAll({js(selector)})].find(e => e.offsetParent !== null"
            f" && e.innerText.trim() === {js(text)})")


class ComfyFrontEnd:
    def __init__(self, browser: Browser, url: str, screenshot_dir: Path):
        self.browser = browser
        self.url = url
        self.screenshot_dir = Path(screenshot_dir)
        self.screenshots: list[Path] = []

    # --- page ------------------------------------------------------------------------------
    def open(self, timeout: float = 120.0) -> None:
        """Load the app; close the template browser a new user is greeted with."""
        self.browser.navigate(self.url)
        self.browser.wait_for("!!(window.app && window.app.canvas && window.app.extensionManager"
                              " && document.querySelector('.templates-tab-button'))",
                              timeout, "the ComfyUI front end to start")
        self.browser.evaluate("app.extensionManager.setting.set('LiteGraph.Canvas.MinFontSizeForLOD',"
                              f" {MIN_FONT_SIZE_FOR_DETAIL})")
        # A new user (the server's user folder is fresh) is greeted with the template browser,
        # opened once the app has set up its first workflow: close it.
        try:
            self.browser.wait_for("!!" + TEMPLATE_DIALOG, 60, "the first-visit template browser")
        except BrowserError:
            return
        self.close_dialog()

    def screenshot(self, name: str) -> Path:
        time.sleep(0.5)  # let the canvas draw the last change
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")
        path = self.browser.screenshot(self.screenshot_dir / f"{len(self.screenshots) + 1:02d}-{slug}.png")
        self.screenshots.append(path)
        return path

    def close_dialog(self) -> None:
        self.browser.press("Escape")
        self.browser.wait_for("!document.querySelector('.p-dialog')", 10, "the dialog to close")

    def open_dialogs(self) -> list[str]:
        """Text of every dialog on screen."""
        return self.browser.evaluate("[...document.querySelectorAll('.p-dialog')]"
                                     ".map(d => d.innerText.trim().slice(0, 500))")

    def error_overlay(self) -> str | None:
        return self.browser.evaluate(f"(() => {{ const e = {ERROR_OVERLAY}; return e ? e.innerText : null; }})()")

    # --- node search -----------------------------------------------------------------------
    def search_nodes(self, query: str) -> list[str]:
        """Double-click empty canvas, type into the search box; returns the result titles."""
        x, y = self.empty_canvas_point()
        self.browser.click(x, y, clicks=2)
        self.browser.wait_for("document.activeElement && document.activeElement.tagName === 'INPUT'"
                              " && !!document.activeElement.closest('.p-dialog')",
                              15, "the node search box")
        self.browser.type_text(query)
        return self.browser.wait_for(
            "(() => { const items = [...document.activeElement.closest('.p-dialog')"
            ".querySelectorAll('[data-testid=\"result-item\"]')];"
            " return items.length ? items.map(i => i.innerText.split('\\n')[0].trim()) : null; })()",
            15, f"node search results for {query!r}")

    def empty_canvas_point(self) -> tuple[float, float]:
        """Page coordinates of a canvas point with no node under it."""
        point = self.browser.evaluate("""(() => {
            const c = app.canvas, r = c.canvas.getBoundingClientRect();
            for (let fy = 0.85; fy > 0.1; fy -= 0.05) for (let fx = 0.3; fx < 0.7; fx += 0.05) {
                const x = r.x + r.width * fx, y = r.y + r.height * fy;
                const [gx, gy] = c.convertEventToCanvasOffset({clientX: x, clientY: y});
                const top = document.elementFromPoint(x, y);
                if (top === c.canvas && !app.graph.getNodeOnPos(gx, gy)
                    && !(app.graph.getGroupOnPos && app.graph.getGroupOnPos(gx, gy))) return [x, y];
            }
            return null; })()""")
        if point is None:
            raise BrowserError("no empty spot on the canvas to double-click")
        return tuple(point)

    # --- template browser ------------------------------------------------------------------
    def open_templates(self, section: str) -> None:
        """Sidebar "Templates" button, then ``section`` in the browser's navigation."""
        self.browser.click_element("document.querySelector('.templates-tab-button')",
                                   "the sidebar's Templates button")
        self.browser.wait_for("!!" + TEMPLATE_DIALOG, 30, "the template browser")
        # The section's name then shows twice: in the navigation and as the page's title. While
        # the browser is busy loading the other templates' pictures a click can miss: retry.
        opened = (f"[...document.querySelectorAll('.p-dialog span')].filter(e => e.offsetParent !== null"
                  f" && e.innerText.trim() === {js(section)}).length >= 2")
        for attempt in range(1, 4):
            self.browser.click_element(visible_text_element(".p-dialog span", section),
                                       f"the template section {section!r}")
            try:
                self.browser.wait_for(opened, 10, f"the template section {section!r} to open")
                return
            except BrowserError:
                self.screenshot(f"template-section-not-open-{attempt}")
                if attempt == 3:
                    raise

    def template_cards(self) -> dict[str, dict]:
        """The cards on screen, by template name: title, description, thumbnail and whether the
        thumbnail came from the template's own picture (not the front end's placeholder)."""
        return self.browser.wait_for("""(() => {
            const cards = [...document.querySelectorAll('[data-testid^="template-workflow-"]')];
            const imgs = cards.map(c => c.querySelector('img'));
            if (!cards.length || imgs.some(i => !i || !i.complete)) return null;
            return Object.fromEntries(cards.map(c => {
                const img = c.querySelector('img');
                return [c.dataset.testid.slice('template-workflow-'.length), {
                    title: c.querySelector('h3') ? c.querySelector('h3').innerText.trim() : null,
                    description: c.querySelector('p') ? c.querySelector('p').innerText.trim() : null,
                    thumbnail: img ? decodeURIComponent(img.src) : null,
                    thumbnail_width: img ? img.naturalWidth : 0}];
            })); })()""", 30, "template cards with their thumbnails")

    def load_template(self, section: str, name: str) -> None:
        """Open the template browser at ``section`` and click the ``name`` card."""
        self.open_templates(section)
        selector = "[data-testid=" + js(f"template-workflow-{name}") + "]"
        card = f"document.querySelector({js(selector)})"
        self.browser.click_element(card, f"the template card {name!r}")
        self.browser.wait_for(f"!{TEMPLATE_DIALOG}", 30, "the template browser to close")
        self.browser.wait_for("app.graph.nodes.length > 0", 30, "the template's nodes on the canvas")
        time.sleep(1.0)  # the missing-model scan runs after the graph is configured

    # --- graph -----------------------------------------------------------------------------
    def graph_nodes(self) -> list[dict]:
        """id, type and whether the front end knows the node type, for every node on the canvas."""
        return self.browser.evaluate(
            "app.graph.nodes.map(n => ({id: n.id, type: n.type,"
            " registered: !!LiteGraph.registered_node_types[n.type]}))")

    def node_images(self, node_id: int) -> list[dict]:
        """Images a node shows on the canvas (its preview), with their loaded sizes."""
        return self.browser.evaluate(
            f"(() => {{ const n = app.graph.getNodeById({js(node_id)});"
            " return (n && n.imgs || []).map(i => ({src: i.src, complete: i.complete,"
            " width: i.naturalWidth, height: i.naturalHeight})); })()")

    def progress_text(self, node_type: str) -> str | None:
        """The progress text the front end shows on the first node of ``node_type``."""
        return self.browser.evaluate(
            f"(() => {{ const n = app.graph.nodes.find(n => n.type === {js(node_type)});"
            f" const w = n && (n.widgets || []).find(w => w.name === {js(PROGRESS_TEXT_WIDGET)});"
            " return w ? String(w.value) : null; })()")

    def press_run(self) -> None:
        self.browser.click_element("document.querySelector('[data-testid=\"queue-button\"]')",
                                   "the Run button")

    def missing_models_panel(self) -> str:
        """Press "See Errors" on the error overlay; returns the errors panel's text."""
        self.browser.click_element(visible_text_element("button", "See Errors"), "See Errors")
        return self.browser.wait_for(
            "(() => { const p = document.querySelector('[data-testid=\"properties-panel\"]');"
            " return p && /Download/.test(p.innerText) ? p.innerText : null; })()",
            15, "the errors panel with the missing models")

    def close_side_panel(self) -> None:
        """Close the right-hand panel (errors, parameters) with its own toggle button."""
        panel = "document.querySelector('[data-testid=\"properties-panel\"]')"
        self.browser.click_element(
            f"[...{panel}.querySelectorAll('button')]"
            ".find(b => /panel/i.test(b.getAttribute('aria-label') || ''))", "the panel's close button")
        self.browser.wait_for(f"!{panel}", 10, "the right-hand panel to close")
