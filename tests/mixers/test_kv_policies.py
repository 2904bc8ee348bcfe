"""Sinks + window (StreamingLLM) and int8 KV caches of a softmax layer, against plain recomputations."""

from __future__ import annotations

import math

import pytest
import torch

from efformer.errors import ConfigError
from efformer.mixers.kv_policies import (
    Int8KVState,
    StreamingKVState,
    dequantize_int8,
    kv_bytes,
    quantize_int8,
)
from efformer.mixers.softmax import KVState, SoftmaxAttention
from efformer.nn.positional import Alibi, Rope

D, H, KV = 24, 4, 2


def _layer(form: str) -> SoftmaxAttention:
    torch.manual_seed(0)
    return SoftmaxAttention(D, H, causal=True, options={"n_kv_heads": KV, "form": form}).double().eval()


def _scheme(kind: str):
    cls = {"rope": Rope, "alibi": Alibi}[kind]
    return cls(D, H, 512, True).double()


def _kept(t: int, sinks: int, window: int) -> list[int]:
    """Indices StreamingLLM keeps when token t attends: the first ``sinks`` and the last ``window`` (t included)."""
    return sorted(set(range(min(sinks, t + 1))) | set(range(max(0, t + 1 - window), t + 1)))


def _reference_step(layer, scheme, x, t, kept) -> torch.Tensor:
    """Token t's output recomputed over exactly the kept tokens, at positions 0..len-1 within the cache."""
    q, k, v = layer._qkv_unrotated(x)
    idx = torch.tensor(kept)
    q, k, v = q[:, :, t : t + 1], k[:, :, idx], v[:, :, idx]
    k_pos = torch.arange(len(kept))[None]
    q_pos = k_pos[:, -1:]
    if scheme.kind == "rotary":
        q, k = scheme.rotate_queries(q, q_pos), scheme.rotate_keys(k, k_pos)
    g = H // KV
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(layer.head_dim)
    if scheme.kind == "bias":
        s = s + scheme(q_pos, k_pos)
    return layer.out_proj(layer.merge_heads(s.softmax(-1) @ v))


@pytest.mark.parametrize("form", ["reference", "fast"])
@pytest.mark.parametrize("kind", ["rope", "alibi"])
@pytest.mark.parametrize("prefill", [1, 5, 13])
def test_streaming_equals_attention_over_kept_tokens(form, kind, prefill):
    sinks, window, n = 3, 7, 31
    layer, scheme = _layer(form), _scheme(kind)
    x = torch.randn(2, n, D, dtype=torch.float64)
    state = StreamingKVState.empty(2, KV, layer.head_dim, "cpu", torch.float64, sinks=sinks, window=window)
    outs = []
    with torch.no_grad():
        ctx = scheme.context(torch.arange(prefill).expand(2, -1), x.dtype)
        y, state = layer(x[:, :prefill], state=state, positions=ctx)
        outs.extend(y.unbind(1))
        for t in range(prefill, n):
            ctx = scheme.context(torch.tensor([[t]]).expand(2, 1), x.dtype)
            y, state = layer(x[:, t : t + 1], state=state, positions=ctx)
            outs.append(y[:, 0])
            assert state.size <= sinks + window
        # the prefill attends over all of its tokens (causally) at their own positions: that is kept(t)
        # while it fits, and the whole prefix for a prefill longer than the cache
        for t in range(n):
            kept = _kept(t, sinks, window) if t >= prefill else list(range(t + 1))
            ref = _reference_step(layer, scheme, x, t, kept)[:, 0]
            torch.testing.assert_close(outs[t], ref, atol=1e-10, rtol=1e-10)


def test_streaming_cache_fits_unchanged_when_everything_fits():
    layer, scheme = _layer("fast"), _scheme("rope")
    x = torch.randn(2, 12, D, dtype=torch.float64)
    full = layer.init_state(2, "cpu", torch.float64)
    stream = StreamingKVState.empty(2, KV, layer.head_dim, "cpu", torch.float64, sinks=4, window=8)
    with torch.no_grad():
        for chunk in (range(0, 5), range(5, 6), range(6, 12)):
            ids = torch.tensor([list(chunk)])
            ctx = scheme.context(ids.expand(2, -1), x.dtype)
            a, full = layer(x[:, chunk.start : chunk.stop], state=full, positions=ctx)
            b, stream = layer(x[:, chunk.start : chunk.stop], state=stream, positions=ctx)
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert stream.size == 12


