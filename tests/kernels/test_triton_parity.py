"""Triton kernels == PyTorch references, run on the CPU through Triton's interpreter.

Shapes are tiny (the interpreter is ~100x slower than torch) but keep the real head dims (64,
128) and cover the awkward cases: token counts that are not a multiple of the group or the tile,
empty and full key lists, one and several heads, batch > 1, bf16 and fp16, strided views.
Outputs are filled with NaN first, so an element the kernel fails to write fails the test; the
references run in float32 on the same half-precision inputs.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from chipmunk_pack.kernels.attention_reference import attention_with_column_sums_reference, column_sparse_attention_reference
from chipmunk_pack.kernels.mlp_reference import sparse_mlp_delta_reference

TOLERANCE = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def assert_matches(actual, expected, dtype, what):
    actual, expected = actual.float(), expected.float()
    assert not actual.isnan().any(), f"{what}: NaN (an element was not written)"
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    err = float((actual - expected).norm() / expected.norm().clamp_min(1e-12))
    assert err < TOLERANCE[dtype], f"{what}: relative error {err:.2e}"
    worst = float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    assert worst < 8 * TOLERANCE[dtype], f"{what}: worst element off by {worst:.2e} of the largest"


def mlp_inputs(gen, b, n, d_in, m, d_out, block, capacity, dtype):
    """Inputs of a sparse MLP case: x, fc1 (weight, bias), fc2, and per batch row and row block a
    sorted list of ``capacity`` distinct units (int32)."""
    x = torch.randn(b, n, d_in, generator=gen).to(dtype)
    w1 = (torch.randn(m, d_in, generator=gen) * d_in ** -0.5).to(dtype)
    b1 = (0.1 * torch.randn(m, generator=gen)).to(dtype)
    w2 = (torch.randn(d_out, m, generator=gen) * m ** -0.5).to(dtype)
    n_blocks = math.ceil(n / block)
    units = torch.stack([torch.randperm(m, generator=gen)[:capacity].sort().values
                         for _ in range(b * n_blocks)]).view(b, n_blocks, capacity).int()
    return x, w1, b1, w2, units


def qkv_views(gen, b, h, n, d, dtype, layout):
    """q, k, v as [B, H, N, D]; "bnhd" gives transposed views of [B, N, H, D] buffers (what models hold)."""
    if layout == "bnhd":
        return [torch.randn(b, n, h, d, generator=gen).to(dtype).transpose(1, 2) for _ in range(3)]
    return [torch.randn(b, h, n, d, generator=gen).to(dtype) for _ in range(3)]


def output_view(b, h, n, d, dtype, layout):
    """A NaN-filled output view; for "bnhd" one extra head in the buffer must stay untouched."""
    if layout == "bnhd":
        buffer = torch.full((b, n, h + 1, d), float("nan"), dtype=dtype)
        return buffer, buffer[:, :, :h].transpose(1, 2), buffer[:, :, h]
    buffer = torch.full((b, h, n, d), float("nan"), dtype=dtype)
    return buffer, buffer, None


def key_lists(gen, b, h, n_groups, n_keys, capacity, counts_rule):
    """Sorted random key lists; entries past each count are junk ids that must never be read."""
    idx = torch.stack([torch.randperm(n_keys, generator=gen)[:capacity].sort().values
                       for _ in range(b * h * n_groups)]).view(b, h, n_groups, capacity).int()
    if counts_rule == "full":
        counts = torch.full((b, h, n_groups), capacity, dtype=torch.int32)
    else:
        counts = torch.randint(1, capacity + 1, (b, h, n_groups), generator=gen).int()
        counts.view(-1)[0] = 0  # an empty list
        counts.view(-1)[-1] = capacity
        if counts.numel() > 2:
            counts.view(-1)[1] = min(capacity, 64)  # exactly one tile
    junk = torch.arange(capacity) >= counts[..., None]
    idx = torch.where(junk, torch.full_like(idx, 10 ** 6), idx)
    return idx, counts


SPARSE_CASES = [
    # b, h, n, d, group, capacity, counts, dtype, layout, base
    (1, 1, 200, 128, 192, 200, "full", torch.bfloat16, "bhnd", "none"),       # all keys, last group short
    (2, 3, 250, 64, 64, 96, "mixed", torch.float16, "bnhd", "separate"),      # batch, heads, D=64, views
    (1, 2, 300, 128, 128, 150, "mixed", torch.bfloat16, "bhnd", "alias"),     # in-place cache update
    (1, 2, 270, 128, 256, 130, "mixed", torch.float16, "bnhd", "alias"),      # 128-row tiles, short group
    (2, 1, 200, 64, 192, 100, "mixed", torch.bfloat16, "bhnd", "separate"),   # 192 = three 64-row tiles
    (1, 2, 400, 128, 192, 40, "mixed", torch.float16, "bnhd", "separate"),    # lists shorter than a tile
    (1, 4, 130, 128, 64, 130, "full", torch.bfloat16, "bnhd", "alias"),       # several heads, all keys
    (1, 1, 100, 64, 48, 60, "mixed", torch.float16, "bhnd", "separate"),      # 48 = three 16-row tiles
]


@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda c: f"b{c[0]}h{c[1]}n{c[2]}d{c[3]}g{c[4]}-{c[6]}-"
                                                           f"{str(c[7])[6:]}-{c[8]}-{c[9]}")
def test_column_sparse_attention_matches_reference(interpreted, case):
    b, h, n, d, group, capacity, counts_rule, dtype, layout, base_mode = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    q, k, v = qkv_views(gen, b, h, n, d, dtype, layout)
    n_groups = math.ceil(n / group)
    idx, counts = key_lists(gen, b, h, n_groups, n, capacity, counts_rule)
    order = torch.randperm(n, generator=gen).int()
    sign = -1.0 if base_mode == "alias" else 1.0
    base = None if base_mode == "none" else torch.randn(b, h, n, d, generator=gen).to(dtype)

    expected = torch.empty(b, h, n, d)
    column_sparse_attention_reference(q, k, v, idx, counts, order, group, base, expected, sign)

    if base_mode == "alias":
        out = base.clone()
        base_arg, spare = out, None
    else:
        _, out, spare = output_view(b, h, n, d, dtype, layout)
        base_arg = base
    result = interpreted["attention_triton"].column_sparse_attention_triton(
        q, k, v, idx, counts, order, group, base_arg, out, sign)
    assert result is out
    assert_matches(out, expected, dtype, "out")
    if spare is not None:
        assert spare.isnan().all(), "wrote outside the output view"
    if base is not None:  # a group with an empty list leaves its rows at the base exactly
        empty = (counts == 0).nonzero().tolist()
        for bi, hi, g in empty:
            rows = order[g * group:(g + 1) * group].long()
            assert torch.equal(out[bi, hi, rows], base[bi, hi, rows])


DENSE_CASES = [
    # b, h, n, d, group, dtype, layout, hint
    (1, 2, 200, 128, 192, torch.bfloat16, "bhnd", True),
    (2, 1, 150, 64, 64, torch.float16, "bnhd", True),
    (1, 1, 130, 128, 128, torch.float16, "bnhd", False),
    (1, 2, 100, 64, 48, torch.bfloat16, "bhnd", False),   # a group size that is no power of two
    (1, 1, 260, 128, 192, torch.bfloat16, "bnhd", True),   # row tiles straddling groups, N % 64 != 0
    (2, 2, 90, 128, 256, torch.float16, "bhnd", True),     # one short group
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: f"b{c[0]}h{c[1]}n{c[2]}d{c[3]}g{c[4]}-{str(c[5])[6:]}-"
                                                          f"{c[6]}-{'hint' if c[7] else 'exact'}")
def test_attention_with_column_sums_matches_reference(interpreted, case):
    b, h, n, d, group, dtype, layout, with_hint = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    q, k, v = qkv_views(gen, b, h, n, d, dtype, layout)
    order = torch.randperm(n, generator=gen).int()
    expected_out = torch.empty(b, h, n, d)
    _, exact_lse = attention_with_column_sums_reference(q, k, v, order, group, expected_out, None)
    hint = exact_lse + 0.2 * torch.randn(b, h, n, generator=gen) if with_hint else None
    expected_sums, expected_lse = attention_with_column_sums_reference(q, k, v, order, group, expected_out, hint)

    _, out, spare = output_view(b, h, n, d, dtype, layout)
    sums, lse = interpreted["attention_triton"].attention_with_column_sums_triton(q, k, v, order, group, out, hint)
    assert_matches(out, expected_out, dtype, "out")
    if spare is not None:
        assert spare.isnan().all(), "wrote outside the output view"
    assert sums.shape == (b, h, math.ceil(n / group), n) and sums.dtype == torch.float32
    assert lse.shape == (b, h, n) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, expected_lse, rtol=1e-4, atol=1e-4)
    # the sums are accumulated on the tensor cores from bf16 probabilities: ~1e-3 relative
    assert_matches(sums, expected_sums, torch.bfloat16, "column sums")


@pytest.mark.parametrize("with_hint", [True, False], ids=["hint", "exact"])
def test_attention_with_column_sums_over_fewer_keys_than_queries(interpreted, with_hint):
    """Key padding (HunyuanVideo's masked text) reaches the kernel as k/v cut to the valid keys."""
    b, h, n, n_keys, d, group, dtype = 1, 2, 200, 171, 128, 64, torch.bfloat16
    gen = torch.Generator().manual_seed(5 + with_hint)
    q, k, v = qkv_views(gen, b, h, n, d, dtype, "bnhd")
    k, v = k[:, :, :n_keys], v[:, :, :n_keys]
    order = torch.randperm(n, generator=gen).int()
    expected_out = torch.empty(b, h, n, d)
    _, exact_lse = attention_with_column_sums_reference(q, k, v, order, group, expected_out, None)
    hint = exact_lse + 0.2 * torch.randn(b, h, n, generator=gen) if with_hint else None
    expected_sums, expected_lse = attention_with_column_sums_reference(q, k, v, order, group, expected_out, hint)
    _, out, _ = output_view(b, h, n, d, dtype, "bnhd")
    sums, lse = interpreted["attention_triton"].attention_with_column_sums_triton(q, k, v, order, group, out, hint)
    assert sums.shape == (b, h, math.ceil(n / group), n_keys)
    assert_matches(out, expected_out, dtype, "out")
    torch.testing.assert_close(lse, expected_lse, rtol=1e-4, atol=1e-4)
    assert_matches(sums, expected_sums, torch.bfloat16, "column sums")


MLP_CASES = [
    # b, n, d_in, hidden, d_out, block, capacity, counts, dtype, w2 layout, hidden layout, row order, bias
    (1, 200, 128, 256, 96, 128, 256, "full", torch.bfloat16, "row_major", "token", "random", True),
    (2, 150, 64, 192, 80, 64, 70, "mixed", torch.float16, "transposed", "token", "random", False),
    (1, 140, 96, 160, 64, 128, 100, "mixed", torch.bfloat16, "transposed", "unit_major", None, True),
    (2, 100, 64, 128, 48, 48, 40, "mixed", torch.float16, "row_major", "token", None, True),
    (1, 300, 128, 192, 128, 192, 120, "mixed", torch.bfloat16, "transposed", "token", "random", True),
    (1, 90, 64, 96, 40, 128, 96, "full", torch.float16, "transposed", "unit_major", "random", False),
]


@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: f"b{c[0]}n{c[1]}m{c[3]}blk{c[5]}-{c[7]}-{str(c[8])[6:]}-"
                                                        f"w2{c[9]}-{c[10]}-order{c[11]}")
