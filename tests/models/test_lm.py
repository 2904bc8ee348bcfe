"""Causal LM: cached decoding == full recomputation for every positional scheme and every causal
mixer; batched prompts of different lengths == each prompt alone; sampling controls."""

from __future__ import annotations

import pytest
import torch

import efformer
from efformer.errors import ConfigError, ShapeError
from efformer.registry import MIXERS, POSITIONALS

CAUSAL_MIXERS = [m for m in MIXERS.names() if MIXERS.get(m).capabilities.causal]


def _lm(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=64)
    return efformer.create_model("lm-tiny", **{**base, **kw}).eval()


def _compatible(mixer, positional):
    caps = MIXERS.get(mixer).capabilities
    kind = POSITIONALS.get(positional).kind
    return not (kind == "bias" and not caps.attention_bias) and not (kind == "rotary" and not caps.rotary)


@pytest.mark.parametrize("positional", POSITIONALS.names())
def test_cached_logits_equal_full_recomputation_for_every_positional(positional):
    model = _lm(positional=positional)
    ids = torch.randint(0, 64, (2, 12))
    full = model(ids)
    cache = model.new_cache(2)
    steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(5, 12)]
    assert torch.allclose(full, torch.cat(steps, 1), atol=1e-4)


@pytest.mark.parametrize("mixer", CAUSAL_MIXERS)
def test_generation_with_cache_equals_without_for_every_causal_mixer(mixer):
    positional = "rope" if _compatible(mixer, "rope") else "none"
    opts = MIXERS.get(mixer).test_options
    model = _lm(mixer=mixer, positional=positional, mixer_options=opts)
    prompts = torch.randint(0, 64, (2, 6))
    a = model.generate(prompts, 6, use_cache=True)
    b = model.generate(prompts, 6, use_cache=False)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :6], prompts)


@pytest.mark.parametrize("positional", ["rope", "alibi", "learned"])
def test_batched_prompts_of_different_lengths_equal_each_alone(positional):
    model = _lm(positional=positional)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [3, 3, 3, 3]]
    together = model.generate(prompts, 5)
    for p, t in zip(prompts, together, strict=True):
        assert t == model.generate([p], 5)[0]
        assert t[: len(p)] == p and len(t) == len(p) + 5


def test_stop_tokens_end_rows_and_rows_are_dropped_from_the_cache():
    model = _lm()
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    free = model.generate(prompts, 8)
    stop = free[0][4]  # a token row 0 generates

    def cut(row, n_prompt):
        gen = row[n_prompt:]
        return row[: n_prompt + gen.index(stop) + 1] if stop in gen else row

    out = model.generate(prompts, 8, stop_tokens=[stop])
    assert out == [cut(free[0], 3), cut(free[1], 4)]
    assert len(out[0]) < len(free[0])


def test_sampling_controls():
    model = _lm()
    ids = torch.randint(0, 64, (4, 3))
    g = torch.Generator().manual_seed(1)
    a = model.generate(ids, 10, temperature=1.0, generator=g)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(a, model.generate(ids, 10, temperature=1.0, generator=g))
    top1 = model.generate(ids, 10, temperature=5.0, top_k=1)
    assert torch.equal(top1, model.generate(ids, 10))  # top-k 1 is greedy at any temperature
    tiny_p = model.generate(ids, 10, temperature=5.0, top_p=1e-6)
    assert torch.equal(tiny_p, model.generate(ids, 10))  # nucleus of one token is greedy


def test_sampling_respects_top_k_support():
    from efformer.models.lm import sample_next

    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).repeat(200, 1)
    picks = sample_next(logits, 1.0, 2, None, torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {1, 2}
    picks = sample_next(logits, 1.0, None, 0.5, torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {1}


def test_causal_lm_future_tokens_never_change_past_logits():
    model = _lm(positional="alibi")
    ids = torch.randint(0, 64, (1, 10))
    ids2 = ids.clone()
    ids2[:, 6:] = (ids2[:, 6:] + 7) % 64
    assert torch.allclose(model(ids)[:, :6], model(ids2)[:, :6], atol=1e-6)


def test_untied_head_and_bad_generation_args():
    model = _lm(tie_embeddings=False)
    assert model.lm_head.weight.data_ptr() != model.backbone.embed.weight.data_ptr()
    with pytest.raises(ConfigError, match="top_p"):
        model.generate([[1]], 2, top_p=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        model.generate([[1]], 2, temperature=-1)
    with pytest.raises(ShapeError, match="non-empty"):
        model.generate([[]], 2)
    with pytest.raises(ShapeError, match="outside the vocabulary"):
        model(torch.tensor([[1, 99]]))


def test_a_tiny_lm_learns():
    model = _lm(n_layers=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seq = torch.arange(16).repeat(4, 1) % 8  # a periodic sequence is learnable in a few steps
    for _ in range(60):
        logits = model(seq[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2


def test_hybrid_stack_decodes_exactly():
    """Mamba layers with full attention every third layer (as the hybrid papers do)."""
    stack = ["mamba", "mamba", "softmax", "gated_deltanet", "mamba", "softmax"]
    model = _lm(n_layers=6, mixer=stack, positional="none",
                mixer_options={"mamba": MIXERS.get("mamba").test_options})
    assert [b.mixer.name for b in model.backbone.blocks] == stack
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    assert model.generate(prompts, 6, use_cache=True) == model.generate(prompts, 6, use_cache=False)
    ids = torch.randint(0, 64, (2, 9))
    cache = model.new_cache(2)
    steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(4, 9)]
    steps = torch.cat(steps, 1)
    assert torch.allclose(model(ids), steps, atol=1e-4)
