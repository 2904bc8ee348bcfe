"""Low-bit linears: integer kernels equal their dequantized float form; packing is exact; torchao parity."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from efformer.compress.qlinear import (
    IntWeightLinear,
    W8A8Linear,
    int8_matmul,
    pack_nibbles,
    quantize_activations,
    unpack_nibbles,
)
from efformer.compress.rtn import rtn_quantize, weight_format


def sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    """20 log10(||ref|| / ||ref - got||), torchao's accuracy measure (dB)."""
    return (20 * torch.log10(ref.norm() / (ref - got).norm())).item()


@pytest.mark.parametrize("n_in", [1, 7, 64])
def test_nibble_packing_round_trips_every_code(n_in):
    codes = torch.randint(0, 16, (5, n_in))
    codes[0, : min(n_in, 16)] = torch.arange(min(n_in, 16))
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (n_in + 1) // 2)
    assert torch.equal(unpack_nibbles(packed, n_in).long(), codes)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, -1, True), (3, 64, False), (2, 32, True),
                                            (8, -1, True), (8, 64, False), (6, -1, False)])
def test_int_weight_linear_holds_exactly_the_rtn_weight(bits, group, sym):
    torch.manual_seed(bits)
    lin = nn.Linear(128, 24)
    q = rtn_quantize(lin.weight, weight_format(bits, group, sym))
    m = IntWeightLinear.from_quantized(q, lin.bias)
    assert torch.equal(m.codes(), q.codes) and torch.equal(m.dequantize(), q.dequantize())
    x = torch.randn(3, 5, 128)
    ref = nn.functional.linear(x, q.dequantize(), lin.bias)
    assert torch.allclose(m(x), ref, atol=1e-5, rtol=1e-5)
    if bits <= 4:
        assert m.qweight.numel() == 24 * 64  # two codes per byte


def test_int8_scale_after_path_is_used_and_matches():
    torch.manual_seed(0)
    lin = nn.Linear(33, 17)
    m = IntWeightLinear.from_quantized(rtn_quantize(lin.weight, weight_format(8, -1, True)), lin.bias)
    assert m.scale_after and m.qweight.dtype == torch.int8
    x = torch.randn(4, 33)
    assert torch.allclose(m(x), nn.functional.linear(x, m.dequantize(), lin.bias), atol=1e-5)


def test_w8a8_integer_matmul_equals_its_float_definition():
    torch.manual_seed(1)
    lin = nn.Linear(64, 40)
    m = W8A8Linear.from_linear(lin.weight, lin.bias)
    x = torch.randn(2, 9, 64)
    xq, xs = quantize_activations(x.reshape(-1, 64))
    w = m.qweight.float() * m.scale[:, None]
    ref = ((xq.float() * xs) @ w.T + lin.bias).reshape(2, 9, 40)
    assert torch.allclose(m(x), ref, atol=1e-5, rtol=1e-5)
    assert sqnr(lin(x), m(x)) > 30


def _torchao_weight(lin, config):
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_

    m = nn.Sequential(copy.deepcopy(lin))
    quantize_(m, config)
    return m


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(2)
    return nn.Linear(256, 64), torch.randn(16, 256)


def test_int8_weight_only_matches_torchao(layer):
    torchao = pytest.importorskip("torchao.quantization")
    lin, x = layer
    ao = _torchao_weight(lin, torchao.Int8WeightOnlyConfig())
    q = rtn_quantize(lin.weight, weight_format(8, -1, True))
    ours = IntWeightLinear.from_quantized(q, lin.bias)
    with torch.no_grad():
        w_ao = ao[0].weight.dequantize()
        assert ((ours.dequantize() - w_ao).abs() <= q.scale + 1e-7).all()  # within one step
        assert sqnr(lin(x), ours(x)) > 20 and sqnr(lin(x), ao(x)) > 20 and sqnr(ao(x), ours(x)) > 20


def test_w8a8_matches_torchao(layer):
    torchao = pytest.importorskip("torchao.quantization")
    lin, x = layer
    ao = _torchao_weight(lin, torchao.Int8DynamicActivationInt8WeightConfig())
    ours = W8A8Linear.from_linear(lin.weight, lin.bias)
    with torch.no_grad():
        w_ao = ao[0].weight.dequantize()
        assert ((ours.qweight.float() * ours.scale[:, None] - w_ao).abs() <= ours.scale[:, None] + 1e-7).all()
        assert sqnr(lin(x), ours(x)) > 20 and sqnr(ao(x), ours(x)) > 20


@pytest.mark.parametrize("group", [32, 128])
def test_int4_group_rtn_matches_torchao_intx(layer, group):
    torchao = pytest.importorskip("torchao.quantization")
    lin, x = layer
    ao = _torchao_weight(lin, torchao.IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                            granularity=torchao.PerGroup(group)))
    q = rtn_quantize(lin.weight, weight_format(4, group, True))
    ours = IntWeightLinear.from_quantized(q, lin.bias)
    with torch.no_grad():
        w_ao = ao[0].weight.dequantize()
        step = q.scale.repeat_interleave(group, 1)
        assert ((ours.dequantize() - w_ao).abs() <= step + 1e-7).all()
        assert sqnr(lin(x), ours(x)) > 20 and sqnr(ao(x), ours(x)) > 20


@pytest.mark.parametrize("m,k", [(1, 7), (1, 2500), (2, 64), (17, 64), (40, 2500)])
def test_int8_matmul_is_exact_on_both_paths(m, k):
    g = torch.Generator().manual_seed(m)
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    wq = torch.randint(-127, 128, (9, k), generator=g, dtype=torch.int8)
    xq[0], wq[0] = 127, 127  # the largest partial sums
    assert torch.equal(int8_matmul(xq, wq), xq.long().matmul(wq.long().t()).to(torch.int32))


def test_w8a8_decode_rows_and_batches_agree():
    torch.manual_seed(3)
    lin = nn.Linear(64, 32)
    m = W8A8Linear.from_linear(lin.weight, lin.bias)
    x = torch.randn(12, 64)
    many, one_by_one = m(x), torch.cat([m(x[i:i + 1]) for i in range(12)])  # float-GEMM path vs torch._int_mm
    assert torch.equal(many, one_by_one)
