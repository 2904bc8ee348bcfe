"""Low-rank attention (linformer, nystromformer): exact limits, landmarks, padding, refusals."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import CapabilityError, ConfigError, ShapeError
from efformer.mixers.lowrank import iterative_pinv
from efformer.mixers.softmax import SoftmaxAttention
from efformer.registry import MIXERS
from tests.helpers import make_mixer, rel_err, with_form


def softmax_twin(m) -> SoftmaxAttention:
    """Exact bidirectional softmax attention with the same q/kv/out weights as ``m``."""
    sm = SoftmaxAttention(m.d_model, m.n_heads).eval()
    sm.load_state_dict(
        {k: v for k, v in m.state_dict().items() if k.split(".")[0] in ("q_proj", "kv_proj", "out_proj")}
    )
    return sm


# ---- Linformer -----------------------------------------------------------------------------
@pytest.mark.parametrize("sharing", ["none", "headwise", "kv"])
def test_linformer_with_identity_projections_is_softmax(sharing):
    n = 12
    m = make_mixer("linformer", False, k=n, max_len=n, sharing=sharing)
    with torch.no_grad():
        for p in (m.e_proj, getattr(m, "f_proj", m.e_proj)):
            p.copy_(torch.eye(n).expand_as(p))
    x = torch.randn(2, n, 32)
    want, _ = softmax_twin(m)(x)
    for form in ("reference", "fast"):
        assert rel_err(want, with_form(m, form)(x)[0]) < 1e-5, form


def test_linformer_sharing_modes_own_the_right_projections():
    none, head, kv = (make_mixer("linformer", False, k=5, max_len=16, sharing=s) for s in ("none", "headwise", "kv"))
    assert none.e_proj.shape == none.f_proj.shape == (4, 5, 16)  # one E and one F per head
    assert head.e_proj.shape == head.f_proj.shape == (1, 5, 16)
    assert kv.e_proj.shape == (1, 5, 16) and not hasattr(kv, "f_proj")  # E = F
    # kv sharing really uses E for the values: changing E changes the output even with keys fixed by E.
    x = torch.randn(1, 9, 32)
    y0, _ = kv(x)
    with torch.no_grad():
        kv.e_proj.mul_(-1)  # scores change sign in Q(EK)^T and values change sign in (EV)
    assert not torch.allclose(kv(x)[0], y0)


def test_linformer_right_padding_equals_the_unpadded_sequence():
    """Padded keys are zeroed before the projection, so a right-padded row sees what its prefix alone sees."""
    m = make_mixer("linformer", False)
    x = torch.randn(1, 13, 32)
    keep = torch.zeros(1, 13, dtype=torch.bool)
    keep[:, :8] = True
    for form in ("reference", "fast"):
        y_pad, _ = with_form(m, form)(x, mask=keep)
        y_short, _ = m(x[:, :8])
        assert rel_err(y_short, y_pad[:, :8]) < 1e-5, form


def test_linformer_refuses_causal():
    with pytest.raises(CapabilityError, match="bidirectional"):
        MIXERS.get("linformer")(32, 4, causal=True)


def test_linformer_refuses_sequences_longer_than_max_len():
    m = make_mixer("linformer", False, max_len=16)
    m(torch.randn(1, 16, 32))
    with pytest.raises(ShapeError, match="max_len=16"):
        m(torch.randn(1, 17, 32))


def test_linformer_options_are_validated():
    with pytest.raises(ConfigError, match="linformer.sharing"):
        make_mixer("linformer", False, sharing="layerwise")
    with pytest.raises(ConfigError, match="linformer.k"):
        make_mixer("linformer", False, k=0)


# ---- Nyströmformer --------------------------------------------------------------------------
def _nystrom_error(landmarks: int, pinv_iters: int, n: int = 24) -> float:
    """Mean relative error vs softmax (same weights) over three seeds, conv skip off."""
    errs = []
    for seed in range(3):
        torch.manual_seed(seed)
        m = MIXERS.get("nystromformer")(32, 4, options={"landmarks": landmarks, "pinv_iters": pinv_iters}).eval()
        x = torch.randn(2, n, 32)
        with torch.no_grad():
            errs.append(rel_err(softmax_twin(m)(x)[0], m(x)[0]))
    return sum(errs) / len(errs)


def test_nystrom_with_every_token_a_landmark_approaches_softmax():
    errs = {iters: _nystrom_error(24, iters) for iters in (6, 10, 20)}
    assert errs[6] > errs[10] > errs[20], errs  # the pseudo-inverse converges
    assert errs[20] < 1e-3, errs


def test_nystrom_error_falls_as_landmarks_grow():
    # At the default 6 iterations; an exact pseudo-inverse of the ill-conditioned landmark kernel
    # (near-uniform attention at init) amplifies errors, the truncated iteration regularises it.
    errs = [_nystrom_error(landmarks, 6) for landmarks in (4, 12, 24)]
    assert errs[0] > errs[1] > errs[2], errs


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    torch.manual_seed(0)
    a = (torch.randn(3, 6, 6) + 4 * torch.eye(6)).softmax(-1)  # softmax-like, well conditioned
    exact = torch.linalg.pinv(a)
    errs = [rel_err(exact, iterative_pinv(a, iters)) for iters in (1, 2, 3, 12)]
    assert errs[0] > errs[1] > errs[2] and errs[3] < 1e-5, errs  # cubic convergence to float precision


def test_nystrom_landmarks_are_segment_means_when_length_is_not_divisible():
    m = make_mixer("nystromformer", False, landmarks=3)
    q = torch.randn(1, 4, 7, 8)
    k = torch.randn(1, 4, 7, 8)
    lq, lk, valid = m._landmarks(q, k, None)
    segments = [(0, 3), (3, 5), (5, 7)]  # floor(j * 3 / 7): sizes 3, 2, 2
    for s, (a, b) in enumerate(segments):
        assert torch.allclose(lq[:, :, s], q[:, :, a:b].mean(2), atol=1e-6)
        assert torch.allclose(lk[:, :, s], k[:, :, a:b].mean(2), atol=1e-6)
    assert valid.all()
    keep = torch.tensor([[True, False, True, False, False, True, True]])
    lq, _, valid = m._landmarks(q, k, keep)
    assert torch.allclose(lq[:, :, 0], q[:, :, [0, 2]].mean(2), atol=1e-6)  # padded tokens left out
    assert valid.tolist() == [[True, False, True]]  # an all-padded segment is an empty landmark


@pytest.mark.parametrize("n", [1, 2, 5])
def test_nystrom_with_more_landmarks_than_tokens_is_softmax(n):
    """Empty landmarks must contribute nothing: with n < m every token is its own landmark."""
    m = make_mixer("nystromformer", False, landmarks=8, pinv_iters=25, conv_kernel=0)
    x = torch.randn(2, n, 32)
    for form in ("reference", "fast"):
        assert rel_err(softmax_twin(m)(x)[0], with_form(m, form)(x)[0]) < 1e-3, (form, n)


def test_nystrom_conv_skip_sees_only_real_values():
    m = make_mixer("nystromformer", False, conv_kernel=5)
    x = torch.randn(1, 9, 32)
    y, _ = m(x)
    with torch.no_grad():
        m.conv.weight.zero_()
    y0, _ = m(x)
    assert not torch.allclose(y, y0)  # the skip is on
    with pytest.raises(ConfigError, match="nystromformer.conv_kernel"):
        make_mixer("nystromformer", False, conv_kernel=4)


def test_nystrom_refuses_causal():
    with pytest.raises(CapabilityError, match="bidirectional"):
        MIXERS.get("nystromformer")(32, 4, causal=True)
