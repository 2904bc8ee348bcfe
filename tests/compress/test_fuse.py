"""FuseGPT fusion: zero steps = plain depth pruning exactly; tuning brings the fused model closer to the
original than plain removal; the result has the depth-pruned shapes and saves/loads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import efformer
from efformer.compress.fuse import fuse
from efformer.compress.prune import PrunePlan, apply_plan
from efformer.errors import ConfigError


def tiny():
    torch.manual_seed(0)
    return efformer.create_model("lm-tiny", d_model=32, n_layers=3, n_heads=4, max_len=64, ffn_mult=3.0).eval()


CAL = torch.randint(1, 256, (8, 16), generator=torch.Generator().manual_seed(1))


def _kl(model, ref):
    with torch.no_grad():
        t, s = ref(CAL).log_softmax(-1), model(CAL).log_softmax(-1)
    return float(F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean())


def test_zero_steps_is_plain_removal():
    m = tiny()
    f, plain = fuse(m, [1], CAL, steps=0), apply_plan(m, PrunePlan(blocks=[1]))
    assert f.cfg == plain.cfg
    assert all(torch.equal(a, b) for a, b in zip(f.state_dict().values(), plain.state_dict().values(), strict=True))


@pytest.mark.slow
def test_fusion_recovers_and_saves(tmp_path):
    m = tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    plain = apply_plan(m, PrunePlan(blocks=[1]))
    f = fuse(m, [1], CAL, steps=30, lr=3e-2)
    assert _kl(f, m) < 0.9 * _kl(plain, m)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # input untouched
    assert {k: v.shape for k, v in f.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    efformer.save(f, tmp_path / "f")
    g = efformer.load(tmp_path / "f").eval()
    with torch.no_grad():
        assert torch.equal(g(CAL), f(CAL))


@pytest.mark.parametrize("kw,message", [({"rank": 0}, "rank"), ({"steps": -1}, "steps")])
def test_bad_arguments(kw, message):
    with pytest.raises(ConfigError, match=message):
        fuse(tiny(), [1], CAL, **kw)
    with pytest.raises(ConfigError, match="calibration"):
        fuse(tiny(), [1], None)