def test_sparse_mlp_delta_matches_reference(interpreted, case):
    b, n, d_in, m, d_out, block, capacity, counts_rule, dtype, w2_layout, hidden_layout, row_order, bias = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    x = torch.randn(b, n, d_in, generator=gen).to(dtype)
    w1 = (torch.randn(m, d_in, generator=gen) * d_in ** -0.5).to(dtype)
    b1 = (0.1 * torch.randn(m, generator=gen)).to(dtype) if bias else None
    w2_dense = (torch.randn(d_out, m, generator=gen) * m ** -0.5).to(dtype)
    w2 = w2_dense if w2_layout == "row_major" else w2_dense.t().contiguous().t()
    n_blocks = math.ceil(n / block)
    units = torch.stack([torch.randperm(m, generator=gen)[:capacity].sort().values
                         for _ in range(b * n_blocks)]).view(b, n_blocks, capacity).int()
    if counts_rule == "full":
        counts = torch.full((b, n_blocks), capacity, dtype=torch.int32)
    else:
        counts = torch.randint(1, capacity + 1, (b, n_blocks), generator=gen).int()
        counts.view(-1)[0] = 0
        counts.view(-1)[-1] = capacity
    units = torch.where(torch.arange(capacity) >= counts[..., None], torch.full_like(units, 10 ** 6), units)
    order = torch.randperm(n, generator=gen).int() if row_order else None
    hidden = torch.randn(b, n, m, generator=gen).to(dtype)
    out = torch.randn(b, n, d_out, generator=gen).to(dtype)

    ref_hidden, ref_out = hidden.float(), out.float()
    sparse_mlp_delta_reference(x, w1, b1, w2_dense, units, counts, order, block, ref_hidden, ref_out)

    kernel_hidden = hidden.clone() if hidden_layout == "token" else hidden.transpose(1, 2).contiguous().transpose(1, 2)
    kernel_out = out.clone()
    interpreted["mlp_triton"].sparse_mlp_delta_triton(x, w1, b1, w2, units, counts, order, block,
                                                      kernel_hidden, kernel_out)
    assert_matches(kernel_hidden, ref_hidden, dtype, "hidden cache")
    # the update itself, not the (large) old cache, is what must match
    assert_matches(kernel_out.float() - out.float(), ref_out - out.float(), dtype, "output update")
    untouched = ref_hidden == hidden.float()
    assert torch.equal(kernel_hidden.float()[untouched], hidden.float()[untouched]), "changed unlisted hidden units"


