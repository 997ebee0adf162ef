"""Child processes of the harness (the ComfyUI server, Chromium)."""
from __future__ import annotations

import subprocess


def end_process(process: subprocess.Popen | None, timeout: float) -> None:
    """Terminate ``process`` if it still runs; kill it if it has not exited after ``timeout`` s."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
