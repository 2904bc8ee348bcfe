"""Chunkwise gated linear attention: parallel == chunked == recurrent == Triton, states and gradients."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from efformer.errors import CapabilityError, ConfigError, ShapeError
from efformer.kernels.chunk_gla import chunk_gla, chunk_gla_recompute, chunk_gla_torch, gla_parallel, gla_recurrent
from tests.helpers import rel_err

ROOT = Path(__file__).resolve().parents[2]


def _inputs(t, gate="dim", b=2, h=3, dk=5, dv=6, strength=1.0, seed=0):
    """q, k, v, log-gates (<= 0) and an initial state, all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, t, dk, generator=gen) for _ in range(2))
    v = torch.randn(b, h, t, dv, generator=gen)
    g = -torch.rand(b, h, t, dk if gate == "dim" else 1, generator=gen) * strength
    s0 = torch.randn(b, h, dk, dv, generator=gen)
    return [x.requires_grad_() for x in (q, k, v, g, s0)]


def _run(fn, ins, seed=1):
    """Outputs, final state and the gradients of a random projection of both w.r.t. every input."""
    o, s = fn(*ins)
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen)).sum() + (s * torch.randn(s.shape, generator=gen)).sum()
    return o, s, torch.autograd.grad(loss, ins)


FORMS = {
    "recurrent": gla_recurrent,
    "chunked-8/4": lambda *a: chunk_gla_torch(*a, chunk_size=8, sub_chunk=4),
    "chunked-8/8": lambda *a: chunk_gla_torch(*a, chunk_size=8, sub_chunk=8),
    "chunked-16/2": lambda *a: chunk_gla_torch(*a, chunk_size=16, sub_chunk=2),
}


@pytest.mark.parametrize("gate", ["dim", "scalar"])
@pytest.mark.parametrize("t", [1, 7, 13, 67])
def test_parallel_chunked_recurrent_agree(t, gate):
    ins = _inputs(t, gate)
    o_ref, s_ref, g_ref = _run(gla_parallel, ins)
    for name, fn in FORMS.items():
        o, s, grads = _run(fn, ins)
        assert rel_err(o_ref, o) < 1e-5, f"{name}: output"
        assert rel_err(s_ref, s) < 1e-5, f"{name}: final state"
        for label, a, b in zip("q k v g s0".split(), g_ref, grads, strict=True):
            assert rel_err(a, b) < 1e-5, f"{name}: grad {label} at t={t}"


def test_initial_state_continues_the_sequence():
    q, k, v, g, _ = (x.detach() for x in _inputs(29))
    o_full, s_full = gla_parallel(q, k, v, g)
    o1, s1 = chunk_gla_torch(q[:, :, :10], k[:, :, :10], v[:, :, :10], g[:, :, :10], chunk_size=8, sub_chunk=4)
    o2, s2 = chunk_gla_torch(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], g[:, :, 10:], s1, chunk_size=8, sub_chunk=4)
    assert rel_err(o_full, torch.cat([o1, o2], 2)) < 1e-5
    assert rel_err(s_full, s2) < 1e-5


def test_padded_step_leaves_state_unchanged():
    q, k, v, g, s0 = (x.detach() for x in _inputs(13))
    pad = torch.zeros(13, dtype=torch.bool)
    pad[[0, 1, 5, 12]] = True  # left padding, a hole, and the last step
    k2, g2 = k.masked_fill(pad[:, None], 0.0), g.masked_fill(pad[:, None], 0.0)
    v2 = v.masked_fill(pad[:, None], 7.0)  # whatever a padded value is, k = 0 removes it
    _, s_pad = chunk_gla_torch(q, k2, v2, g2, s0, chunk_size=8, sub_chunk=4)
    real = ~pad
    _, s_real = gla_recurrent(q[:, :, real], k[:, :, real], v[:, :, real], g[:, :, real], s0)
    assert rel_err(s_real, s_pad) < 1e-5


@pytest.mark.parametrize("strength", [5.0, 60.0])
def test_long_sequence_with_strong_decay_is_finite_and_exact(strength):
    # Cumulative log-gates reach -strength * 64 per chunk: exp(-cumsum) would overflow at once.
    ins = _inputs(2048, "dim", b=1, h=2, dk=8, dv=8, strength=strength, seed=3)
    with torch.no_grad():
        ins[3][..., ::97, :] = 0.0  # some gates of exactly 1 (no decay) between strong ones
    o, s, grads = _run(lambda *a: chunk_gla_torch(*a, chunk_size=64, sub_chunk=16), ins)
    assert all(torch.isfinite(x).all() for x in (o, s, *grads))
    o_rec, s_rec = gla_recurrent(*ins)
    assert rel_err(o_rec, o) < 1e-5 and rel_err(s_rec, s) < 1e-5


def test_dispatch_and_errors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, g, s0 = (x.detach() for x in _inputs(9))
    o_auto, s_auto = chunk_gla(q, k, v, g, s0, chunk_size=8, sub_chunk=4)  # CPU tensors -> torch
    o_t, s_t = chunk_gla_torch(q, k, v, g, s0, chunk_size=8, sub_chunk=4)
    assert torch.equal(o_auto, o_t) and torch.equal(s_auto, s_t)
    with pytest.raises(CapabilityError, match="TRITON_INTERPRET"):
        chunk_gla(q, k, v, g, backend="triton")
    with pytest.raises(ConfigError, match="backend"):
        chunk_gla(q, k, v, g, backend="cuda")
    with pytest.raises(ConfigError, match="chunk_size"):
        chunk_gla_torch(q, k, v, g, chunk_size=12, sub_chunk=8)
    with pytest.raises(ShapeError, match="initial_state"):
        chunk_gla(q, k, v, g, s0[:, :, :2])
    with pytest.raises(ShapeError, match="need q, k, g"):
        gla_parallel(q, k[..., :2], v, g)


