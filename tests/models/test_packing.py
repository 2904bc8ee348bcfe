"""Packed rows: every mixer that declares packing gives each segment exactly what it gives it alone;
packed LM logits and greedy continuations equal unpacked ones; packed training loss equals padded."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import CapabilityError, ConfigError, ShapeError
from efformer.models.factory import create_model
from efformer.models.packing import pack_sequences, packed_pairs
from efformer.nn.positional import build_positional, segment_positions
from efformer.registry import MIXERS
from efformer.train.data import collate, collate_packed, loss_terms
from tests.helpers import make_mixer, rel_err, with_form

LENGTHS = [5, 1, 7, 3, 11]  # odd, prime and length-1 segments


def packing_cases():
    """(name, causal, form, positional) for every packing mixer, direction, torch form (triton: its own
    tests) and each in-mixer positional kind it takes (none when it takes neither)."""
    cases = []
    for name in MIXERS.names():
        caps = MIXERS.get(name).capabilities
        schemes = [p for p, ok in (("rope", caps.rotary), ("alibi", caps.attention_bias)) if ok] or ["none"]
        if caps.packing:
            cases += [(name, c, f, p) for c in (True, False) if (caps.causal if c else caps.bidirectional)
                      for f in caps.forms if f != "triton" for p in schemes]
    return cases


def test_packing_is_declared_by_attention_mixers():
    names = {case[0] for case in packing_cases()}
    assert {"softmax", "sliding_window", "dilated_window", "gla", "simple_gla", "retnet", "deltanet",
            "gated_deltanet", "mamba", "mamba2"} <= names
    assert not MIXERS.get("local").capabilities.packing  # aligned blocks depend on the absolute index


@pytest.mark.parametrize(("name", "causal", "form", "positional"), packing_cases(), ids=lambda c: str(c))
def test_packed_equals_each_sequence_alone(name, causal, form, positional):
    mixer = with_form(make_mixer(name, causal), form)
    scheme = build_positional(positional, 32, 4, 128, causal)
    torch.manual_seed(1)
    xs = [torch.randn(n, 32) for n in LENGTHS]
    packed = pack_sequences([[0] * n for n in LENGTHS], capacity=16)
    x = torch.zeros(*packed.ids.shape, 32)
    for (r, s, n), xi in zip(packed.places, xs, strict=True):
        x[r, s : s + n] = xi
    ctx = scheme.context(segment_positions(packed.segments), x.dtype)
    ctx.segments = packed.segments
    mask = None if bool(packed.mask.all()) else packed.mask
    y, _ = mixer(x, mask=mask, positions=ctx)
    for got, xi in zip(packed.unpack(y), xs, strict=True):
        n = xi.shape[0]
        want, _ = mixer(xi[None], positions=scheme.context(torch.arange(n)[None], x.dtype))
        torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)


def test_mixer_without_packing_is_refused():
    mixer = make_mixer("local", True)
    ctx = build_positional("none", 32, 4, 128, True).context(torch.arange(4)[None], torch.float32)
    ctx.segments = torch.tensor([[0, 0, 1, 1]])
    with pytest.raises(CapabilityError, match="packing"):
        mixer(torch.randn(1, 4, 32), positions=ctx)


def test_segment_positions_restart():
    seg = torch.tensor([[0, 0, 0, 1, 2, 2, -1, -1]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 0, 1, 0, 1]]


def test_pack_sequences_places_and_refusals():
    p = pack_sequences([[1, 2, 3], [4], [5, 6]], capacity=4)
    assert p.ids.shape == (2, 4)
    assert [p.ids[r, s : s + n].tolist() for r, s, n in p.places] == [[1, 2, 3], [4], [5, 6]]
    assert int(p.mask.sum()) == 6
    assert packed_pairs(p.segments, p.mask).sum() == 3  # 2 + 0 + 1 next-token pairs
    with pytest.raises(ConfigError, match="capacity"):
        pack_sequences([[1, 2, 3]], capacity=2)
    with pytest.raises(ShapeError):
        pack_sequences([[]])


def _lm(mixer="softmax", **kw):
    torch.manual_seed(0)
    return create_model("lm-tiny", mixer=mixer, d_model=32, n_layers=2, n_heads=4, vocab_size=50,
                        max_len=64, **kw).eval()


@pytest.mark.parametrize("mixer", ["softmax", "sliding_window"])
def test_packed_lm_logits_and_greedy_continuations(mixer):
    model = _lm(mixer, positional="rope")
    torch.manual_seed(2)
    prompts = [torch.randint(0, 50, (n,)).tolist() for n in LENGTHS]
    seqs = [list(p) for p in prompts]
    for _ in range(4):  # greedy continuation by packed recomputation == generate() per sequence
        packed = pack_sequences(seqs)
        logits = model(packed.ids, segments=packed.segments,
                       mask=None if bool(packed.mask.all()) else packed.mask)
        for seq, lg in zip(seqs, packed.unpack(logits), strict=True):
            alone = model(torch.tensor([seq]))[0]
            torch.testing.assert_close(lg, alone, rtol=1e-5, atol=1e-5)
            seq.append(int(lg[-1].argmax()))
    for p, seq in zip(prompts, seqs, strict=True):
        assert model.generate([p], max_new_tokens=4)[0] == seq


def test_lm_packing_refusals():
    model = _lm("s4d", positional="none")
    p = pack_sequences([[1, 2], [3]])
    with pytest.raises(CapabilityError, match="pad the sequences"):
        model(p.ids, segments=p.segments)
    model = _lm()
    with pytest.raises(CapabilityError, match="without a cache"):
        model(p.ids, segments=p.segments, cache=model.new_cache(p.ids.shape[0]))
    with pytest.raises(ShapeError, match="segments"):
        model(p.ids, segments=p.segments[:, :1])


@pytest.mark.parametrize(("mixer", "positional"), [("softmax", "rope"), ("gated_deltanet", "none"),
                                                   ("retnet", "none"), ("mamba2", "none")])
def test_packed_training_loss_equals_padded_loss(mixer, positional):
    model = _lm(mixer, positional=positional)
    model.train()  # dropout is 0 in the preset, so train mode is deterministic
    torch.manual_seed(3)
    examples = [{"input_ids": torch.randint(0, 50, (n,))} for n in LENGTHS]
    losses, grads = [], []
    for join in (collate, collate_packed):
        model.zero_grad()
        total, count, _ = loss_terms(model, join(examples))
        (total / count).backward()
        losses.append(total / count)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert int(count) == sum(n - 1 for n in LENGTHS)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert rel_err(grads[0], grads[1]) < 1e-5  # chunk boundaries fall elsewhere, so rounding differs
    assert collate_packed(examples)["input_ids"].numel() < collate(examples)["input_ids"].numel()
