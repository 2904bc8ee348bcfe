"""Local attention (block-local, sliding window, dilated window): patterns, exact limits, bounded decode.

The automatic contract tests already check fast == reference, causality, padding and decode on the
small test options; these add the pattern definitions, the limits where the maths says a pattern is
full attention, rotary/bias handling, the bounded decode state and the no-N x N memory claim.
"""

from __future__ import annotations

import pytest
import torch

from efformer.errors import ConfigError
from efformer.mixers.local import Ctx
from efformer.nn.positional import Fire, PositionalContext, Rope
from efformer.registry import MIXERS
from tests.helpers import WithPositional, make_mixer, rel_err, with_form


# ---- helpers shared with test_sparse.py --------------------------------------------------
class RopeAndBias(torch.nn.Module):
    """A scheme giving both a rotation and a score bias (no model has both; the mixer must take both)."""

    def __init__(self, rope, bias):
        super().__init__()
        self.rope, self.bias = rope, bias

    def context(self, positions, dtype):
        """Positions with the rope's rotation and the bias scheme."""
        return PositionalContext(positions, rotation=self.rope.rotation(positions, dtype), bias=self.bias)


def seen_keys(m, n: int, form: str) -> torch.Tensor:
    """Attention weights (n, n) with all scores equal: uniform over the keys each query may see."""
    zeros = torch.zeros(1, m.n_heads, n, 4)
    pos = torch.arange(n)[None]
    ctx = Ctx(0, torch.arange(n), pos, pos, None, None, PositionalContext(pos))
    attend = m.attend_reference if form == "reference" else m.attend_fast
    return attend(zeros, zeros, torch.eye(n).expand(1, m.n_heads, n, n), ctx)[0, 0]


def check_pattern(m, n: int, expected) -> None:
    """Both forms attend uniformly to exactly the keys ``expected(i, j)`` allows, each counted once."""
    want = torch.tensor([[bool(expected(i, j)) for j in range(n)] for i in range(n)])
    uniform = want.double() / want.sum(1, keepdim=True)
    for form in ("reference", "fast"):
        got = seen_keys(m, n, form).double()
        assert torch.equal(got > 0, want), f"{form} pattern differs at n={n}"
        assert torch.allclose(got, uniform, atol=1e-6), f"{form} counts a key twice at n={n}"


def softmax_twin(m, scheme=None):
    """A SoftmaxAttention with the same weights and direction as ``m`` (called with ``scheme``, if given)."""
    inner = m.mixer if isinstance(m, WithPositional) else m
    sm = MIXERS.get("softmax")(inner.d_model, inner.n_heads, causal=inner.causal,
                               options={"n_kv_heads": inner.n_kv_heads})
    missing, unexpected = sm.load_state_dict(inner.state_dict(), strict=False)
    assert not missing and set(unexpected) <= {"seed"}
    sm = sm.eval()
    return WithPositional(sm, scheme) if scheme is not None else sm


def assert_equals_softmax(m, n: int = 11, rotary: bool = True) -> None:
    """Both forms of ``m`` equal softmax attention with the same weights (with rope and a padding mask)."""
    rope = Rope(m.d_model, m.n_heads, 64, m.causal) if rotary else None
    sm = softmax_twin(m, rope)
    m = WithPositional(m, rope) if rope is not None else m
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, n, m.d_model, generator=gen)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, : n // 3] = False  # left padding (the causal convention; bidirectional ignores the side)
    for mask in (None, keep):
        want, _ = sm(x, mask=mask)
        for form in ("reference", "fast"):
            got, _ = with_form(m, form)(x, mask=mask)
            assert rel_err(want, got) < 1e-5, f"{m.name} {form} differs from softmax (mask={mask is not None})"


def assert_forms_agree_with_positional(m, n: int = 13) -> None:
    """Fast == reference on outputs and gradients with rope and a learned bias (FIRE) and a mask."""
    rope = Rope(m.d_model, m.n_heads, 64, m.causal)
    fire = Fire(m.d_model, m.n_heads, 64, m.causal)
    m = WithPositional(m, RopeAndBias(rope, fire))
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, n, m.d_model, generator=gen)
    keep = torch.rand(2, n, generator=gen) > 0.3
    keep[:, -1 if m.causal else 0] = True
    g = torch.randn(2, n, m.d_model, generator=gen)
    outs = []
    for form in ("reference", "fast"):
        xr = x.clone().requires_grad_(True)
        y, _ = with_form(m, form)(xr, mask=keep)
        (y * g).sum().backward()
        grads = [xr.grad] + [p.grad.clone() for p in (*m.parameters(), *fire.parameters())]
        m.zero_grad(set_to_none=True)
        fire.zero_grad(set_to_none=True)
        outs.append((y.detach(), grads))
    (y_ref, g_ref), (y_fast, g_fast) = outs
    assert rel_err(y_ref, y_fast) < 1e-5
    for a, b in zip(g_ref, g_fast, strict=True):
        # FIRE's last bias shifts a whole score row, so softmax makes its true gradient 0 (rounding noise).
        assert rel_err(a, b) < 1e-4 or (a - b).abs().max() < 1e-5


def decode(m, x: torch.Tensor, chunks, mask=None) -> tuple[torch.Tensor, list[int]]:
    """Feed ``x`` in ``chunks``; return the concatenated outputs and the cached key count after each call."""
    state = m.init_state(x.shape[0], x.device, x.dtype)
    ys, sizes, i = [], [], 0
    for c in chunks:
        y, state = m(x[:, i : i + c], state=state, mask=None if mask is None else mask[:, i : i + c])
        ys.append(y)
        sizes.append(state.k.shape[2])
        i += c
    return torch.cat(ys, 1), sizes


