"""SLA: equals its formula written out (ReLU kernel attention + depthwise convolution of V), the
convolution carries across decode calls, bad options refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from efformer.errors import CapabilityError, ConfigError
from tests.helpers import make_mixer, rel_err, with_form


def _sla_by_hand(m, x: torch.Tensor) -> torch.Tensor:
    """O_i = sum_j a_ij v_j / sum_j a_ij + sum_t w_t v_{i+t} (+ bias), a_ij = relu(q_i).relu(k_j), loops over taps."""
    h = m.n_heads
    q = F.relu(m.split_heads(m.q_proj(x)))
    k, v = m.split_heads(m.kv_proj(x), 2 * h).chunk(2, dim=1)
    a = q @ F.relu(k).transpose(-1, -2)
    n = x.shape[1]
    if m.causal:
        a = a * torch.ones(n, n).tril()
    o = (a @ v) / a.sum(-1, keepdim=True).clamp_min(1e-6)
    kw = m.opts.conv_kernel
    taps = range(-(kw - 1), 1) if m.causal else range(-(kw // 2), kw // 2 + 1)
    conv = torch.zeros_like(v) + m.dwc_bias
    for idx, t in enumerate(taps):  # output i reads v_{i+t} with weight w[idx]
        shifted = torch.zeros_like(v)
        lo, hi = max(0, -t), min(n, n - t)
        shifted[:, :, lo:hi] = v[:, :, lo + t : hi + t]
        conv = conv + shifted * m.dwc_weight[:, idx]
    return m.out_proj(m.merge_heads(o + conv))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_sla_equals_its_formula_in_every_form(causal, kernel):
    m = make_mixer("sla", causal, conv_kernel=kernel)
    x = torch.randn(2, 13, 32)
    expected = _sla_by_hand(m, x)
    for form in m.capabilities.forms:
        assert rel_err(expected, with_form(m, form)(x)[0]) < 1e-5, form


def test_even_kernel_only_when_causal_and_no_bidirectional_state():
    with pytest.raises(ConfigError, match="odd"):
        make_mixer("sla", False, conv_kernel=4)
    make_mixer("sla", True, conv_kernel=4)
    with pytest.raises(CapabilityError, match="decode state"):
        make_mixer("sla", False).init_state(1, "cpu", torch.float32)
    with pytest.raises(ConfigError, match="conv_kernel"):
        make_mixer("sla", True, conv_kernel=0)


def test_decode_with_a_wide_convolution_matches_the_full_forward():
    m = with_form(make_mixer("sla", True, conv_kernel=6), "recurrent")
    x = torch.randn(2, 9, 32)
    full, _ = m(x)
    state = m.init_state(2, "cpu", torch.float32)
    parts = [m(x[:, i : i + 1], state=state)[0] for i in range(9)]
    assert rel_err(full, torch.cat(parts, 1)) < 1e-5
