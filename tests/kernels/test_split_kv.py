"""Split-KV decode == softmax attention (SDPA) to fp32 rounding, at odd chunk counts, with GQA,
masks and biases; and a softmax mixer decoding through it == full recomputation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from efformer.errors import CapabilityError, ConfigError, ShapeError
from efformer.kernels.split_kv import split_kv_attention
from tests.helpers import make_mixer


@pytest.mark.parametrize(("t", "chunk"), [(1, 4), (7, 3), (97, 32), (100, 14), (1000, 143), (64, 64)])
@pytest.mark.parametrize("group", [1, 4])
def test_split_kv_equals_sdpa(t, chunk, group):
    torch.manual_seed(t)
    q = torch.randn(2, 4, 1, 16, dtype=torch.float64)
    k = torch.randn(2, 4 // group, t, 16, dtype=torch.float64)
    v = torch.randn(2, 4 // group, t, 16, dtype=torch.float64)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=group > 1)
    got = split_kv_attention(q, k, v, chunk_size=chunk)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got32 = split_kv_attention(q.float(), k.float(), v.float(), chunk_size=chunk)
    torch.testing.assert_close(got32, want.float(), rtol=2e-6, atol=2e-6)


def test_split_kv_masks_bias_and_several_queries():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 50, 8), torch.randn(2, 2, 50, 8)
    keep = torch.rand(2, 1, 1, 50) > 0.5
    keep[..., 0] = True
    bias = torch.randn(2, 4, 3, 50)
    for mask in (keep, bias, bias.masked_fill(~keep, float("-inf"))):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        # 7 chunks, the last one holding 2 keys; with the mask some chunks hold no allowed key
        torch.testing.assert_close(split_kv_attention(q, k, v, mask, chunk_size=8), want, rtol=1e-5, atol=1e-6)


def test_split_kv_gradients_match():
    torch.manual_seed(1)
    q = torch.randn(1, 2, 1, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 37, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 37, 8, dtype=torch.float64, requires_grad=True)
    gw = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v).square().sum(), (q, k, v))
    gs = torch.autograd.grad(split_kv_attention(q, k, v, chunk_size=5).square().sum(), (q, k, v))
    for a, b in zip(gw, gs, strict=True):
        torch.testing.assert_close(b, a)


def test_split_kv_refusals():
    q, k = torch.randn(1, 3, 1, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ShapeError):
        split_kv_attention(q, k, k)
    with pytest.raises(ConfigError, match="chunk_size"):
        split_kv_attention(q[:, :2], k, k, chunk_size=0)


def test_softmax_decode_through_split_kv_equals_full_forward():
    import efformer.mixers.softmax as sm

    mixer = make_mixer("softmax", True, split_kv_from=3)
    x = torch.randn(2, 11, 32)
    full, _ = mixer(x)
    old, sm.SPLIT_KV_CHUNK = sm.SPLIT_KV_CHUNK, 3  # 1 to 4 chunks over the steps
    try:
        state = mixer.init_state(2, "cpu", torch.float32)
        steps = [mixer(x[:, i : i + 1], state=state)[0] for i in range(11)]
    finally:
        sm.SPLIT_KV_CHUNK = old
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-6)


ROOT = Path(__file__).resolve().parents[2]

# A fresh interpreter: TRITON_INTERPRET must be set before triton decorates the kernels.
_INTERPRETED = textwrap.dedent(
    """
    import torch
    from efformer.kernels.split_kv import split_kv_attention

    torch.manual_seed(0)
    # odd chunk counts (1, 3, 4, 8 chunks; last chunks partly filled), GQA groups 1/2/4, 1 and 3 queries;
    # bool masks and biases, with a chunk holding no allowed key
    for t, chunk, group, n in [(1, 4, 1, 1), (7, 3, 4, 1), (97, 32, 2, 3), (50, 7, 4, 3)]:
        q, k, v = torch.randn(2, 4, n, 16), torch.randn(2, 4 // group, t, 16), torch.randn(2, 4 // group, t, 16)
        masks = [None]
        if n == 3:
            keep = torch.rand(2, 1, n, t) > 0.5
            keep[..., -1] = True
            keep[..., : min(chunk, t - 1)] = False  # a chunk with no allowed key contributes nothing
            masks += [keep, torch.randn(2, 4, n, t).masked_fill(~keep, float("-inf"))]
        for mask in masks:
            want = split_kv_attention(q, k, v, mask, chunk_size=chunk, backend="torch")
            got = split_kv_attention(q, k, v, mask, chunk_size=chunk, backend="triton")
            err = float((got - want).abs().max())
            assert err < 2e-6, (t, chunk, group, n, mask is None, err)
    print("ok")
    """
)


def test_triton_split_kv_interpreted_matches_torch():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    r = subprocess.run([sys.executable, "-c", _INTERPRETED], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_auto_picks_torch_on_cpu_and_triton_refuses_what_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(split_kv_attention(q, k, k, chunk_size=2),
                               split_kv_attention(q, k, k, chunk_size=2, backend="torch"))
    with pytest.raises(CapabilityError, match="TRITON_INTERPRET"):
        split_kv_attention(q, k, k, backend="triton")
    with pytest.raises(ConfigError, match="backend"):
        split_kv_attention(q, k, k, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled Triton kernel needs a CUDA GPU")
@pytest.mark.parametrize("t", [1, 1000, 65536])
def test_triton_split_kv_on_cuda_matches_sdpa(t):
    q, k, v = torch.randn(2, 8, 1, 64, device="cuda"), torch.randn(2, 2, t, 64, device="cuda"), \
        torch.randn(2, 2, t, 64, device="cuda")
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(split_kv_attention(q, k, v, chunk_size=1024, backend="triton"), want,
                               rtol=1e-4, atol=1e-5)