# Runs in a fresh interpreter: TRITON_INTERPRET must be set before triton decorates the kernels.
_INTERPRETED = textwrap.dedent(
    """
    import torch
    from efformer.kernels.chunk_gla import chunk_gla
    from efformer.registry import MIXERS
    from tests.helpers import make_mixer, rel_err, with_form
    from tests.kernels.test_chunk_gla import _inputs, _run

    for t, gate, dv in [(1, "dim", 6), (16, "scalar", 3), (37, "dim", 20)]:
        ins = _inputs(t, gate, b=1, h=2, dk=5, dv=dv)
        ref = _run(lambda *a: chunk_gla(*a, chunk_size=8, sub_chunk=4, backend="torch"), ins)
        got = _run(lambda *a: chunk_gla(*a, backend="triton"), ins)
        for name, a, b in zip("o s dq dk dv dg ds0".split(), [ref[0], ref[1], *ref[2]], [got[0], got[1], *got[2]]):
            assert rel_err(a, b) < 1e-5, (t, gate, name, rel_err(a, b))
    ins = _inputs(20, "dim", b=1, h=2, dk=5, dv=6)[:4]  # no initial state
    ref = _run(lambda *a: chunk_gla(*a, backend="torch"), ins)
    got = _run(lambda *a: chunk_gla(*a, backend="triton"), ins)
    assert all(rel_err(a, b) < 1e-5 for a, b in zip([*ref[:2], *ref[2]], [*got[:2], *got[2]]))
    for name in ("retnet", "gla", "simple_gla"):
        m = make_mixer(name, True)
        x = torch.randn(2, 17, 32)
        mask = torch.ones(2, 17, dtype=torch.bool)
        mask[0, :4] = False
        y_ref, _ = with_form(m, "chunked")(x, mask=mask)
        y, _ = with_form(m, "triton")(x, mask=mask)
        assert rel_err(y_ref, y) < 1e-5, name
    print("ok")
    """
)


def test_triton_kernel_interpreted_matches_torch():
    # src first: the venv's editable install may point at another checkout of efformer.
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    r = subprocess.run(
        [sys.executable, "-c", _INTERPRETED], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled Triton kernel needs a CUDA GPU")
@pytest.mark.parametrize("t", [1, 100, 1000])
def test_triton_kernel_on_cuda_matches_torch(t):
    ins = [x.detach().cuda().requires_grad_() for x in _inputs(t, "dim", b=2, h=4, dk=64, dv=128)]
    ref = _run(lambda *a: chunk_gla(*a, backend="torch"), ins)
    got = _run(lambda *a: chunk_gla(*a, backend="triton"), ins)
    for a, b in zip([*ref[:2], *ref[2]], [*got[:2], *got[2]], strict=True):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("gate", ["dim", "scalar"])
@pytest.mark.parametrize("t", [1, 7, 13, 67])
def test_recompute_matches_autograd_of_the_chunked_form(t, gate):
    """The hand-written backward equals autograd's on the torch form, with groups that split the chunks."""
    ins = _inputs(t, gate)
    for cs, sc, group in ((8, 4, 1), (8, 8, 3), (16, 2, 16)):
        o_ref, s_ref, g_ref = _run(lambda *a, cs=cs, sc=sc: chunk_gla_torch(*a, chunk_size=cs, sub_chunk=sc), ins)
        o, s, grads = _run(lambda *a, cs=cs, sc=sc, group=group: chunk_gla_recompute(*a, cs, sc, group), ins)
        assert rel_err(o_ref, o) < 1e-6 and rel_err(s_ref, s) < 1e-6, f"chunks {cs}/{sc}/{group}"
        for label, a, b in zip("q k v g s0".split(), g_ref, grads, strict=True):
            assert rel_err(a, b) < 1e-5, f"grad {label} at t={t}, chunks {cs}/{sc}/{group}"


@pytest.mark.parametrize("gate", ["dim", "scalar"])
def test_recompute_gradcheck(gate):
    """gradcheck of the recomputing Function in float64 on a tiny shape (two groups, a padded chunk)."""
    ins = [x.detach().double().requires_grad_() for x in _inputs(7, gate, b=1, h=2, dk=3, dv=2)]

    def fn(*a):
        o, s = chunk_gla_recompute(*a, chunk_size=4, sub_chunk=2, chunks_per_group=1)
        return o, s

    assert torch.autograd.gradcheck(fn, ins)


def test_recompute_backs_up_only_the_output_or_only_the_state():
    q, k, v, g, s0 = _inputs(9)
    o, _ = chunk_gla_recompute(q, k, v, g, s0, 4, 2, 1)
    got = torch.autograd.grad(o.sum(), (q, s0))
    ref = torch.autograd.grad(chunk_gla_torch(q, k, v, g, s0, 4, 2)[0].sum(), (q, s0))
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(ref, got, strict=True))
    _, s = chunk_gla_recompute(q, k, v, g, s0, 4, 2, 1)
    got = torch.autograd.grad(s.sum(), (k, g))
    ref = torch.autograd.grad(chunk_gla_torch(q, k, v, g, s0, 4, 2)[1].sum(), (k, g))
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(ref, got, strict=True))
