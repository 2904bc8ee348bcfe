"""Continuous batching: requests that join at different steps give what each gives alone; sampling
parameters, stop sequences, cancellation, back-pressure; the paged pool frees every block."""

from __future__ import annotations

import pydantic
import pytest
import torch

from efformer.errors import CapabilityError, ConfigError
from efformer.models.factory import create_model
from efformer.serve.engine import Engine, QueueFullError, RequestError, SamplingParams, _held_back

LENGTHS = (5, 1, 9, 3, 12, 7, 2)


def lm(mixer, positional="none", **kw):
    torch.manual_seed(0)
    return create_model("lm-tiny", mixer=mixer, positional=positional, d_model=32, n_layers=3, n_heads=4,
                        vocab_size=50, max_len=64, **kw).eval()


def prompts(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (n,), generator=g).tolist() for n in LENGTHS]


MODELS = {
    "softmax": lambda: lm("softmax", "rope", mixer_options={"n_kv_heads": 2}),
    "sliding_window": lambda: lm("sliding_window", "rope", mixer_options={"window": 3}),
    "gated_deltanet": lambda: lm("gated_deltanet"),
    "mamba2": lambda: lm("mamba2"),
    "hybrid": lambda: lm(["softmax", "gated_deltanet", "sliding_window"],
                         mixer_options=[{}, {}, {"window": 4}]),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_joining_requests_equal_each_alone(name):
    model = MODELS[name]()
    ps = prompts()
    # 3 rows for 7 requests and 4-token prefill chunks: requests join while others decode and leave
    eng = Engine(model, max_batch=3, block_size=4, prefill_chunk=4)
    reqs = [eng.submit(p, {"max_tokens": 6 + i % 3}) for i, p in enumerate(ps)]
    joined_at, step = {}, 0
    while eng.has_work:
        eng.step()
        step += 1
        for r in eng.running:
            joined_at.setdefault(r.id, step)
    assert len(set(joined_at.values())) >= 4  # they really joined at different steps
    for i, (r, p) in enumerate(zip(reqs, ps, strict=True)):
        alone = model.generate([p], max_new_tokens=6 + i % 3)[0][len(p):]
        assert r.output == alone, (name, i)
        assert r.finish_reason == "length"
    assert eng.pool.free == eng.pool.num_blocks


def run_many(n_requests: int) -> None:
    """n_requests random short requests through a 40-block pool: all finish, every block comes back."""
    torch.manual_seed(0)
    model = create_model("lm-tiny", mixer="softmax", d_model=16, n_layers=1, n_heads=2, vocab_size=50,
                         max_len=64).eval()
    eng = Engine(model, max_batch=8, block_size=4, num_blocks=40, prefill_chunk=32, max_queue=1000)
    g = torch.Generator().manual_seed(0)
    reqs = [eng.submit(torch.randint(0, 50, (int(n),), generator=g).tolist(), {"max_tokens": int(m)})
            for n, m in zip(torch.randint(1, 9, (n_requests,), generator=g),
                            torch.randint(2, 7, (n_requests,), generator=g), strict=True)]
    low, rows = eng.pool.free, 0
    while eng.has_work:
        eng.step()
        low, rows = min(low, eng.pool.free), max(rows, len(eng.running))
    assert all(r.finished for r in reqs)
    assert rows == 8 and low <= eng.pool.num_blocks - 16  # the batch was full and the pool really used
    assert eng.pool.free == eng.pool.num_blocks and sorted(eng.pool._free) == list(range(40))


def test_paged_pool_frees_every_block_after_100_requests():
    run_many(100)


@pytest.mark.slow
def test_paged_pool_frees_every_block_after_1000_requests():
    run_many(1000)


def test_stop_sequences_are_cut_and_held_back():
    model = lm("softmax", "rope")
    p = prompts()[2]
    free = model.generate([p], max_new_tokens=10)[0][len(p):]
    stop = free[3:5]
    events = []
    eng = Engine(model)
    r = eng.submit(p, {"max_tokens": 10, "stop": [stop, [49, 48, 47]]},
                   on_event=lambda req, toks, done: events.append((list(toks), done)))
    while eng.has_work:
        eng.step()
    first = next(i for i in range(len(free) - 1) if free[i : i + 2] == stop)
    assert r.output == free[:first] and r.finish_reason == "stop"
    streamed = [t for toks, _ in events for t in toks]
    assert streamed == r.output and events[-1][1]  # stop-sequence prefixes never reached the stream
    assert _held_back([1, 2, 3], [[3, 4], [2, 3, 9]]) == 2


def test_sampling_is_per_request_and_seeded():
    model = lm("gated_deltanet")
    p = prompts()[0]
    eng = Engine(model, max_batch=4)
    a = eng.submit(p, {"max_tokens": 8, "temperature": 1.0, "seed": 3})
    b = eng.submit(p, {"max_tokens": 8, "temperature": 1.0, "seed": 3})
    c = eng.submit(p, {"max_tokens": 8})
    d = eng.submit(p, {"max_tokens": 8, "temperature": 1.0, "top_k": 1, "seed": 5})
    while eng.has_work:
        eng.step()
    assert a.output == b.output  # same seed, same tokens, whatever the batch
    assert c.output == d.output == model.generate([p], max_new_tokens=8)[0][len(p):]  # top_k=1 is greedy


def test_cancel_frees_the_slot_and_blocks():
    model = lm("softmax", "rope")
    eng = Engine(model, max_batch=2, block_size=4)
    r1, r2 = eng.submit([1, 2, 3], {"max_tokens": 30}), eng.submit([4, 5], {"max_tokens": 3})
    for _ in range(3):
        eng.step()
    eng.cancel(r1)
    while eng.has_work:
        eng.step()
    assert r1.finish_reason == "cancelled" and r2.finish_reason == "length"
    assert eng.pool.free == eng.pool.num_blocks and not eng.running


def test_back_pressure_and_refusals():
    model = lm("softmax", "rope")
    eng = Engine(model, max_queue=2, block_size=4, num_blocks=4)
    eng.submit([1], {"max_tokens": 2})
    eng.submit([1], {"max_tokens": 2})
    with pytest.raises(QueueFullError):
        eng.submit([1], {"max_tokens": 2})
    with pytest.raises(RequestError, match="max_tokens"):
        eng.submit([1] * 60, {"max_tokens": 10})  # over max_len=64
    with pytest.raises(RequestError, match="KV blocks"):
        eng.submit([1] * 10, {"max_tokens": 10})  # 5 blocks > 4 in the pool
    with pytest.raises(RequestError, match="prompt"):
        eng.submit([50])
    with pytest.raises(pydantic.ValidationError):
        SamplingParams(max_tokens=-1)
    with pytest.raises(ConfigError, match="max_batch"):
        Engine(model, max_batch=0)


def test_blocks_wait_for_free_ones():
    model = lm("softmax", "rope")
    eng = Engine(model, max_batch=4, block_size=4, num_blocks=3)
    reqs = [eng.submit([1, 2, 3, 4], {"max_tokens": 8}) for _ in range(3)]  # 3 blocks each: one at a time
    eng.step()
    assert len(eng.running) == 1 and len(eng.waiting) == 2
    while eng.has_work:
        eng.step()
    assert all(r.output == reqs[0].output for r in reqs)


def test_mixers_with_absolute_state_are_refused():
    with pytest.raises(CapabilityError, match="absolute"):
        Engine(lm("local", "rope", mixer_options={"block_size": 4}))
