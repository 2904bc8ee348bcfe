"""Importance scores: each against an oracle (finite differences for the Taylor forms, a hand-computed
Wanda, an identity block for block influence) and the units they must rank last."""

from __future__ import annotations

import pytest
import torch

import efformer
from efformer.compress import importance
from efformer.compress.importance import calibration_loss, gated, scores
from efformer.compress.prune import owners
from efformer.errors import CapabilityError, ConfigError, ShapeError


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_layers=2, n_heads=4, max_len=64, mixer_options={"n_kv_heads": 2}, ffn_mult=3.0)
    return efformer.create_model("lm-tiny", **{**cfg, **kw}).double().eval()


CAL = torch.randint(1, 256, (4, 16), generator=torch.Generator().manual_seed(1))


def _kill_neuron(m, layer, j):
    with torch.no_grad():
        m.backbone.blocks[layer].ffn.down.weight[:, j] = 0


@pytest.mark.parametrize("method", ["magnitude", "wanda", "taylor", "amp", "optin"])
def test_dead_neuron_ranks_last(method):
    m = tiny()
    _kill_neuron(m, 1, 7)
    if method == "magnitude":  # magnitude also counts the input rows: kill them too
        with torch.no_grad():
            h = m.backbone.blocks[1].ffn.down.in_features
            m.backbone.blocks[1].ffn.gate_up.weight[[7, h + 7]] = 0
    s = scores(m, method, "neurons", CAL)
    assert len(s) == 2 and s[1].shape == (64,)
    assert s[1][7] == s[1].min() and s[1][7] < 1e-10 and s[1].max() > 0


def test_wanda_matches_hand_computation():
    m = tiny()
    down = m.backbone.blocks[0].ffn.down
    xs = []
    h = down.register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        m(CAL)
    h.remove()
    x = torch.cat(xs)
    want = (down.weight.abs() * x.norm(dim=0)[None, :]).sum(0)
    got = scores(m, "wanda", "neurons", CAL)[0]
    torch.testing.assert_close(got, want.double(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method,loss,what", [("taylor", "ce", "neurons"), ("taylor", "ce", "heads"),
                                              ("amp", "entropy", "neurons")])
def test_taylor_is_the_derivative_of_scaling_the_unit(method, loss, what):
    """sum over the unit's weights of g*w = d/da L(unit's weights scaled by a) at a = 1."""
    m = tiny()
    s = scores(m, method, what, CAL)
    layer, unit = 1, 1
    blk = m.backbone.blocks[layer]
    params = dict(blk.named_parameters())
    orig = {k: v.detach().clone() for k, v in params.items()}

    def loss_at(a):
        with torch.no_grad():
            for name, (dim, own) in owners(blk, what).items():
                p = params[name]
                p.copy_(orig[name])
                idx = (own == unit).nonzero().flatten()
                p.index_copy_(dim, idx, orig[name].index_select(dim, idx) * a)
            total = sum(calibration_loss(m, CAL[i:i + 8], loss) for i in range(0, CAL.shape[0], 8))
            for name in owners(blk, what):
                params[name].copy_(orig[name])
            return float(total)

    eps = 1e-5
    fd = (loss_at(1 + eps) - loss_at(1 - eps)) / (2 * eps)
    assert abs(abs(fd) - float(s[layer][unit])) < 1e-6 * max(1.0, abs(fd))


def test_gating_a_unit_off_equals_zeroing_its_output_weights():
    m = tiny()
    gates = [torch.ones(64, dtype=torch.float64), torch.ones(64, dtype=torch.float64)]
    gates[0][[3, 9]] = 0
    with torch.no_grad(), gated(m, "neurons", gates):
        got = m(CAL)
    _kill_neuron(m, 0, [3, 9])
    with torch.no_grad():
        assert torch.equal(got, m(CAL))


def test_block_influence_of_an_identity_block_is_zero():
    m = tiny(n_layers=3)
    with torch.no_grad():
        m.backbone.blocks[1].mixer.out_proj.weight.zero_()
        m.backbone.blocks[1].ffn.down.weight.zero_()
    bi = torch.cat(scores(m, "block-influence", "blocks", CAL))
    assert abs(float(bi[1])) < 1e-12 and bool((bi[[0, 2]] > 1e-3).all())


def test_optin_ranks_globally_comparable_scores():
    m = tiny()
    s = scores(m, "optin", "heads", CAL)
    assert [t.shape for t in s] == [(2,), (2,)] and all(bool((t > 0).all()) for t in s)


@pytest.mark.parametrize("method,what,cal,error,message", [
    ("wanda", "neurons", None, ConfigError, "needs calibration"),
    ("taylor", "heads", "bad", ShapeError, "LongTensor"),
    ("amp", "heads", CAL, ConfigError, "amp scores neurons"),
    ("block-influence", "neurons", CAL, ConfigError, "block-influence scores blocks"),
    ("magnitude", "blocks", CAL, ConfigError, "use block-influence"),
    ("snip", "neurons", CAL, ConfigError, "one of magnitude"),
    ("magnitude", "layers", CAL, ConfigError, "one of heads"),
])
def test_bad_requests_refused(method, what, cal, error, message):
    with pytest.raises(error, match=message):
        scores(tiny(), method, what, cal)


def test_dual_encoder_needs_no_calibration_method():
    torch.manual_seed(0)
    d = efformer.create_model("dual-tiny", d_model=32)
    assert len(scores(d, "magnitude", "neurons")) == 2
    with pytest.raises(CapabilityError, match="dual encoder"):
        importance.check_method(d, "wanda", "neurons", CAL)
