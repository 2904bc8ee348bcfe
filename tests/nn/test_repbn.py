"""RepBN folds exactly at inference; PRepBN's LayerNorm weight goes 1 -> 0 over its warmup; a whole
model folds with unchanged outputs; misuse is refused."""

from __future__ import annotations

import pytest
import torch

from efformer import create_model
from efformer.errors import CapabilityError, ConfigError
from efformer.nn.repbn import FoldedNorm, ProgressiveRepBN, RepBN, fold_repbn


def _trained(norm: torch.nn.Module, steps: int = 5) -> torch.nn.Module:
    """A few training-mode calls (running statistics move away from 0/1) and random affine weights."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    norm.train()
    for _ in range(steps):
        norm(torch.randn(3, 7, 16, generator=gen) * 2 + 1)
    return norm.eval()


def test_repbn_folded_equals_unfolded_in_eval():
    norm = _trained(RepBN(16))
    x = torch.randn(2, 5, 16) * 3
    folded = norm.folded()
    assert isinstance(folded, FoldedNorm)
    assert torch.allclose(folded(x), norm(x), atol=1e-5)
    assert torch.allclose(norm(x), norm.bn(x.reshape(-1, 16)).reshape(x.shape) + norm.alpha * x, atol=1e-6)


def test_prepbn_schedule_moves_layernorm_weight_from_one_to_zero():
    norm = ProgressiveRepBN(16, warmup=4)
    x = torch.randn(2, 5, 16)
    assert norm.gamma == 1.0
    norm.train()
    assert torch.equal(norm(x), norm.ln(x))  # step 0: LayerNorm only
    gammas = [norm.gamma]
    for _ in range(5):
        norm(x)
        gammas.append(norm.gamma)
    assert gammas == [0.75, 0.5, 0.25, 0.0, 0.0, 0.0]
    norm.eval()
    norm(x)
    assert int(norm.step) == 6  # eval calls do not advance the schedule


def test_prepbn_mixes_layernorm_and_repbn_by_gamma():
    norm = _trained(ProgressiveRepBN(16, warmup=10), steps=3)  # gamma = 0.7
    x = torch.randn(2, 5, 16)
    assert norm.gamma == pytest.approx(0.7)
    assert torch.allclose(norm(x), 0.7 * norm.ln(x) + 0.3 * norm.repbn(x), atol=1e-6)
    with pytest.raises(CapabilityError, match="does not fold"):
        norm.folded()


def test_finished_prepbn_folds_exactly():
    norm = _trained(ProgressiveRepBN(16, warmup=2), steps=4)
    x = torch.randn(2, 5, 16)
    assert torch.allclose(norm.folded()(x), norm(x), atol=1e-5)


def test_a_model_with_repbn_folds_with_unchanged_outputs():
    model = create_model("lm-tiny", mixer="sla", norm="repbn", positional="sinusoidal", d_model=32, n_heads=4,
                         max_len=64)
    ids = torch.randint(0, 256, (4, 12))
    model.train()
    for _ in range(3):
        model(ids)
    model.eval()
    before = model(ids)
    fold_repbn(model)
    assert not any(isinstance(m, RepBN) for m in model.modules())
    assert torch.allclose(model(ids), before, atol=1e-5)


def test_misuse_is_refused():
    with pytest.raises(ConfigError, match="warmup"):
        ProgressiveRepBN(8, warmup=0)
    with pytest.raises(CapabilityError, match="eval"):
        fold_repbn(RepBN(8).train())
    with pytest.raises(CapabilityError, match="more than one token"):
        RepBN(8).train()(torch.randn(1, 1, 8))
