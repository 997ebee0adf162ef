"""A real ComfyUI server in a subprocess, and the HTTP calls tests make to it.

The server runs from the ComfyUI checkout with ``--cpu`` on a free loopback port, with all its
folders (input, output, temp, user, database) under one scratch directory, and loads exactly two
custom-node packages through an ``extra_model_paths.yaml``: the pack (linked, not copied) and the
development nodes. Extra model folders (the tiny checkpoints) come in through the same file.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from .paths import link_custom_nodes
from .processes import end_process

LOG_TAIL_CHARS = 6000


class ComfyServerError(RuntimeError):
    """The server rejected a prompt, failed running it, or died."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def frontend_package_installed() -> bool:
    return importlib.util.find_spec("comfyui_frontend_package") is not None


def write_extra_model_paths(path: Path, custom_nodes: Path,
                            model_folders: dict[str, list[Path]]) -> Path:
    """An ``extra_model_paths.yaml`` adding ``custom_nodes`` and model folders (absolute paths)."""
    entries = {"custom_nodes": [custom_nodes], **model_folders}
    lines = ["chipmunk:"]
    for kind, folders in entries.items():
        lines.append(f"  {kind}: |")
        lines.extend(f"    {folder}" for folder in folders)
    path.write_text("\n".join(lines) + "\n")
    return path


