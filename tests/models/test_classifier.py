"""Sequence classifier and dual encoder: pooling, padding invariance, shared towers, every
bidirectional mixer trains a step."""

from __future__ import annotations

import pytest
import torch

import efformer
from efformer.registry import MIXERS

BIDIR_MIXERS = [m for m in MIXERS.names() if MIXERS.get(m).capabilities.bidirectional
                and not MIXERS.get(m).capabilities.grid]  # (2-D mixers: tests/models/test_vision.py)


def _clf(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, max_len=64, n_classes=3)
    return efformer.create_model("classifier-tiny", **{**base, **kw}).eval()


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_right_padding_never_changes_the_prediction(pooling):
    model = _clf(pooling=pooling)
    ids = torch.randint(1, 32, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    ids2 = ids.clone()
    ids2[1, 5:] = torch.randint(1, 32, (4,))
    a, b = model(ids, mask=mask), model(ids2, mask=mask)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(a[1], model(ids[1:, :5])[0], atol=1e-5)  # padded == unpadded


def test_mean_pooling_is_the_mean_of_kept_states():
    model = _clf()
    ids = torch.randint(1, 32, (1, 6))
    mask = torch.tensor([[True, True, True, False, False, False]])
    h = model.backbone(model.backbone.embed_tokens(ids), mask=mask)
    assert torch.allclose(model.encode(ids, mask), h[:, :3].mean(1), atol=1e-6)


def test_dual_encoder_shares_its_tower_and_uses_uv_features():
    torch.manual_seed(0)
    model = efformer.create_model("dual-tiny", vocab_size=32, d_model=32).eval()
    a, b = torch.randint(1, 32, (2, 7)), torch.randint(1, 32, (2, 5))
    u, v = model.encode(a), model.encode(b)
    feats = torch.cat([u, v, u * v, u - v], -1)
    assert torch.allclose(model(a, b), model.head(feats), atol=1e-6)
    assert model.head[0].in_features == 4 * 32
    simple = efformer.create_model("dual-tiny", vocab_size=32, d_model=32, dual_features="uv")
    assert simple.head[0].in_features == 2 * 32


@pytest.mark.parametrize("mixer", BIDIR_MIXERS)
def test_every_bidirectional_mixer_trains_a_step_in_a_classifier(mixer):
    caps = MIXERS.get(mixer).capabilities
    model = _clf(mixer=mixer, mixer_options=MIXERS.get(mixer).test_options).train()
    ids = torch.randint(1, 32, (4, 13))
    mask = torch.ones(4, 13, dtype=torch.bool)
    if caps.padding_mask:
        mask[0, 9:] = False
    labels = torch.tensor([0, 1, 2, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(ids, mask=mask if caps.padding_mask else None), labels)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert changed >= len(before) // 2


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_causal_encoder_runs_causal_only_mixers_and_ignores_padding(pooling):
    causal_only = [m for m in MIXERS.names() if not MIXERS.get(m).capabilities.bidirectional]
    mixer = causal_only[0] if causal_only else "softmax"
    model = _clf(mixer=mixer, encoder_causal=True, pooling=pooling, positional="none")
    assert model.backbone.blocks[0].mixer.causal
    ids = torch.randint(1, 32, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    ids2 = ids.clone()
    ids2[1, 6:] = torch.randint(1, 32, (3,))
    assert torch.allclose(model(ids, mask=mask), model(ids2, mask=mask), atol=1e-5)
    assert torch.allclose(model(ids, mask=mask)[1], model(ids[1:, :6])[0], atol=1e-4)
    if pooling == "cls":  # the CLS token sits last and sees every token: changing the first changes it
        ids3 = ids.clone()
        ids3[0, 0] = (ids3[0, 0] % 31) + 1
        assert not torch.allclose(model(ids)[0], model(ids3)[0])