SPARSE_CONFIG_CASES = [
    # group, config: row tiles other than the default for the group size
    (256, {"block_m": 256, "block_n": 64, "num_warps": 16, "num_stages": 2}),
    (256, {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 2}),
    (128, {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 3}),
]


@pytest.mark.parametrize("group, config", SPARSE_CONFIG_CASES, ids=lambda c: str(c))
def test_column_sparse_attention_row_tiles(interpreted, group, config):
    b, h, n, d, dtype = 1, 2, 300, 64, torch.bfloat16
    gen = torch.Generator().manual_seed(group + config["block_m"])
    q, k, v = qkv_views(gen, b, h, n, d, dtype, "bnhd")
    n_groups = math.ceil(n / group)
    idx, counts = key_lists(gen, b, h, n_groups, n, 150, "mixed")
    order = torch.randperm(n, generator=gen).int()
    base = torch.randn(b, h, n, d, generator=gen).to(dtype)
    expected = torch.empty(b, h, n, d)
    column_sparse_attention_reference(q, k, v, idx, counts, order, group, base, expected, 1.0)
    _, out, spare = output_view(b, h, n, d, dtype, "bnhd")
    interpreted["attention_triton"].column_sparse_attention_triton(q, k, v, idx, counts, order, group, base, out, 1.0,
                                                                   config=config)
    assert_matches(out, expected, dtype, "out")
    assert spare.isnan().all(), "wrote outside the output view"


