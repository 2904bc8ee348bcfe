"""Formats: every representable value round-trips; minifloats match torch's FP8 casts and the E2M1 table."""

from __future__ import annotations

import pytest
import torch

from efformer.compress.formats import (
    FP4_E2M1,
    FP8_E4M3,
    FP8_E5M2,
    IntFormat,
    Log2Format,
    float_fake_quant,
    float_format,
    int_decode,
    int_encode,
    int_fake_quant,
    int_qparams,
    int_qparams_clipped,
    mx_scale,
    nv_scales,
)
from efformer.errors import ConfigError, UnknownNameError

GRAINS = [("tensor", -1), ("channel", -1), ("token", -1), ("group", 32), ("group", 64), ("group", 128)]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_codes_round_trip_on_every_code(bits, signed, symmetric):
    fmt = IntFormat(bits, signed, symmetric, "channel")
    scale, zero = torch.tensor([[0.37]]), torch.tensor([[0.0 if signed else float(1 << (bits - 1))]])
    if not symmetric:
        zero = torch.tensor([[float(fmt.qmin + 1)]])
    codes = torch.arange(fmt.qmin, fmt.qmax + 1)[None]
    values = int_decode(codes, scale, zero, fmt)
    assert torch.equal(values, (codes.float() - zero) * scale)  # the definition
    assert torch.equal(int_encode(values, scale, zero, fmt), codes.to(torch.int32))
    assert fmt.qmax - fmt.qmin == (1 << bits) - 1


@pytest.mark.parametrize("grain,g", GRAINS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed,symmetric", [(True, True), (False, True), (False, False), (True, False)])
def test_int_fake_quant_error_is_half_a_step_and_codes_in_range(grain, g, bits, signed, symmetric):
    torch.manual_seed(bits)
    x = torch.randn(6, 256) * torch.rand(6, 1) * 4
    fmt = IntFormat(bits, signed, symmetric, grain, g)
    scale, zero = int_qparams(x, fmt)
    q = int_encode(x, scale, zero, fmt)
    assert q.min() >= fmt.qmin and q.max() <= fmt.qmax
    step = int_decode(q + 1, scale, zero, fmt) - int_decode(q, scale, zero, fmt)  # the scale of each entry
    err = (int_fake_quant(x, fmt) - x).abs()
    # absmax grids never clip (half a step); a rounded zero point may clip the range ends by half a step more
    bound = step / 2 if symmetric else step
    assert (err <= bound * (1 + 1e-5) + 1e-7).all()
    inside = (x >= int_decode(torch.full_like(q, fmt.qmin), scale, zero, fmt)) & \
        (x <= int_decode(torch.full_like(q, fmt.qmax), scale, zero, fmt))
    assert (err[inside] <= (step / 2 * (1 + 1e-5) + 1e-7)[inside]).all()
    assert scale.numel() == {"tensor": 1, "group": 6 * 256 // max(g, 1)}.get(grain, 6)


def test_zero_is_exact_and_all_zero_rows_survive():
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.3, 1.7, 2.2, 5.0]])
    for fmt in (IntFormat(4, True, True, "channel"), IntFormat(4, False, False, "channel")):
        out = int_fake_quant(x, fmt)
        assert torch.equal(out[0], x[0])
        assert torch.isfinite(out).all()


def test_int_format_refuses_bad_values():
    with pytest.raises(ConfigError, match="bits"):
        IntFormat(1)
    with pytest.raises(ConfigError, match="group_size"):
        IntFormat(4, granularity="group")
    with pytest.raises(ConfigError, match="divide the width 100"):
        int_qparams(torch.randn(2, 100), IntFormat(4, granularity="group", group_size=32))


