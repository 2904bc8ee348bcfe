"""convert: attention swapped for other mixers with shared projections carried; LightTransfer's
streaming conversion of lazy layers to sink + window attention."""

from __future__ import annotations

import pytest
import torch

import efformer
from efformer.errors import ConfigError
from efformer.interop.convert import attention_mass, convert, stream_convert
from tests.interop import hf_models as hm

BASE = dict(vocab_size=hm.VOCAB, d_model=32, n_layers=3, n_heads=4, max_len=128)


def model(**kw):
    m = efformer.create_model("lm-tiny", **{**BASE, **kw}).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def test_softmax_to_wide_sliding_window_is_identical(tmp_path):
    src = model(mixer_options={"n_kv_heads": 2, "qkv_bias": True})
    ids = torch.randint(0, hm.VOCAB, (2, 23))
    new, report = convert(src, "sliding_window", options={"window": 23})
    assert new.cfg.mixer == ["sliding_window"] * 3 and report.layers == [0, 1, 2]
    assert report.initialised == {0: [], 1: [], 2: []} and report.dropped == {0: [], 1: [], 2: []}
    with torch.no_grad():
        assert torch.allclose(new(ids), src(ids), atol=1e-5, rtol=1e-5)
    narrow, _ = convert(src, "sliding_window", options={"window": 3})
    with torch.no_grad():  # the check can fail: a window shorter than the text changes the logits
        assert not torch.allclose(narrow(ids), src(ids), atol=1e-3)


@pytest.mark.parametrize("target", ["linear", "performer", "retnet", "simple_gla", "deltanet"])
def test_qkvo_carried_into_other_mixers(target):
    src = model(mixer_options={"n_kv_heads": 2}, positional="learned")  # linear attention cannot take rope
    new, report = convert(src, target, layers=[1])
    assert new.cfg.mixer == ["softmax", target, "softmax"]
    a, b = src.backbone.blocks[1].mixer, new.backbone.blocks[1].mixer
    d, hd = 32, 8
    k, v = a.kv_proj.weight.chunk(2)
    k_full, v_full = (t.reshape(2, hd, d).repeat_interleave(2, 0).reshape(d, d) for t in (k, v))  # GQA -> MHA
    got = b.state_dict()
    if "qkv_proj.weight" in got:
        assert torch.equal(got["qkv_proj.weight"], torch.cat([a.q_proj.weight, k_full, v_full]))
    elif "kv_proj.weight" in got:
        assert torch.equal(got["q_proj.weight"], a.q_proj.weight)
        assert torch.equal(got["kv_proj.weight"], torch.cat([k_full, v_full]))
    else:
        assert torch.equal(got["v_proj.weight"], v_full)
    assert torch.equal(got["out_proj.weight"], a.out_proj.weight)
    assert "out_proj.weight" in report.carried[1] and not set(report.carried[1]) & set(report.initialised[1])
    for i in (0, 2):  # untouched layers and everything outside the mixers are the same tensors
        assert all(torch.equal(x, y) for x, y in zip(src.backbone.blocks[i].parameters(),
                                                     new.backbone.blocks[i].parameters(), strict=True))
    assert torch.equal(src.backbone.embed.weight, new.backbone.embed.weight)


def test_biases_of_a_bias_free_target_are_reported_dropped():
    src = model(mixer_options={"qkv_bias": True}, positional="learned")
    _, report = convert(src, "linear", layers=[0])
    assert report.dropped[0] == ["kv_proj.bias", "out_proj.bias", "q_proj.bias"]


def test_bad_layers_are_refused():
    with pytest.raises(ConfigError, match="layers"):
        convert(model(), "linear", layers=[3])


def test_attention_mass_matches_hf_eager_attentions(tmp_path):
    hf = hm.llama(attn_implementation="eager")
    ef = efformer.from_hf(hm.save(hf, tmp_path / "hf"))
    ids = torch.randint(0, hm.VOCAB, (2, 30))
    sink, window = 2, 5
    with torch.no_grad():
        att = hf(ids, output_attentions=True).attentions  # per layer (b, h, n, n)
    i, j = torch.arange(30)[:, None], torch.arange(30)[None, :]
    near = (j < sink) | (i - j < window)
    want = [float((a * near).sum(-1)[..., sink + window:].mean()) for a in att]
    assert attention_mass(ef, ids, sink, window) == pytest.approx(want, abs=1e-5)
    assert attention_mass(ef, ids, sink, window=30) == [1.0, 1.0]  # nothing outside: all mass is near


def test_stream_convert_picks_the_laziest_layers_and_bounds_the_cache():
    src = model(n_layers=4)
    ids = torch.randint(0, hm.VOCAB, (1, 48))
    new, report, masses = stream_convert(src, ids, fraction=0.5, sink=2, window=8)
    assert len(report.layers) == 2 and min(masses[i] for i in report.layers) >= max(
        m for i, m in enumerate(masses) if i not in report.layers)
    assert all(new.cfg.mixer[i] == "longformer" for i in report.layers)
    cache = new.new_cache(1)
    with torch.no_grad():
        new(ids, cache=cache)
        for _ in range(5):
            new(ids[:, :1], cache=cache)
    for i in report.layers:  # sink + the last window - 1 keys, whatever the length
        assert cache.states[i].length <= 2 + 8
    full, _, _ = stream_convert(src, ids, fraction=1.0, sink=2, window=48)
    with torch.no_grad():  # a window covering the text: streaming attention is the original
        assert torch.allclose(full(ids), src(ids), atol=1e-5, rtol=1e-5)
