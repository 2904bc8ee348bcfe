"""KV policies at model level: sinks + window equals the full cache while everything fits, stays bounded
over long generation (past max_len), applies per layer; int8 decodes close to the float cache."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import CapabilityError, ConfigError
from efformer.mixers.kv_policies import Int8KVState, StreamingKVState, kv_bytes
from efformer.mixers.softmax import KVState
from efformer.models.factory import create_model


def lm(mixer="softmax", positional="rope", **kw):
    torch.manual_seed(0)
    return create_model("lm-tiny", mixer=mixer, positional=positional, d_model=32, n_layers=2, n_heads=4,
                        vocab_size=50, max_len=64, **kw).eval()


def step_logits(model, prompt: torch.Tensor, new: int, **policy) -> torch.Tensor:
    """Greedy decode through an explicit cache; the logits (b, steps, vocab) of every step."""
    cache = model.new_cache(prompt.shape[0], **policy)
    out = [model(prompt, cache=cache)[:, -1]]
    with torch.no_grad():
        for _ in range(new):
            out.append(model(out[-1].argmax(-1, keepdim=True), cache=cache)[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("positional", ["rope", "alibi", "none"])
def test_streaming_equals_full_cache_while_sinks_plus_window_hold_everything(positional):
    model = lm(positional=positional, mixer_options={"n_kv_heads": 2})
    prompt = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        full = step_logits(model, prompt, 20)
        stream = step_logits(model, prompt, 20, kv_policy={"sinks": 4, "window": 26})  # 4 + 26 = 30 = 9 + 21
    torch.testing.assert_close(stream, full, atol=1e-6, rtol=1e-6)
    ragged = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3]]  # left-padded: positions and sinks count real tokens only
    assert model.generate(ragged, 12, kv_policy={"sinks": 2, "window": 20}) == model.generate(ragged, 12)


def test_streaming_memory_stays_bounded_past_max_len():
    model = lm(mixer_options={"n_kv_heads": 2})
    sinks, window = 3, 13
    cache = model.new_cache(2, kv_policy={"sinks": sinks, "window": window})
    tok = torch.randint(0, 50, (2, 5))
    sizes = set()
    with torch.no_grad():
        for step in range(70):  # past the model's max_len
            tok = model(tok, cache=cache)[:, -1:].argmax(-1)
            assert all(isinstance(s, StreamingKVState) for s in cache.states)
            assert max(s.size for s in cache.states) <= sinks + window
            if step > window:
                sizes.add(sum(kv_bytes(s) for s in cache.states))
    assert len(sizes) == 1  # constant memory once the window is full
    out = model.generate(torch.randint(0, 50, (1, 4)), 70, kv_policy={"sinks": sinks, "window": window})
    assert out.shape == (1, 74)


def test_streaming_differs_from_full_cache_once_tokens_are_evicted():
    model = lm()
    prompt = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        full = step_logits(model, prompt, 20)
        stream = step_logits(model, prompt, 20, kv_policy={"sinks": 2, "window": 6})
    torch.testing.assert_close(stream[:, :3], full[:, :3], atol=1e-6, rtol=1e-6)  # 6 + 2 <= 8: nothing evicted
    assert (stream[:, -1] - full[:, -1]).abs().max() > 1e-4


def test_policy_applies_per_layer_and_skips_other_state_kinds():
    model = lm(["softmax", "gated_deltanet"], positional="none")
    cache = model.new_cache(1, kv_policy={"window": 8})
    assert isinstance(cache.states[0], StreamingKVState) and not isinstance(cache.states[1], KVState)
    cache = model.new_cache(1, kv_policy=[{"int8": True}, None])
    assert isinstance(cache.states[0], Int8KVState)
    with pytest.raises(CapabilityError, match=r"kv_policy\[1\].*gated_deltanet"):
        model.new_cache(1, kv_policy=[None, {"window": 8}])
    with pytest.raises(ConfigError, match="one entry per layer"):
        model.new_cache(1, kv_policy=[None])
    with pytest.raises(CapabilityError, match="no layer"):
        lm("gated_deltanet", positional="none").new_cache(1, kv_policy={"window": 8})


@pytest.mark.parametrize("bad,field", [({"window": 0}, "window"), ({"sinks": -1, "window": 4}, "sinks"),
                                       ({"int8": True, "window": 4}, "kv_policy"), ({"windw": 4}, "windw")])
def test_bad_policies_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        lm().generate(torch.zeros(1, 2, dtype=torch.long), 2, kv_policy=bad)


def test_int8_decode_stays_close_to_the_float_cache():
    model = lm(mixer_options={"n_kv_heads": 2})
    prompt = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        full = step_logits(model, prompt, 16)
        q8 = step_logits(model, prompt, 16, kv_policy={"int8": True})
    # stated bound: every step's logits within 1% of the float cache's logit range (same greedy path)
    err = (q8 - full).abs().amax()
    assert err <= 0.01 * (full.amax() - full.amin()), float(err)
    assert err > 0  # the cache really is quantized
    assert model.generate(prompt, 16, kv_policy={"int8": True}).equal(model.generate(prompt, 16))
