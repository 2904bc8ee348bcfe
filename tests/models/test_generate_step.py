"""The decode step's fast paths: dropout skipped at p = 0 / in eval, the unchecked step, the head layout."""

from __future__ import annotations

import torch

import efformer


def _lm(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=64, tie_embeddings=False)
    return efformer.create_model("lm-tiny", **{**base, **kw}).eval()


def test_dropout_skip_keeps_eval_outputs_and_training_noise():
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    model = _lm(dropout=0.3)
    ref = model(ids)
    calls = []
    drops = [model.backbone.drop] + [blk.drop for blk in model.backbone.blocks]  # the residual-branch dropouts
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in drops]
    assert torch.equal(model(ids), ref) and not calls  # eval: the same tensor values, no dropout module run
    model.train()
    torch.manual_seed(5)
    a = model(ids)
    torch.manual_seed(5)
    b = model(ids)
    assert calls and torch.equal(a, b) and not torch.allclose(a, ref)  # training at p > 0 still drops
    for h in hooks:
        h.remove()
    plain = _lm(dropout=0.0).train()
    state = torch.get_rng_state()
    assert torch.equal(plain(ids), plain.eval()(ids))  # p = 0 in training: exactly the eval function
    assert torch.equal(state, torch.get_rng_state())  # and it draws no random numbers


def test_step_logits_equal_the_checked_forward_and_full_recomputation():
    for tie in (False, True):
        model = _lm(tie_embeddings=tie)
        ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(2))
        cache = model.new_cache(3)
        model(ids[:, :-1], cache=cache)
        step = model._step_logits(ids[:, -1], cache)
        torch.testing.assert_close(step, model(ids)[:, -1], rtol=1e-5, atol=1e-5)


def test_generate_through_a_hooked_head_takes_the_module_path():
    model = _lm()
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    ref = model.generate(prompt, 6, use_cache=False)
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert torch.equal(model.generate(prompt, 6), ref)
    assert len(seen) == 6  # prefill + 5 decode steps all ran the hooked module