@pytest.mark.parametrize("hint_offset, fixed_max, tma", [(0.0, False, False), (60.0, True, False),
                                                     (-60.0, True, True), (float("inf"), True, False),
                                                     (0.0, True, True)],
                         ids=["running-max", "hint-far-above", "hint-far-below-tma", "hint-infinite", "tma"])
def test_attention_with_column_sums_hint_paths(interpreted, hint_offset, fixed_max, tma):
    """The one-pass kernel takes the hint as the row maximum; tiles whose hint is far off (or not
    finite) are recomputed with a running maximum, so the output and lse stay exact."""
    b, h, n, d, group, dtype = 1, 2, 150, 64, 64, torch.bfloat16
    gen = torch.Generator().manual_seed(17)
    q, k, v = qkv_views(gen, b, h, n, d, dtype, "bnhd" if tma else "bhnd")  # descriptors over transposed views
    order = torch.randperm(n, generator=gen).int()
    expected_out = torch.empty(b, h, n, d)
    _, exact_lse = attention_with_column_sums_reference(q, k, v, order, group, expected_out, None)
    hint = exact_lse + 0.2 * torch.randn(b, h, n, generator=gen)
    hint[0, 1, :40] += hint_offset  # some rows of one head only: tiles with and without a good hint
    expected_sums, expected_lse = attention_with_column_sums_reference(q, k, v, order, group, expected_out, hint)
    out = torch.full((b, h, n, d), float("nan"), dtype=dtype)
    sums, lse = interpreted["attention_triton"].attention_with_column_sums_triton(
        q, k, v, order, group, out, hint, config={"fixed_max": fixed_max, "tma": tma})
    assert_matches(out, expected_out, dtype, "out")
    torch.testing.assert_close(lse, expected_lse, rtol=1e-4, atol=1e-4)
    if math.isfinite(hint_offset):  # (scaled: sums of e^60 would overflow the norm in float32)
        scale = expected_sums.abs().max()
        assert_matches(sums / scale, expected_sums / scale, torch.bfloat16, "column sums")
    else:  # exp(s - inf) = 0: the rows with an infinite hint add nothing
        assert_matches(sums[0, 0], expected_sums[0, 0], torch.bfloat16, "column sums")


@pytest.mark.parametrize("config", [
    {"up": {"block_n": 256}, "down": {"block_n": 256}},
    {"up": {"block_m": 64, "block_n": 64, "block_k": 32, "num_warps": 4, "num_stages": 3},
     "down": {"block_m": 64, "block_n": 64, "block_k": 32, "num_warps": 4, "num_stages": 3}},
    # programs in bands of 3 row tiles (4 row tiles: a full band and a band of one)
    {"up": {"block_m": 64, "block_n": 64, "block_k": 32, "num_warps": 4, "num_stages": 3, "band_rows": 3},
     "down": {"block_m": 64, "block_n": 32, "block_k": 32, "num_warps": 4, "num_stages": 3, "band_rows": 3}},
], ids=["wide-tiles", "small-tiles", "bands"])
def test_sparse_mlp_delta_configs(interpreted, config):
    b, n, d_in, m, d_out, block, capacity, dtype = 1, 200, 96, 192, 80, 128, 100, torch.bfloat16
    gen = torch.Generator().manual_seed(23)
    x, w1, b1, w2, units = mlp_inputs(gen, b, n, d_in, m, d_out, block, capacity, dtype)  # b = 1
    counts = torch.tensor([[capacity, 37]], dtype=torch.int32)
    hidden = torch.randn(b, m, n, generator=gen).to(dtype).transpose(1, 2)  # unit-major
    out = torch.randn(b, n, d_out, generator=gen).to(dtype)
    ref_hidden, ref_out = hidden.float(), out.float()
    sparse_mlp_delta_reference(x, w1, b1, w2, units, counts, None, block, ref_hidden, ref_out)
    kernel_hidden, kernel_out = hidden.clone(), out.clone()
    interpreted["mlp_triton"].sparse_mlp_delta_triton(x, w1, b1, w2.t().contiguous().t(), units, counts, None, block,
                                                      kernel_hidden, kernel_out, config=config)
    assert_matches(kernel_hidden, ref_hidden, dtype, "hidden cache")
    assert_matches(kernel_out.float() - out.float(), ref_out - out.float(), dtype, "output update")


