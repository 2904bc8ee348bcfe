"""Block Transformer: causal, cached decode == full forward at every prompt length, greedy generation ==
recomputed argmax, and block length 1 with no token layers == a plain causal LM on [BOS, x]."""

from __future__ import annotations

import pytest
import torch

import efformer
from efformer.errors import ConfigError
from efformer.models.block_transformer import BlockTransformerLM
from efformer.models.config import build_config
from efformer.models.lm import CausalLM

N = 23


def bt(block_len=4, token_layers=1, mixer="softmax", **kw):
    torch.manual_seed(0)
    cfg = build_config(dict(task="lm", vocab_size=40, d_model=32, n_layers=3, n_heads=4, max_len=64, mixer=mixer,
                            block_len=block_len, block_token_layers=token_layers, **kw))
    return BlockTransformerLM(cfg).double().eval()


MODELS = {
    "softmax-L4": lambda: bt(),
    "softmax-L3-2tok": lambda: bt(3, 2),
    "hybrid-L5": lambda: bt(5, 1, ["gated_deltanet", "softmax", "softmax"], positional="none"),
    "L1": lambda: bt(1, 1),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_causal(name):
    model = MODELS[name]()
    ids = torch.randint(0, 40, (2, N))
    base = model(ids)
    for k in (0, 7, N - 1):
        other = ids.clone()
        other[:, k] = (other[:, k] + 1) % 40
        out = model(other)
        torch.testing.assert_close(out[:, :k], base[:, :k], atol=1e-12, rtol=0)
        assert (out[:, k:] - base[:, k:]).abs().max() > 1e-6  # the change is seen from position k on


@pytest.mark.parametrize("name", list(MODELS))
def test_decode_equals_full_forward(name):
    model = MODELS[name]()
    ids = torch.randint(0, 40, (2, N))
    full = model(ids)
    for p in (1, 4, 5, 13, N):
        torch.testing.assert_close(model.decode_logits(ids, p), full[:, p - 1 :], atol=1e-10, rtol=1e-10)


def test_greedy_generation_equals_recomputed_argmax():
    model = MODELS["softmax-L3-2tok"]()
    out = model.generate(torch.randint(0, 40, (2, 5)), 14)
    assert out.shape == (2, 19)
    for t in range(5, 19):
        assert out[:, t].equal(model(out[:, :t])[:, -1].argmax(-1))


def test_block_length_one_without_token_layers_is_a_plain_causal_lm_on_bos_then_tokens():
    model = bt(1, 0)
    with torch.no_grad():
        model.embedder.weight.copy_(torch.eye(32))
        model.embedder.bias.zero_()
        model.prefix.weight.copy_(torch.eye(32))
        model.prefix.bias.zero_()
        bos = 7
        model.bos.copy_(model.embed.weight[bos])
    lm = CausalLM(model.blocks.cfg).double().eval()
    state = {k: v for k, v in model.blocks.state_dict().items()}
    state["embed.weight"] = model.embed.weight.detach()
    lm.backbone.load_state_dict(state)
    ids = torch.randint(0, 40, (2, N))
    ref = lm(torch.cat([torch.full((2, 1), bos), ids], 1))[:, 1:]
    torch.testing.assert_close(model(ids), ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kw,field", [({"block_len": 0}, "block_len"), ({"token_layers": 3}, "block_token_layers"),
                                      ({"token_layers": -1}, "block_token_layers"),
                                      ({"exit_layers": [0]}, "block_len")])
def test_bad_settings_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        bt(**kw)


def test_create_model_builds_it_and_save_load_keeps_logits_and_decoding(tmp_path):
    model = efformer.create_model("lm-tiny", d_model=32, n_layers=3, n_heads=4, block_len=4,
                                  block_token_layers=1).eval()
    assert isinstance(model, BlockTransformerLM) and model.block_len == 4
    efformer.save(model, tmp_path / "bt")
    back = efformer.load(tmp_path / "bt").eval()
    assert isinstance(back, BlockTransformerLM) and back.cfg == model.cfg
    ids = torch.randint(0, 256, (2, 11))
    assert torch.equal(back(ids), model(ids))
    assert torch.equal(back.generate(ids, 6), model.generate(ids, 6))
    with pytest.raises(ConfigError, match="block_len"):
        BlockTransformerLM(build_config(dict(task="lm")))