def saved_numel(m, x: torch.Tensor) -> int:
    """The largest tensor the forward pass saves for backward (the attention matrix, if dense)."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x.clone().requires_grad_(True))
    return max(sizes)


def assert_no_dense_matrix(m, n: int = 256) -> None:
    """The fast form saves nothing near (heads, N, N); the reference does (so the probe can fail)."""
    x = torch.randn(1, n, m.d_model)
    dense = m.n_heads * n * n
    assert saved_numel(with_form(m, "reference"), x) >= dense
    assert saved_numel(with_form(m, "fast"), x) < dense // 4


# ---- patterns ----------------------------------------------------------------------------
def _local(b, c):
    return lambda i, j: i // b == j // b and (not c or j <= i)


def _window(w, d, c):
    return lambda i, j: (i - j) % d == 0 and abs(i - j) < w * d and (not c or j <= i)


PATTERNS = [
    ("local", {"block_size": 4}, _local(4, False), _local(4, True)),
    ("local", {"block_size": 1}, _local(1, False), _local(1, True)),
    ("sliding_window", {"window": 1}, _window(1, 1, False), _window(1, 1, True)),
    ("sliding_window", {"window": 4}, _window(4, 1, False), _window(4, 1, True)),
    ("dilated_window", {"window": 3, "dilation": 3}, _window(3, 3, False), _window(3, 3, True)),
    ("dilated_window", {"window": 2, "dilation": 1}, _window(2, 1, False), _window(2, 1, True)),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name,options,bidir,causal_rule", PATTERNS, ids=[f"{p[0]}-{p[1]}" for p in PATTERNS])
def test_pattern_is_the_documented_one(name, options, bidir, causal_rule, causal):
    m = make_mixer(name, causal, **options)
    for n in (1, 6, 13, 23):
        check_pattern(m, n, causal_rule if causal else bidir)


# ---- exact limits ------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize(
    "name,options",
    [
        ("sliding_window", {"window": 11}),
        ("sliding_window", {"window": 40}),
        ("dilated_window", {"window": 11, "dilation": 1}),
        ("local", {"block_size": 11}),
        ("local", {"block_size": 16}),
    ],
)
def test_full_coverage_equals_softmax(name, options, causal):
    assert_equals_softmax(make_mixer(name, causal, n_kv_heads=2, **options))


def test_narrower_window_is_further_from_softmax():
    """Error against full attention falls as the window grows, and vanishes at window = N."""
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(7))
    errs = []
    for w in (1, 2, 4, 8, 16):
        m = make_mixer("sliding_window", True, window=w)
        errs.append(rel_err(softmax_twin(m)(x)[0], m(x)[0]))
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 1e-5


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name", ["local", "sliding_window", "dilated_window"])
def test_forms_agree_with_rotary_and_bias(name, causal):
    assert_forms_agree_with_positional(make_mixer(name, causal))


@pytest.mark.parametrize("name", ["local", "sliding_window", "dilated_window"])
def test_fast_form_has_no_dense_matrix(name):
    opts = {"local": {"block_size": 8}, "sliding_window": {"window": 8}, "dilated_window": {"window": 4}}[name]
    assert_no_dense_matrix(make_mixer(name, False, **opts))


# ---- decoding ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,options,bound",
    [
        ("sliding_window", {"window": 3}, 2),
        ("sliding_window", {"window": 1}, 0),
        ("dilated_window", {"window": 3, "dilation": 2}, 4),
        ("local", {"block_size": 4}, 3),
    ],
)
def test_decode_state_stays_bounded_and_exact(name, options, bound):
    m = with_form(make_mixer(name, True, **options), "reference")
    n = 23
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, n, m.d_model, generator=gen)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, :5] = False  # a left-padded row, as a causal LM batches prompts
    y_full, _ = m(x, mask=keep)
    for form, chunks in [(f, c) for f in ("reference", "fast") for c in ([1] * n, [5, 1, 9, 8])]:
        y, sizes = decode(with_form(m, form), x, chunks, keep)
        assert rel_err(y_full, y) < 1e-5, f"{form}: decode in chunks {chunks} differs"
        assert max(sizes) <= bound, f"{form}: state grew to {max(sizes)} keys (bound {bound})"
    assert sizes[-1] == bound  # 23 tokens fill the window (and end one short of a block)


def test_left_padding_only_truncates_windows():
    """With left padding, a real token sees the same real keys as in the unpadded sequence."""
    m = make_mixer("sliding_window", True, window=3)
    x = torch.randn(1, 9, m.d_model)
    padded = torch.cat([torch.randn(1, 4, m.d_model), x], 1)
    keep = torch.arange(13)[None] >= 4
    y, _ = m(x)
    y_pad, _ = m(padded, mask=keep, positions=(torch.arange(13) - 4).clamp(min=0)[None])
    assert rel_err(y, y_pad[:, 4:]) < 1e-5


# ---- options -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,field",
    [
        ("local", "block_size"),
        ("sliding_window", "window"),
        ("dilated_window", "window"),
        ("dilated_window", "dilation"),
    ],
)
def test_bad_option_names_the_field(name, field):
    with pytest.raises(ConfigError, match=rf"{name}\.{field}=0"):
        MIXERS.get(name)(32, 4, causal=True, options={field: 0})