def test_unsupported_shapes_fall_back_to_the_reference(interpreted, caplog):
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 40, 32, generator=gen).half() for _ in range(3))  # head dim 32
    order = torch.randperm(40, generator=gen).int()
    idx = torch.arange(40, dtype=torch.int32).expand(1, 2, 2, 40).contiguous()
    counts = torch.full((1, 2, 2), 30, dtype=torch.int32)
    attention = interpreted["attention_triton"]
    with caplog.at_level("WARNING"):
        out = attention.column_sparse_attention_triton(q, k, v, idx, counts, order, 24, None, torch.empty_like(q), 1.0)
    expected = column_sparse_attention_reference(q, k, v, idx, counts, order, 24, None, torch.empty_like(q), 1.0)
    assert torch.equal(out, expected)
    assert "PyTorch reference" in caplog.text and "head dim 32" in caplog.text

    x = torch.randn(1, 20, 16, generator=gen)  # float32: not taken by the MLP kernels
    w1, w2 = torch.randn(24, 16, generator=gen), torch.randn(8, 24, generator=gen)
    units, unit_counts = torch.arange(24, dtype=torch.int32).view(1, 1, 24), torch.tensor([[10]], dtype=torch.int32)
    caches = [torch.zeros(1, 20, 24), torch.zeros(1, 20, 8)]
    expected_caches = [c.clone() for c in caches]
    interpreted["mlp_triton"].sparse_mlp_delta_triton(x, w1, None, w2, units, unit_counts, None, 32, *caches)
    sparse_mlp_delta_reference(x, w1, None, w2, units, unit_counts, None, 32, *expected_caches)
    assert all(torch.equal(a, b) for a, b in zip(caches, expected_caches))


def test_interpreter_is_in_use(interpreted):
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(interpreted["attention_triton"]._column_sparse_attention_kernel, InterpretedFunction)


def test_sparse_mlp_delta_long_rows_configuration(interpreted, monkeypatch):
    """Rows of x larger than the GPU's L2 take the long-row tiles (bands of row tiles) on Hopper,
    the plain ones elsewhere and for short rows; both give the reference's result."""
    mlp = interpreted["mlp_triton"]
    x = torch.zeros(1, 300, 64, dtype=torch.bfloat16)  # 38400 bytes per batch row
    monkeypatch.setattr(mlp, "l2_bytes", lambda device: 32768)
    for major, expected in ((9, mlp.MLP_LONG_CONFIGS["hopper"]), (8, mlp.MLP_CONFIGS["big"])):
        monkeypatch.setattr(mlp, "capability_major", lambda device, major=major: major)
        assert mlp._default_config(x) is expected
    monkeypatch.setattr(mlp, "l2_bytes", lambda device: 65536)
    assert mlp._default_config(x) is mlp.MLP_CONFIGS["big"]
    # the long-row tiles at a size the interpreter runs (bands of 2 over 5 row tiles of 64)
    long = {part: {**cfg, "block_m": 64, "band_rows": 2} for part, cfg in mlp.MLP_LONG_CONFIGS["hopper"].items()}
    b, n, d_in, m, d_out, block, capacity, dtype = 1, 300, 64, 320, 272, 64, 260, torch.bfloat16
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(b, n, d_in, generator=gen).to(dtype)
    w1 = (torch.randn(m, d_in, generator=gen) * d_in ** -0.5).to(dtype)
    w2 = (torch.randn(d_out, m, generator=gen) * m ** -0.5).to(dtype)
    n_blocks = math.ceil(n / block)
    units = torch.stack([torch.randperm(m, generator=gen)[:capacity].sort().values
                         for _ in range(n_blocks)]).view(b, n_blocks, capacity).int()
    counts = torch.randint(1, capacity + 1, (b, n_blocks), generator=gen).int()
    hidden = torch.randn(b, m, n, generator=gen).to(dtype).transpose(1, 2)
    out = torch.randn(b, n, d_out, generator=gen).to(dtype)
    ref_hidden, ref_out = hidden.float(), out.float()
    sparse_mlp_delta_reference(x, w1, None, w2, units, counts, None, block, ref_hidden, ref_out)
    kernel_hidden, kernel_out = hidden.clone(), out.clone()
    mlp.sparse_mlp_delta_triton(x, w1, None, w2.t().contiguous().t(), units, counts, None, block, kernel_hidden,
                                kernel_out, config=long)
    assert_matches(kernel_hidden, ref_hidden, dtype, "hidden cache")
    assert_matches(kernel_out.float() - out.float(), ref_out - out.float(), dtype, "output update")