@pytest.mark.parametrize("fmt,dtype", [(FP8_E4M3, torch.float8_e4m3fn), (FP8_E5M2, torch.float8_e5m2)])
def test_fp8_decode_matches_torch_on_all_256_codes(fmt, dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    ref, mine = codes.view(dtype).float(), fmt.decode(codes)
    assert torch.equal(torch.isnan(ref), torch.isnan(mine))
    ok = ~torch.isnan(ref)
    assert torch.equal(ref[ok], mine[ok])  # includes ±inf for E5M2 and both zeros


@pytest.mark.parametrize("fmt,dtype", [(FP8_E4M3, torch.float8_e4m3fn), (FP8_E5M2, torch.float8_e5m2)])
def test_fp8_rounding_matches_torch_cast(fmt, dtype):
    torch.manual_seed(0)
    finite = fmt.decode(fmt.finite_codes())
    mids = (finite[:-1] + finite[1:]) / 2  # ties: round half to even, like the cast
    x = torch.cat([torch.randn(20000) * fmt.max_value / 16, torch.randn(2000) * 2.0 ** -9, finite,
                   mids[torch.isfinite(mids)]])
    x = x[x.abs() <= fmt.max_value]
    assert torch.equal(fmt.round(x), x.to(dtype).float())


def test_fp4_e2m1_values_are_the_spec_table():
    table = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    codes = torch.arange(16)
    assert torch.equal(FP4_E2M1.decode(codes), torch.cat([table, -table]))
    assert FP4_E2M1.emax == 2 and FP8_E4M3.emax == 8 and FP8_E5M2.emax == 15


@pytest.mark.parametrize("fmt", [FP8_E4M3, FP8_E5M2, FP4_E2M1])
def test_float_encode_decode_round_trips_every_finite_code(fmt):
    codes = fmt.finite_codes()
    assert torch.equal(fmt.encode(fmt.decode(codes)).long(), codes.long())
    x = torch.randn(5000) * fmt.max_value / 3
    assert torch.equal(fmt.decode(fmt.encode(x)), fmt.round(x))
    assert fmt.round(torch.tensor([1e9, -1e9])).tolist() == [fmt.max_value, -fmt.max_value]  # saturating


def test_mx_scale_is_power_of_two_and_block_max_fits():
    torch.manual_seed(0)
    x = torch.randn(4, 128) * 3
    for fmt in (FP8_E4M3, FP4_E2M1):
        s = mx_scale(x, fmt)
        assert torch.equal(torch.exp2(torch.log2(s).round()), s)
        amax = x.unflatten(-1, (-1, 32)).abs().amax(-1)
        ratio = amax / s  # the block max lands in the top binade of the element format
        assert ((ratio >= 2.0 ** fmt.emax) & (ratio < 2.0 ** (fmt.emax + 1))).all()
        err = (float_fake_quant(x, fmt, "mx") - x).norm() / x.norm()
        assert err < (0.05 if fmt is FP8_E4M3 else 0.3)


def test_nv_scales_are_fp8_under_a_tensor_scale():
    torch.manual_seed(1)
    x = torch.randn(3, 64)
    t, b = nv_scales(x)
    assert torch.equal(FP8_E4M3.round(b), b) and b.shape == (3, 4)
    assert b.max() <= FP8_E4M3.max_value
    y = float_fake_quant(x, FP4_E2M1, "nv")
    err = (y - x).norm() / x.norm()
    assert err < 0.2
    assert float((float_fake_quant(x, FP4_E2M1, "nv") - x).norm()) < float((float_fake_quant(x, FP4_E2M1, "tensor")
                                                                           - x).norm())


def test_finer_scaling_lowers_error():
    torch.manual_seed(2)
    x = torch.randn(16, 256) * torch.rand(16, 1) * 10
    e = {s: (float_fake_quant(x, FP4_E2M1, s) - x).norm().item() for s in ("tensor", "channel", "nv")}
    assert e["nv"] < e["channel"] < e["tensor"]


def test_log2_quantizer_round_trips_and_rounds_in_log_space():
    f = Log2Format(4)
    q = torch.arange(f.qmax + 1)
    assert torch.equal(f.encode(f.decode(q)), q.to(torch.int32))
    p = torch.tensor([1.0, 0.7, 0.3, 2.0 ** -20, 0.0])
    assert f.fake_quant(p).tolist() == [1.0, 0.5, 0.25, 2.0 ** -15, 2.0 ** -15]
    r = torch.rand(1000)
    assert ((torch.log2(f.fake_quant(r)) - torch.log2(r)).abs() <= 0.5 + 1e-6).all()


def test_unknown_float_format_is_named():
    with pytest.raises(UnknownNameError, match="fp8_e4m4"):
        float_format("fp8_e4m4")


def _clip_err(x, scale, zero, fmt):
    """sum |fake_quant(x) - x|^2.4 per row (x (rows, d), per-channel scale/zero (rows, 1))."""
    return (int_decode(int_encode(x, scale, zero, fmt), scale, zero, fmt) - x).abs().pow(2.4).sum(-1)


@pytest.mark.parametrize("symmetric", [False, True])
def test_clipped_qparams_are_the_best_shrink_of_the_min_max_range(symmetric):
    fmt = IntFormat(3, signed=symmetric, symmetric=symmetric, granularity="channel")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=g)
    x[:3, 0] = 12.0  # rows with an outlier: clipping it pays
    x[5] = 0  # an all-zero row: any scale is exact
    s0, z0 = int_qparams(x, fmt)
    s, z = int_qparams_clipped(x, fmt)
    assert s.shape == s0.shape and torch.equal(z, z0)
    e0, e = _clip_err(x, s0, z0, fmt), _clip_err(x, s, z, fmt)
    assert (e <= e0).all() and (e[:3] < e0[:3]).all()
    # oracle: every shrink factor of the grid tried one by one, the best kept
    for row in range(5):
        errs = [_clip_err(x[row:row + 1], s0[row:row + 1] * (1 - i / 100), z0[row:row + 1], fmt).item()
                for i in range(80)]
        assert e[row].item() == pytest.approx(min(errs), rel=1e-6)


def test_clipped_qparams_per_group_keep_the_group_layout():
    fmt = IntFormat(4, signed=False, symmetric=False, granularity="group", group_size=32)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    s, z = int_qparams_clipped(x, fmt)
    s0, _ = int_qparams(x, fmt)
    assert s.shape == s0.shape == (4, 4) and (s <= s0).all() and (s >= 0.2 * s0).all()
