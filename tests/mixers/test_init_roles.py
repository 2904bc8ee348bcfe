"""Init roles: every mixer names views of its own weights, and DeepNorm scales exactly those."""

from __future__ import annotations

import copy

import pytest
import torch

from efformer.models.block import Block, deepnorm_constants
from efformer.models.config import ModelConfig, build_config
from efformer.registry import MIXERS
from tests.helpers import case_id, mixer_cases

# Weightless mixers (MetaFormer's pooling and identity) have no roles to declare.
CASES = [c for c in mixer_cases() if any(True for _ in MIXERS.get(c[0])(32, 4, causal=c[1]).parameters())]
N_LAYERS = 3


def _role_counts(mixer) -> dict[str, torch.Tensor]:
    """Per parameter, how many times each element is named by a role (written through the role views)."""
    counted = copy.deepcopy(mixer)
    with torch.no_grad():
        for p in counted.parameters():
            p.zero_()
        roles = counted.init_roles()
        for t in roles["value"] + roles["output"]:
            t.add_(1)
    return {k: p.detach() for k, p in counted.named_parameters()}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_init_roles_are_views_of_the_mixers_own_parameters(case):
    name, causal = case
    cls = MIXERS.get(name)
    torch.manual_seed(0)
    m = cls(32, 4, causal=causal, options=cls.test_options, max_len=cls.test_max_len)
    roles = m.init_roles()
    has_weights = any(True for _ in m.parameters())  # a parameter-free mixer (FNet) has nothing to scale
    assert set(roles) == {"value", "output"} and (roles["output"] or not has_weights), f"{name}: roles {sorted(roles)}"
    storages = {p.untyped_storage().data_ptr() for p in m.parameters()}
    for t in roles["value"] + roles["output"]:
        assert t.untyped_storage().data_ptr() in storages, f"{name}: a role tensor is not a view of a parameter"
    counts = _role_counts(m)
    overlap = has_weights and max(c.max().item() for c in counts.values()) > 1
    assert not overlap, f"{name}: roles overlap (DeepNorm would scale twice)"
    assert sum(c.sum().item() for c in counts.values()) == sum(t.numel() for t in roles["value"] + roles["output"])


def _block(name: str, causal: bool, placement: str) -> Block:
    cls = MIXERS.get(name)
    task = {"task": "lm"} if causal else {"task": "classifier"}
    make = ModelConfig.model_validate if cls.capabilities.grid else build_config  # (text configs refuse 2-D mixers)
    cfg = make(dict(d_model=32, n_heads=4, n_layers=N_LAYERS, norm_placement=placement, positional="none",
                    mixer=name, mixer_options=cls.test_options, max_len=cls.test_max_len, **task))
    torch.manual_seed(0)
    return Block(cfg, name, cls.test_options)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_deepnorm_scales_exactly_the_declared_roles(case):
    name, causal = case
    pre, deep = _block(name, causal, "pre"), _block(name, causal, "deepnorm")
    beta = deepnorm_constants(N_LAYERS)[1]
    counts = _role_counts(pre.mixer)
    plain = dict(pre.mixer.named_parameters())
    for k, p in deep.mixer.named_parameters():
        want = torch.where(counts[k] > 0, plain[k] * beta, plain[k])
        assert torch.equal(p, want), f"{name}.{k}: DeepNorm must scale its role elements by beta, nothing else"
    assert any((c > 0).any() for c in counts.values()) or not counts