@pytest.mark.parametrize("case", [
    # (rows, cols, dtype, view): whole tiles; ragged edges; a column slice of a wider weight (FLUX's
    # single blocks hand over linear2's MLP part, a strided view)
    (128, 192, torch.bfloat16, "plain"),
    (80, 100, torch.float16, "plain"),
    (96, 130, torch.bfloat16, "slice"),
], ids=["tiles", "ragged", "slice"])
def test_transpose_into_matches_reference(interpreted, case):
    from chipmunk_pack.kernels.mlp_reference import transpose_into_reference

    rows, cols, dtype, view = case
    gen = torch.Generator().manual_seed(rows + cols)
    if view == "slice":
        src = torch.randn(rows, cols + 70, generator=gen).to(dtype)[:, 70:]
    else:
        src = torch.randn(rows, cols, generator=gen).to(dtype)
    out = torch.full((cols, rows), float("nan"), dtype=dtype)
    assert interpreted["mlp_triton"].transpose_into_triton(src, out) is out
    assert torch.equal(out, transpose_into_reference(src, torch.empty_like(out)))  # a copy: bit for bit
    with pytest.raises(ValueError, match="out must be"):
        interpreted["mlp_triton"].transpose_into_triton(src, torch.empty(rows, cols, dtype=dtype))


def test_int16_lists_give_what_int32_lists_give(interpreted):
    """Lists are kept in the narrowest integer type (``index_dtype``): the kernels read int16 lists
    and counts exactly as int32 ones, attention and MLP alike."""
    gen = torch.Generator().manual_seed(29)
    b, h, n, d, group, capacity, dtype = 1, 2, 96, 64, 32, 40, torch.bfloat16
    q, k, v = qkv_views(gen, b, h, n, d, dtype, "bhnd")
    order = torch.randperm(n, generator=gen).int()
    idx, counts = key_lists(gen, b, h, math.ceil(n / group), n, capacity, "random")
    base = torch.randn(b, h, n, d, generator=gen).to(dtype)
    attention = interpreted["attention_triton"]
    wide = attention.column_sparse_attention_triton(q, k, v, idx, counts, order, group, base, torch.empty_like(q), 1.0)
    narrow = attention.column_sparse_attention_triton(q, k, v, idx.short(), counts.short(), order, group, base,
                                                      torch.empty_like(q), 1.0)
    assert torch.equal(wide, narrow)

    n, d_in, m, d_out, block = 64, 32, 96, 48, 32
    x = torch.randn(b, n, d_in, generator=gen).to(dtype)
    w1 = (torch.randn(m, d_in, generator=gen) * d_in ** -0.5).to(dtype)
    w2 = (torch.randn(d_out, m, generator=gen) * m ** -0.5).to(dtype)
    units = torch.stack([torch.randperm(m, generator=gen)[:40].sort().values for _ in range(2)]).view(b, 2, 40).int()
    unit_counts = torch.tensor([[40, 17]], dtype=torch.int32)
    start = torch.randn(b, n, m, generator=gen).to(dtype), torch.randn(b, n, d_out, generator=gen).to(dtype)
    results = []
    for lists in ((units, unit_counts), (units.short(), unit_counts.short())):
        hidden, out = (t.clone() for t in start)
        interpreted["mlp_triton"].sparse_mlp_delta_triton(x, w1, None, w2, *lists, None, block, hidden, out)
        results.append((hidden, out))
    assert all(torch.equal(a, c) for a, c in zip(*results))


def test_selection_writes_the_narrowest_lists(interpreted):
    """The selection kernel writes int16 lists below 32,768 columns, as the reference does."""
    from chipmunk_pack.kernels.index_lists import build_index_lists_reference

    scores = torch.rand(2, 3, 300, generator=torch.Generator().manual_seed(4))
    seeds = torch.tensor([5, 6])
    got = interpreted["index_lists_triton"].build_index_lists_triton(scores, 40, 4, None, seeds, 8)
    expected = build_index_lists_reference(scores, 40, 4, None, seeds, 8)
    assert got[0].dtype == got[1].dtype == torch.int16
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.fixture
def small_pages(monkeypatch):
    """Paged lists at tiny sizes: pages of 64 ids, so lists over 32 to 128 columns take the paged
    form (at the real page size, 32,768 to 131,072)."""
    from chipmunk_pack.kernels import index_lists

    monkeypatch.setattr(index_lists, "PAGE_BITS", 6)
    return index_lists


