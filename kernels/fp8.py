"""fp8 storage of cached values (the optional fp8 caches): float8_e4m3fn with one float32 scale per
row. The reference of what the Triton kernels write and read; pure tensor code."""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_rows(values: torch.Tensor, headroom: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` [..., D] as float8_e4m3fn with one float32 scale per row: ``scale = max|row| *
    headroom / 448`` (1 for a zero row), so that ``fp8 * scale`` is the row to fp8's 3-bit mantissa.
    ``headroom`` > 1 leaves room for later values up to that many times the row's largest (fp8 is a
    float: that costs range at the small end, not precision). Both kernels round to nearest, ties to
    even (Triton's interpreter on the CPU may differ by one step)."""
    values = values.float()
    amax = values.abs().amax(-1)
    scale = torch.where(amax > 0, amax * (headroom / FP8_MAX), torch.ones_like(amax))
    return (values / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def check_scales(values, scale, name: str, shape) -> None:
    """An fp8 tensor ``values`` comes with its float32 scales (``shape``), and only an fp8 tensor
    does: else a ValueError naming ``name`` and ``name``_scale (launchers check before any kernel)."""
    is_fp8 = values is not None and values.dtype == FP8
    if is_fp8 != (scale is not None):
        raise ValueError(f"{name} is {None if values is None else values.dtype}: fp8 values need {name}_scale, "
                         "and only they do")
    if scale is not None and (scale.dtype != torch.float32 or tuple(scale.shape) != tuple(shape)):
        raise ValueError(f"{name}_scale must be float32 {tuple(shape)}, got {scale.dtype} {tuple(scale.shape)}")
