"""The engine with KV policies: sinks + window rows (bounded, may run past max_len) and int8 pages give
what model.generate gives with the same policy, for requests that join at different steps."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import ConfigError
from efformer.mixers.kv_policies import StreamingKVState
from efformer.serve.engine import Engine, RequestError
from tests.serve.test_engine import lm

LENGTHS = (5, 1, 8, 3, 7, 2)  # each <= sinks + window: a chunked prefill evicts nothing, as a whole one


def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 50, (n,), generator=g).tolist() for n in LENGTHS]


MODELS = {
    "softmax": lambda: lm("softmax", "rope", mixer_options={"n_kv_heads": 2}),
    "hybrid": lambda: lm(["softmax", "gated_deltanet", "sliding_window"], mixer_options=[{}, {}, {"window": 4}]),
}


@pytest.mark.parametrize("name,policy", [("softmax", {"sinks": 2, "window": 6}), ("hybrid", {"sinks": 2, "window": 6}),
                                         ("softmax", {"int8": True})], ids=["softmax-streaming", "hybrid-streaming",
                                                                            "softmax-int8"])
def test_joining_requests_equal_generate_with_the_same_policy(name, policy):
    model = MODELS[name]()
    eng = Engine(model, max_batch=3, block_size=4, prefill_chunk=4, kv_policy=policy)
    ps = prompts()
    reqs = [eng.submit(p, {"max_tokens": 11 + i % 3}) for i, p in enumerate(ps)]
    steps = 0
    while eng.has_work:
        eng.step()
        steps += 1
        if eng.batch is not None and "window" in policy:
            assert all(s.size <= 8 for s in eng.batch.states if isinstance(s, StreamingKVState))
    for i, (r, p) in enumerate(zip(reqs, ps, strict=True)):
        alone = model.generate([p], max_new_tokens=11 + i % 3, kv_policy=policy)[0][len(p):]
        assert r.output == alone, (name, i)
    assert eng.pool.free == eng.pool.num_blocks
    if "window" in policy:
        assert eng.kinds[0] == "streaming"


def test_streaming_rows_may_run_past_max_len():
    model = lm("softmax", "rope")
    with pytest.raises(RequestError, match="max_len"):
        Engine(model).submit([1, 2, 3], {"max_tokens": 62})
    eng = Engine(model, kv_policy={"sinks": 2, "window": 10})
    out = eng.generate([[1, 2, 3]], {"max_tokens": 62})[0]
    assert len(out) == 62 and out == model.generate([[1, 2, 3]], 62, kv_policy={"sinks": 2, "window": 10})[0][3:]


def test_engine_refuses_a_bad_policy():
    with pytest.raises(ConfigError, match="window"):
        Engine(lm("softmax", "rope"), kv_policy={"window": 0})
