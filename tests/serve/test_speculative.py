"""Speculative decoding: greedy == target greedy for KV and recurrent targets and drafts; the
rejection rule gives exactly the target distribution (analytically and by sampling); acceptance."""

from __future__ import annotations

import math

import pytest
import torch

from efformer.errors import ConfigError
from efformer.models.factory import create_model
from efformer.serve.speculative import accept_drafts, probabilities, speculative_generate


def lm(mixer, seed, positional="none", vocab=40, layers=2, d=32):
    torch.manual_seed(seed)
    return create_model("lm-tiny", mixer=mixer, positional=positional, d_model=d, n_layers=layers, n_heads=4,
                        vocab_size=vocab, max_len=128).eval()


@pytest.mark.parametrize(("target", "draft"), [
    (("softmax", "rope"), ("gated_deltanet", "none")),  # KV target (truncated), recurrent draft (snapshot)
    (("gated_deltanet", "none"), ("softmax", "rope")),
    (("softmax", "rope"), ("softmax", "rope")),  # the target as its own draft: everything is accepted
])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_equals_target_greedy(target, draft, k):
    tgt = lm(target[0], 0, target[1])
    drf = tgt if target == draft else lm(draft[0], seed=1, positional=draft[1], layers=1)
    for prompt in ([3], [5, 9, 1, 22, 7]):
        want = tgt.generate([prompt], max_new_tokens=13)[0][len(prompt):]
        got, stats = speculative_generate(tgt, drf, prompt, 13, k=k)
        assert got == want
        assert stats.drafted > 0 and 0 <= stats.acceptance_rate <= 1
        if drf is tgt:
            assert stats.acceptance_rate == 1.0 and stats.target_calls == math.ceil(13 / (k + 1))


def test_rejection_rule_gives_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    v = 5
    p = torch.softmax(torch.randn(2, v, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(1, v, generator=g) * 2, -1)
    n = 4000
    counts = torch.zeros(v)
    for d in torch.multinomial(q[0], n, replacement=True, generator=g).tolist():
        m, nxt = accept_drafts(p, q, torch.tensor([d]), g)
        counts[d if m == 1 else nxt] += 1
    expected = p[0] * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # the 0.9996 quantile of chi-square with 4 degrees of freedom


def chi2_fits(counts: torch.Tensor, law: torch.Tensor) -> tuple[bool, float, int]:
    """Pearson chi-square of counts against a law (cells expecting < 5 pooled): within ~4.5 sigma."""
    n = float(counts.sum())
    keep = law * n >= 5
    obs, exp = counts[keep], law[keep] * n
    if bool((~keep).any()):
        obs, exp = torch.cat([obs, counts[~keep].sum()[None]]), torch.cat([exp, (law[~keep] * n).sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = obs.numel() - 1
    return chi2 < dof + 4.5 * math.sqrt(2 * dof), chi2, dof


def test_speculative_first_token_matches_target_distribution():
    """The first sampled token (drafted k=2 ahead) over 120 runs fits the target's next-token law."""
    v = 4
    tgt, drf = lm("softmax", 0, "rope", vocab=v, layers=1, d=16), lm("gated_deltanet", 7, vocab=v, layers=1, d=16)
    temp = 0.05  # untrained models are near-uniform at 1; sharpen them so target and draft differ
    with torch.no_grad():
        p1 = probabilities(tgt(torch.tensor([[1, 2]]))[0, -1], temp)
        q1 = probabilities(drf(torch.tensor([[1, 2]]))[0, -1], temp)
    assert float((p1 - q1).abs().sum()) / 2 > 0.5  # the test has power: the draft's law is far off
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(v)
    for _ in range(120):
        counts[speculative_generate(tgt, drf, [1, 2], 1, k=2, temperature=temp, generator=g)[0][0]] += 1
    ok, chi2, dof = chi2_fits(counts, p1)
    assert ok, (chi2, dof)
    assert not chi2_fits(counts, q1)[0]


@pytest.mark.slow
def test_speculative_sampling_matches_target_distribution():
    """Two sampled tokens after a prompt: their joint frequencies over many runs fit the target's law."""
    v = 6
    tgt, drf = lm("softmax", 0, "rope", vocab=v, layers=1, d=16), lm("gated_deltanet", 7, vocab=v, layers=1, d=16)
    prompt, temp = [1, 2], 0.05
    with torch.no_grad():
        p1 = probabilities(tgt(torch.tensor([prompt]))[0, -1], temp)
        p2 = torch.stack([probabilities(tgt(torch.tensor([prompt + [a]]))[0, -1], temp) for a in range(v)])
    joint = (p1[:, None] * p2).flatten()
    g = torch.Generator().manual_seed(0)
    n, counts, acc = 1500, torch.zeros(v * v), []
    for _ in range(n):
        out, stats = speculative_generate(tgt, drf, prompt, 2, k=2, temperature=temp, generator=g)
        counts[out[0] * v + out[1]] += 1
        acc.append(stats.acceptance_rate)
    ok, chi2, dof = chi2_fits(counts, joint)
    assert ok, (chi2, dof)
    with torch.no_grad():
        q1 = probabilities(drf(torch.tensor([prompt]))[0, -1], temp)
    assert not chi2_fits(counts.view(v, v).sum(1), q1)[0]  # the draft's own law is rejected
    assert 0 < sum(acc) / n < 1


def test_refusals():
    tgt = lm("softmax", 0, "rope")
    with pytest.raises(ConfigError, match="k"):
        speculative_generate(tgt, tgt, [1], 3, k=0)
    with pytest.raises(ConfigError, match="vocabulary"):
        speculative_generate(tgt, lm("softmax", 0, "rope", vocab=41), [1], 3)
