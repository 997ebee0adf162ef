"""Every kernel's default configuration compiles for Ampere, Ada and Hopper, within each one's
shared memory (bench/compile_check.py; Triton compiles to cubins on the CPU, no GPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_default_configurations_compile_for_sm80_sm86_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(REPO / "bench" / "compile_check.py"), "--archs", "80,86,90",
                             "--dtypes", "bf16"], capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all compiled" in result.stdout