class ComfyServer:
    """One ComfyUI server process; ``start()`` returns once it answers HTTP."""

    def __init__(self, comfyui_dir: Path, workdir: Path,
                 model_folders: dict[str, list[Path]] | None = None,
                 python: str = sys.executable, extra_args: tuple[str, ...] = ()):
        self.comfyui_dir = Path(comfyui_dir)
        self.workdir = Path(workdir)
        self.model_folders = model_folders or {}
        self.python = python
        self.extra_args = tuple(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_dir = self.workdir / "base"
        self.output_dir = self.base_dir / "output"
        self.log_path = self.workdir / "server.log"
        self.process: subprocess.Popen | None = None
        self._log_file = None

    def command(self) -> list[str]:
        custom_nodes = link_custom_nodes(self.workdir / "custom_nodes")
        config = write_extra_model_paths(self.workdir / "extra_model_paths.yaml", custom_nodes,
                                         self.model_folders)
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--disable-api-nodes",
               "--base-directory", str(self.base_dir),
               "--output-directory", str(self.output_dir),
               "--database-url", f"sqlite:///{self.workdir / 'comfyui.db'}",
               "--extra-model-paths-config", str(config)]
        if not frontend_package_installed():
            empty = self.workdir / "no-frontend"
            empty.mkdir(exist_ok=True)
            cmd += ["--front-end-root", str(empty)]
        return cmd + list(self.extra_args)

    def start(self, timeout: float = 300.0) -> "ComfyServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        # ComfyUI lists <base>/custom_nodes at start-up but does not create it.
        (self.base_dir / "custom_nodes").mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log_file = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command(), cwd=self.comfyui_dir, env=env,
                                        stdin=subprocess.DEVNULL, stdout=self._log_file,
                                        stderr=subprocess.STDOUT,
                                        preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._raise_if_dead("while starting")
            try:
                if requests.get(f"{self.url}/system_stats", timeout=5).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise ComfyServerError(f"ComfyUI did not answer within {timeout:.0f} s\n{self.log_tail()}")

    def stop(self) -> None:
        end_process(self.process, timeout=30)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # --- logs ------------------------------------------------------------------------------
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return "--- ComfyUI log (tail) ---\n" + self.log_text()[-chars:]

    def _raise_if_dead(self, doing: str) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise ComfyServerError(f"ComfyUI exited with code {self.process.returncode} "
                                   f"{doing}\n{self.log_tail()}")

    # --- HTTP ------------------------------------------------------------------------------
    def get_json(self, route: str, timeout: float = 60.0):
        response = requests.get(f"{self.url}{route}", timeout=timeout)
        response.raise_for_status()
        return response.json()

    def object_info(self, node_class: str | None = None) -> dict:
        """``/object_info`` (all nodes), or one node's entry (empty dict when unknown)."""
        if node_class is None:
            return self.get_json("/object_info")
        return self.get_json(f"/object_info/{node_class}").get(node_class, {})

    def queue_prompt(self, prompt: dict) -> str:
        """POST an API-format prompt; returns its id. Validation errors raise, node by node."""
        response = requests.post(f"{self.url}/prompt", json={"prompt": prompt}, timeout=60)
        if response.status_code != 200:
            raise ComfyServerError(f"/prompt rejected the prompt ({response.status_code}):\n"
                                   f"{format_rejection(response)}")
        return response.json()["prompt_id"]

    def wait_for(self, prompt_id: str, timeout: float = 900.0) -> dict:
        """Poll ``/history/<id>`` until the prompt finished; returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._raise_if_dead(f"while running prompt {prompt_id}")
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    raise ComfyServerError(f"prompt {prompt_id} failed:\n"
                                           f"{format_execution_error(status)}\n{self.log_tail()}")
                return entry
            time.sleep(0.25)
        raise ComfyServerError(f"prompt {prompt_id} not finished after {timeout:.0f} s\n"
                               f"{self.log_tail()}")

    def run_prompt(self, prompt: dict, timeout: float = 900.0) -> dict:
        return self.wait_for(self.queue_prompt(prompt), timeout)

    def run_prompt_with_texts(self, prompt: dict, timeout: float = 900.0) -> tuple[dict, dict[str, list[str]]]:
        """Run a prompt as the front end does (a websocket client id) and collect the progress
        texts the server sent to nodes while it ran: (history entry, {node id: [texts]})."""
        import asyncio
        import uuid

        import aiohttp

        client_id = uuid.uuid4().hex
        texts: dict[str, list[str]] = {}

        async def listen():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"{self.url.replace('http', 'ws', 1)}/ws?clientId={client_id}") as ws:
                    response = await session.post(f"{self.url}/prompt",
                                                  json={"prompt": prompt, "client_id": client_id})
                    if response.status != 200:
                        raise ComfyServerError(f"/prompt rejected the prompt ({response.status}): "
                                               f"{await response.text()}")
                    prompt_id = (await response.json())["prompt_id"]
                    async for message in ws:
                        if message.type == aiohttp.WSMsgType.BINARY:
                            _collect_text(message.data, texts)
                        elif message.type == aiohttp.WSMsgType.TEXT:
                            event = json.loads(message.data)
                            data = event.get("data", {})
                            if data.get("prompt_id") == prompt_id and (
                                    event["type"] in ("execution_success", "execution_error")
                                    or (event["type"] == "executing" and data.get("node") is None)):
                                return prompt_id
                    raise ComfyServerError("the websocket closed before the prompt finished")

        prompt_id = asyncio.run(asyncio.wait_for(listen(), timeout))
        return self.wait_for(prompt_id, timeout), texts

    # --- outputs ---------------------------------------------------------------------------
    def output_files(self, entry: dict, node_id: str, kind: str) -> list[Path]:
        """Files a node reported in its UI output (``kind``: "latents", "images", ...)."""
        try:
            records = entry["outputs"][node_id][kind]
        except KeyError:
            raise ComfyServerError(f"node {node_id} reported no {kind!r}; outputs: "
                                   f"{json.dumps(entry.get('outputs'))[:2000]}") from None
        return [self.output_dir / r.get("subfolder", "") / r["filename"] for r in records]

    def read_latent(self, entry: dict, node_id: str):
        """The tensor a SaveLatent node wrote (``latent_tensor`` in its .latent file)."""
        from safetensors.torch import load_file

        (path,) = self.output_files(entry, node_id, "latents")
        return load_file(str(path))["latent_tensor"]


# ComfyUI's binary websocket events: 4-byte big-endian type, then the payload. Type 3 (TEXT) is
# a progress text for a node: 4-byte node-id length, node id, UTF-8 text.
_TEXT_EVENT = 3


def _collect_text(data: bytes, texts: dict[str, list[str]]) -> None:
    import struct

    if len(data) < 8 or struct.unpack(">I", data[:4])[0] != _TEXT_EVENT:
        return
    (length,) = struct.unpack(">I", data[4:8])
    node_id = data[8:8 + length].decode("utf-8")
    texts.setdefault(node_id, []).append(data[8 + length:].decode("utf-8"))


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the test process dies, so that a
    killed test run leaves no server behind."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def format_rejection(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text
    lines = []
    error = body.get("error") or {}
    if error:
        lines.append(f"{error.get('type')}: {error.get('message')} {error.get('details', '')}")
    for node_id, node_error in (body.get("node_errors") or {}).items():
        for err in node_error.get("errors", []):
            lines.append(f"  node {node_id} ({node_error.get('class_type')}): "
                         f"{err.get('message')} {err.get('details', '')}")
    return "\n".join(lines) or json.dumps(body)


def format_execution_error(status: dict) -> str:
    lines = []
    for kind, data in status.get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            lines.append(f"{kind} in node {data.get('node_id')} ({data.get('node_type')}): "
                         f"{data.get('exception_type')}: {data.get('exception_message')}")
            lines.extend(data.get("traceback") or [])
    return "\n".join(lines) or json.dumps(status)