def test_streaming_left_padding_keeps_each_rows_first_real_tokens_as_sinks():
    state = StreamingKVState.empty(2, 1, 1, "cpu", torch.float64, sinks=2, window=3)
    k = torch.arange(6, dtype=torch.float64).view(1, 1, 6, 1).expand(2, 1, 6, 1).contiguous()
    keep = torch.tensor([[True] * 6, [False, False, False, True, True, True]])
    state.extend(k, k, keep)
    assert state.sk[0, 0, :, 0].tolist() == [0, 1] and state.sk[1, 0, :, 0].tolist() == [3, 4]
    assert state.wk[0, 0, :, 0].tolist() == [3, 4, 5]
    assert state.wkeep[1].tolist() == [False, False, True] and state.wk[1, 0, -1, 0] == 5


def test_streaming_merge_and_select_keep_rows():
    a = StreamingKVState.empty(1, 1, 1, "cpu", torch.float32, sinks=1, window=4)
    b = StreamingKVState.empty(1, 1, 1, "cpu", torch.float32, sinks=1, window=4)
    a.extend(torch.ones(1, 1, 5, 1), torch.ones(1, 1, 5, 1), None)
    b.extend(2 * torch.ones(1, 1, 2, 1), 2 * torch.ones(1, 1, 2, 1), None)
    m = StreamingKVState.merge([a, b])
    assert m.wkeep.tolist() == [[True] * 4, [False, False, False, True]]
    assert m.select(torch.tensor([1])).wk[0, 0, -1, 0] == 2


@pytest.mark.parametrize("field,value", [("sinks", -1), ("window", 0), ("window", 2.5)])
def test_streaming_refuses_bad_sizes(field, value):
    kw = {"sinks": 2, "window": 4, field: value}
    with pytest.raises(ConfigError, match=field):
        StreamingKVState.empty(1, 1, 1, "cpu", torch.float32, **kw)


def test_int8_quantization_error_within_half_a_step():
    torch.manual_seed(1)
    x = torch.randn(3, 2, 17, 32) * torch.logspace(-3, 2, 17)[:, None]
    codes, scale = quantize_int8(x)
    assert codes.dtype == torch.int8 and scale.shape == (3, 2, 17, 1)
    err = (dequantize_int8(codes, scale, torch.float32) - x).abs()
    assert bool((err <= scale / 2 * (1 + 1e-5)).all())  # half of one quantization step
    assert bool((codes.abs().amax(-1) == 127).all())  # the absmax maps to the top code
    z, s = quantize_int8(torch.zeros(1, 4))
    assert z.abs().sum() == 0 and bool(torch.isfinite(s).all())


def test_int8_cache_dequantizes_within_one_step_and_layer_stays_close():
    layer, scheme = _layer("fast"), _scheme("rope")
    layer = layer.float()
    x = torch.randn(2, 20, D)
    full = layer.init_state(2, "cpu", torch.float32)
    q8 = Int8KVState.empty(2, KV, layer.head_dim, "cpu", torch.float32)
    with torch.no_grad():
        for t in range(20):
            ctx = scheme.float().context(torch.tensor([[t]]).expand(2, 1), x.dtype)
            a, full = layer(x[:, t : t + 1], state=full, positions=ctx)
            b, q8 = layer(x[:, t : t + 1], state=q8, positions=ctx)
            # a decode step's output error is bounded by the value error (weights sum to 1) plus score error
            assert (a - b).abs().max() < 2e-2 * a.abs().max()
    assert bool(((q8.k - full.k).abs() <= q8.ks_buf[:, :, :20] / 2 * (1 + 1e-5)).all())
    assert bool(((q8.v - full.v).abs() <= q8.vs_buf[:, :, :20] / 2 * (1 + 1e-5)).all())


@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_int8_cache_bytes_as_computed(dtype, ratio):
    b, t, d = 2, 33, 64
    full = KVState.empty(b, KV, d, "cpu", dtype)
    q8 = Int8KVState.empty(b, KV, d, "cpu", dtype)
    k = torch.randn(b, KV, t, d).to(dtype)
    pos = torch.arange(t).expand(b, t)
    full.append(k, k, pos)
    q8.append(k, k, pos)
    assert kv_bytes(full) == 2 * b * KV * t * d * ratio
    assert kv_bytes(q8) == 2 * b * KV * t * (d + 4)  # int8 codes + one fp32 scale per token and head
    assert kv_bytes(q8) / kv_bytes(full) == pytest.approx((d + 4) / (ratio * d))
    assert q8.k.dtype == dtype