@pytest.mark.parametrize("n_cols", [100, 128])
def test_paged_lists_are_written_and_read_as_the_reference_does(interpreted, small_pages, n_cols):
    """Key lists past int16's range stay 16-bit (ids modulo the page, the first page's size in the
    count's high bits): the selection kernel writes the reference's paged lists bit for bit, and
    the sparse attention over them equals the attention over the same lists in int32."""
    from chipmunk_pack.kernels.index_lists import build_index_lists_reference, read_lists

    gen = torch.Generator().manual_seed(31)
    b, h, d, group, dtype = 1, 2, 64, 32, torch.bfloat16
    n_groups = math.ceil(n_cols / group)
    scores = torch.rand(b, h, n_groups, n_cols, generator=gen)
    seeds = torch.tensor([7])
    forced = torch.arange(4)  # text keys in the first page
    got = interpreted["index_lists_triton"].build_index_lists_triton(scores, 40, 6, forced, seeds, 16, paged=True)
    expected = build_index_lists_reference(scores, 40, 6, forced, seeds, 16, paged=True)
    plain = build_index_lists_reference(scores, 40, 6, forced, seeds, 16)
    assert (got[0].dtype, got[1].dtype) == (torch.int16, torch.int32)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    ids, counts = read_lists(*got)
    listed = torch.arange(ids.shape[-1]) < counts[..., None]
    assert torch.equal(counts, plain[1].long()) and torch.equal(ids[listed], plain[0].long()[listed])
    assert (ids[listed] >= 64).any() and (ids[listed] < 64).any()  # both pages in use

    q, k, v = qkv_views(gen, b, h, n_cols, d, dtype, "bhnd")
    order = torch.randperm(n_cols, generator=gen).int()
    base = torch.randn(b, h, n_cols, d, generator=gen).to(dtype)
    attention = interpreted["attention_triton"]
    wide = attention.column_sparse_attention_triton(q, k, v, plain[0].int(), plain[1].int(), order, group, base,
                                                    torch.empty_like(q), 1.0)
    paged = attention.column_sparse_attention_triton(q, k, v, *got, order, group, base, torch.empty_like(q), 1.0)
    assert torch.equal(wide, paged)
    reference = column_sparse_attention_reference(q, k, v, *got, order, group, base, torch.empty_like(q), 1.0)
    assert_matches(paged, reference, dtype, "sparse attention over paged lists")


def test_fp8_delta_cache_written_and_read_as_the_reference_does(interpreted):
    """fp8 delta caches: the dense step writes float8_e4m3fn rows with a float32 scale each, the
    sparse step reads them back. The kernel's rows are ``quantize_rows`` of what it computes (its
    own bf16-precision attention), its scales the reference's to the bf16 parity bound.

    Triton's interpreter rounds values just below a power of two (120..128 of a row's 448) down to
    the power below instead of up to it: on the CPU a few elements are off by that factor of two;
    the GPU's conversion rounds to nearest (checked bit for bit in bench/gpu_parity.py)."""
    from chipmunk_pack.kernels.fp8 import FP8, quantize_rows

    gen = torch.Generator().manual_seed(31)
    b, h, n, d, group, capacity, dtype = 2, 2, 150, 128, 64, 48, torch.bfloat16
    q, k, v = qkv_views(gen, b, h, n, d, dtype, "bnhd")
    order = torch.randperm(n, generator=gen).int()
    idx, counts = key_lists(gen, b, h, math.ceil(n / group), n, capacity, "random")
    dense = torch.randn(b, n, h, d, generator=gen).to(dtype).transpose(1, 2)
    attention = interpreted["attention_triton"]

    def write(fn):
        cache = torch.zeros(b, n, h, d, dtype=FP8).transpose(1, 2)
        scale = torch.full((b, n, h), float("nan")).transpose(1, 2)
        fn(q, k, v, idx, counts, order, group, dense, cache, -1.0, None, scale)
        return cache, scale

    cache, scale = write(attention.column_sparse_attention_triton)
    ref_cache, ref_scale = write(column_sparse_attention_reference)
    torch.testing.assert_close(scale, ref_scale, rtol=TOLERANCE[dtype], atol=0)
    assert (ref_cache.float().abs().amax(-1) == 448).all()  # every row spans fp8's range
    exact = torch.empty(b, h, n, d)
    column_sparse_attention_reference(q, k, v, idx, counts, order, group, dense, exact, -1.0)
    ref_error = float((ref_cache.float() * ref_scale[..., None] - exact).norm() / exact.norm())
    assert ref_error < 0.035  # e4m3 keeps 3 mantissa bits: at most 1/16 of a value, about 3% rms

    plain = torch.empty(b, h, n, d, dtype=dtype)
    attention.column_sparse_attention_triton(q, k, v, idx, counts, order, group, dense, plain, -1.0)
    expected, _ = quantize_rows(plain.float())
    got, want = cache.float(), expected.float()
    # equal, or one step apart (the kernel rounds its fp32 values, the expectation their bf16 copy);
    # 2^-9 is the step of fp8's subnormals
    same = (got - want).abs() <= want.abs() / 8 + 2 ** -9
    power_of_two = got.abs() == 2 ** got.abs().clamp_min(2 ** -9).log2().round()
    interpreter_slip = power_of_two & ((2 * got - want).abs() <= want.abs() / 8)
    assert (same | interpreter_slip).all()
    assert same.float().mean() > 0.9

    out = torch.full((b, h, n, d), float("nan"), dtype=dtype)
    attention.column_sparse_attention_triton(q, k, v, idx, counts, order, group, ref_cache, out, 1.0, ref_scale)
    expected = torch.empty(b, h, n, d)
    column_sparse_attention_reference(q, k, v, idx, counts, order, group, ref_cache, expected, 1.0, ref_scale)
    assert_matches(out, expected, dtype, "sparse step from an fp8 cache")
    with pytest.raises(ValueError, match="base_scale"):
        attention.column_sparse_attention_triton(q, k, v, idx, counts, order, group, ref_cache, out, 1.0)


