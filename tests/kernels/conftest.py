"""Run the Triton kernels on the CPU through Triton's interpreter.

Triton must see TRITON_INTERPRET=1 when it is first imported (its own library functions are
``@triton.jit`` too) and when the kernel modules are imported. This conftest sets it as it loads,
which is before any test module here imports Triton, as long as nothing earlier in the process
imported Triton; and on a machine with a GPU it leaves the process alone, so that other tests keep
compiled kernels. In those two cases the ``interpreted`` fixture runs this directory's parity
tests once in a fresh interpreter process with the variable set, and reports that run's result.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[2]


def _can_interpret_here() -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if "triton" in sys.modules:
        return False
    import torch

    return not torch.cuda.is_available()


_IN_PROCESS = _can_interpret_here()
if _IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"

_KERNEL_MODULES = ("chipmunk_pack.kernels.attention_triton", "chipmunk_pack.kernels.mlp_triton",
                   "chipmunk_pack.kernels.index_lists_triton", "chipmunk_pack.kernels.block_ops_triton")


def _patch_bf16_dot_if_broken():
    """Some Triton interpreters (3.8 here) multiply the raw bits of bf16 operands in ``tl.dot``
    (they keep bf16 as uint16 in numpy). Detect that with a probe and, only then, make the
    interpreter's dot widen bf16 operands to float32 first: exact products, as on tensor cores."""
    import numpy as np
    import torch
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    @triton.jit
    def probe(X, Y):
        i = tl.arange(0, 16)
        x = tl.load(X + i[:, None] * 16 + i[None, :])
        tl.store(Y + i[:, None] * 16 + i[None, :], tl.dot(x, x))

    x = torch.randn(16, 16).bfloat16()
    y = torch.empty(16, 16)
    probe[(1,)](x, y)
    if torch.allclose(y, x.float() @ x.float(), rtol=1e-3, atol=1e-3):
        return
    original = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


def _reload_kernel_modules():
    return {name.rsplit(".", 1)[1]: importlib.reload(importlib.import_module(name)) for name in _KERNEL_MODULES}


@pytest.fixture(scope="session")
def _parity_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).parent)],
                          cwd=_REPO / "tests", env=env, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="session")
def interpreted(request):
    """The Triton kernel modules, imported under the interpreter (CPU tensors)."""
    pytest.importorskip("triton")
    if not _IN_PROCESS:
        result = request.getfixturevalue("_parity_in_subprocess")
        if result.returncode != 0:
            pytest.fail("interpreter parity tests failed in a fresh process:\n" + result.stdout[-6000:] + result.stderr[-2000:])
        pytest.skip("Triton was already imported (or a GPU is present) in this process; the parity tests ran in a "
                    "fresh process with TRITON_INTERPRET=1 and passed: " + result.stdout.strip().splitlines()[-1])
    _patch_bf16_dot_if_broken()
    return _reload_kernel_modules()
