"""A headless Chromium driven through the DevTools protocol (CDP), for the browser tests.

Only what the tests need: start the browser on a fresh profile, open one page, evaluate
JavaScript, send real mouse and keyboard input, and take screenshots. The protocol runs over a
websocket from aiohttp (a ComfyUI requirement already), on an event loop in a background thread,
so the tests call plain blocking methods. The browser is the system's Chromium (Debian's
``chromium``; tools/setup_browser.sh installs it): nothing here downloads a browser.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import aiohttp

from .processes import end_process

CHROMIUM_ENV = "CHIPMUNK_CHROMIUM"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
)
# Keys the tests press: DOM key name -> (code, Windows virtual key code).
KEYS = {"Enter": ("Enter", 13), "Escape": ("Escape", 27), "Tab": ("Tab", 9)}


class BrowserError(RuntimeError):
    """The browser died, a protocol call failed, or a page script threw."""


def find_chromium() -> str | None:
    """``$CHIPMUNK_CHROMIUM``, else a ``chromium`` / ``chromium-browser`` on PATH."""
    override = os.environ.get(CHROMIUM_ENV)
    if override:
        return override if os.access(override, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless Chromium process with one page. ``start()`` opens ``about:blank``."""

    def __init__(self, executable: str, workdir: Path, width: int = 1600, height: int = 1000):
        self.executable = executable
        self.workdir = Path(workdir)
        self.width, self.height = width, height
        self.console: list[str] = []  # console messages and uncaught exceptions of the page
        self.process: subprocess.Popen | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cdp", daemon=True)
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._log_file = None

    # --- life cycle ------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "Browser":
        profile = self.workdir / "profile"
        if profile.exists():
            shutil.rmtree(profile)
        profile.mkdir(parents=True)
        self._log_file = open(self.workdir / "chromium.log", "w")
        self.process = subprocess.Popen(
            [self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            if self.process.poll() is not None:
                raise BrowserError(f"Chromium exited with code {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BrowserError(f"Chromium gave no DevTools port within {timeout:.0f} s\n"
                                   f"{self.log_tail()}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self._thread.start()
        self._call(self._connect(port), timeout)
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self._call(self._disconnect(), 10)
            except Exception:  # the browser may already be gone; the process is ended below
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        end_process(self.process, timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, chars: int = 3000) -> str:
        path = self.workdir / "chromium.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def console_tail(self, lines: int = 30) -> str:
        return "\n".join(self.console[-lines:])

    # --- protocol --------------------------------------------------------------------------
    def send(self, method: str, timeout: float = 60.0, **params) -> dict:
        """One CDP command on the page; returns its result."""
        return self._call(self._send(method, params), timeout)

    def evaluate(self, expression: str, timeout: float = 60.0):
        """The JSON value of a JavaScript expression (promises are awaited)."""
        reply = self.send("Runtime.evaluate", timeout=timeout, expression=expression,
                          returnByValue=True, awaitPromise=True, userGesture=True)
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            message = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"script failed: {message}\n--- script ---\n{expression}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str, interval: float = 0.25):
        """Evaluate ``expression`` until it is truthy; returns that value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                                   f"--- page console ---\n{self.console_tail()}")
            self._raise_if_dead()
            time.sleep(interval)

    def navigate(self, url: str) -> None:
        reply = self.send("Page.navigate", url=url)
        if reply.get("errorText"):
            raise BrowserError(f"cannot open {url}: {reply['errorText']}")

    def screenshot(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    # --- input -----------------------------------------------------------------------------
    def click(self, x: float, y: float, clicks: int = 1) -> None:
        """Real mouse clicks at page coordinates (``clicks=2``: a double click)."""
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for count in range(1, clicks + 1):
            for kind in ("mousePressed", "mouseReleased"):
                self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                          buttons=1 if kind == "mousePressed" else 0, clickCount=count)

    def click_element(self, element_expression: str, what: str, timeout: float = 30.0) -> None:
        """Click the centre of the element an expression returns, once it is on top there and
        has stopped moving: no animation runs on it or its ancestors (dialogs open with one) and
        its position is the same twice in a row."""
        locate = (
            f"(() => {{ const el = ({element_expression}); if (!el) return null;"
            " for (let n = el; n; n = n.parentElement)"
            "   if (n.getAnimations().some(a => a.playState === 'running')) return null;"
            " el.scrollIntoView({block: 'nearest'}); const r = el.getBoundingClientRect();"
            " if (r.width <= 0 || r.height <= 0) return null;"
            " const x = r.x + r.width / 2, y = r.y + r.height / 2;"
            " const hit = document.elementFromPoint(x, y);"
            " return hit && (hit === el || el.contains(hit)) ? [x, y] : null; })()")
        deadline = time.monotonic() + timeout
        previous = None
        while True:
            point = self.wait_for(locate, max(deadline - time.monotonic(), 0), what)
            if point == previous:
                self.click(*point)
                return
            previous = point
            time.sleep(0.2)

    def type_text(self, text: str) -> None:
        """Text into the focused element, as typed (input events fire)."""
        self.send("Input.insertText", text=text)

    def press(self, key: str) -> None:
        code, virtual_key = KEYS[key]
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key=key, code=code,
                      windowsVirtualKeyCode=virtual_key)

    # --- internals (run on the event loop thread) ------------------------------------------
    def _call(self, coroutine, timeout: float):
        self._raise_if_dead()
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise BrowserError(f"no answer from Chromium within {timeout:.0f} s") from None

    def _raise_if_dead(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise BrowserError(f"Chromium exited with code {self.process.returncode}\n"
                               f"{self.log_tail()}")

    async def _connect(self, port: int) -> None:
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json(content_type=None)
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.ensure_future(self._read())

    async def _disconnect(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()

    async def _send(self, method: str, params: dict) -> dict:
        message_id = next(self._ids)
        future = self._loop.create_future()
        self._pending[message_id] = future
        await self._ws.send_str(json.dumps({"id": message_id, "method": method, "params": params}))
        try:
            reply = await future
        finally:
            self._pending.pop(message_id, None)
        if "error" in reply:
            raise BrowserError(f"{method} failed: {reply['error'].get('message')}")
        return reply.get("result", {})

    async def _read(self) -> None:
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.get(data["id"])
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self._on_event(data.get("method"), data.get("params", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BrowserError("the DevTools connection closed"))

    def _on_event(self, method: str, params: dict) -> None:
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(arg.get("value", arg.get("description", "")))
                            for arg in params.get("args", []))
            self.console.append(f"console.{params.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.console.append("exception: " + (details.get("exception", {}).get("description")
                                                 or details.get("text", "")))