def test_fp8_hidden_cache_updated_as_the_reference_does(interpreted):
    """An fp8 hidden cache (one scale per unit, room for 8x the dense step's values): the kernel
    stores the recomputed units with their unit's scale, as the reference does (bytes equal but
    where its bf16 products round across a step), and moves the output cache by exactly the change
    of the stored values."""
    from chipmunk_pack.kernels import HIDDEN_HEADROOM, quantize_rows

    gen = torch.Generator().manual_seed(37)
    b, n, d_in, m, d_out, block, capacity, dtype = 2, 200, 64, 160, 48, 64, 70, torch.bfloat16
    x, w1, b1, w2, units = mlp_inputs(gen, b, n, d_in, m, d_out, block, capacity, dtype)
    units, n_blocks = units.short(), units.shape[1]
    counts = torch.randint(1, capacity + 1, (b, n_blocks), generator=gen).short()
    order = torch.randperm(n, generator=gen).int()
    hidden0 = torch.nn.functional.gelu(torch.randn(b, m, n, generator=gen), approximate="tanh")
    cache0, scale = quantize_rows(hidden0, HIDDEN_HEADROOM)
    out0 = torch.randn(b, n, d_out, generator=gen).to(dtype)
    results = []
    for fn in (interpreted["mlp_triton"].sparse_mlp_delta_triton, sparse_mlp_delta_reference):
        cache, out = cache0.clone(), out0.clone()
        fn(x, w1, b1, w2, units, counts, order, block, cache.transpose(1, 2), out, hidden_in_block_order=True,
           hidden_scale=scale)
        results.append((cache, out))
    (cache, out), (ref_cache, ref_out) = results
    got, want = cache.float(), ref_cache.float()
    assert ((got - want).abs() <= want.abs() / 8 + 2 ** -9).all()  # equal, or a rounding step apart
    assert (cache.view(torch.uint8) == ref_cache.view(torch.uint8)).float().mean() > 0.98
    assert not torch.equal(cache, cache0)
    # the output moved by exactly the change of the stored hidden values (whatever their rounding)
    for new_cache, new_out, what in ((cache, out, "kernel"), (ref_cache, ref_out, "reference")):
        stored_change = (new_cache.float() - cache0.float()) * scale[..., None]  # [B, M, N], block order
        expected = torch.zeros(b, n, d_out)
        expected[:, order.long()] = stored_change.transpose(1, 2) @ w2.float().T
        assert_matches(new_out.float() - out0.float(), expected, dtype, f"{what}'s output update")
    with pytest.raises(ValueError, match="hidden_scale"):
        interpreted["mlp_triton"].sparse_mlp_delta_triton(x, w1, b1, w2, units, counts, order, block,
                                                          cache0.clone().transpose(1, 2), out0.clone(),
                                                          hidden_in_block_order=True)


def test_fp8_bytes_in_integer_arithmetic_are_torchs(interpreted):
    """The MLP kernel writes and reads float8_e4m3fn through integer arithmetic: every finite
    pattern decodes to torch's value, and encoding rounds as torch does (nearest, ties to even) but
    for exact ties between subnormals."""
    import triton
    import triton.language as tl

    globals()["_interpreted_mlp"] = interpreted["mlp_triton"]  # what the test kernel calls (a module global)

    @triton.jit
    def roundtrip(X, Bits, Value, Decoded, N: tl.constexpr):
        i = tl.arange(0, N)
        bits, value = _interpreted_mlp._e4m3_encode(tl.load(X + i))
        tl.store(Bits + i, bits)
        tl.store(Value + i, value)
        tl.store(Decoded + i, _interpreted_mlp._e4m3_decode(tl.load(Bits + i)))

    patterns = torch.arange(256, dtype=torch.uint8)
    finite = patterns[(patterns & 0x7F) != 0x7F]
    exact = finite.view(torch.float8_e4m3fn).float()
    gen = torch.Generator().manual_seed(41)
    samples = torch.cat([exact, torch.randn(512, generator=gen) * 60, torch.rand(256, generator=gen) * 0.03 - 0.015])
    samples = torch.cat([samples, torch.zeros(2048 - samples.numel())]).clamp(-448, 448)
    bits, value, decoded = (torch.empty(2048, dtype=dt) for dt in (torch.int32, torch.float32, torch.float32))
    roundtrip[(1,)](samples, bits, value, decoded, 2048)
    expected = samples.to(torch.float8_e4m3fn)
    assert torch.equal(value, expected.float())
    assert torch.equal(decoded, expected.float())
    assert torch.equal(bits.to(torch.uint8)[:exact.numel()], finite)
