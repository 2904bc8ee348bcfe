"""from_hf against tiny random Hugging Face models: logits, greedy generation, long positions, shards."""

from __future__ import annotations

import pytest
import torch

from efformer.interop import FirstTokenClassifier, MaskedLM, from_hf
from efformer.models.lm import CausalLM
from tests.helpers import rel_err
from tests.interop import hf_models as hm

DECODERS = {"llama": hm.llama, "mistral": hm.mistral, "mixtral": hm.mixtral, "qwen2": hm.qwen2, "gpt2": hm.gpt2}
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
}


def rel_max(ref, got) -> float:
    """Max abs error relative to the reference's max abs value."""
    return float((got - ref).abs().max() / ref.abs().max())


def imported(hf, tmp_path, **kw):
    return from_hf(hm.save(hf, tmp_path / "hf", **kw))


@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_decoder_logits_match(arch, tmp_path):
    hf = DECODERS[arch]()
    model = imported(hf, tmp_path)
    assert isinstance(model, CausalLM)
    ids = torch.randint(0, hm.VOCAB, (2, 13))  # 13 > mistral's window of 5
    with torch.no_grad():
        assert rel_max(hf(ids).logits, model(ids)) < 1e-5


def test_mistral_window_is_the_sliding_window_mixer(tmp_path):
    model = imported(hm.mistral(), tmp_path)
    assert model.cfg.mixer == "sliding_window" and model.cfg.mixer_options["window"] == 5


def test_qwen2_has_qkv_biases_and_no_out_bias(tmp_path):
    mixer = imported(hm.qwen2(), tmp_path).backbone.blocks[0].mixer
    assert mixer.q_proj.bias is not None and mixer.kv_proj.bias is not None and mixer.out_proj.bias is None


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_rope_scaling_logits_match(kind, tmp_path):
    hf = hm.llama(max_position_embeddings=16, rope_parameters={"rope_theta": 10000.0, **SCALINGS[kind]})
    model = imported(hf, tmp_path)
    assert model.cfg.positional_options["scaling"] == kind
    ids = torch.randint(0, hm.VOCAB, (2, 37))  # past max_position_embeddings: dynamic grows its base
    with torch.no_grad():
        assert rel_max(hf(ids).logits, model(ids)) < 1e-5


@pytest.mark.parametrize("kind", ["default", *sorted(SCALINGS)])
def test_positions_past_32k_match(kind, tmp_path):
    params = {"rope_theta": 500000.0, **SCALINGS.get(kind, {"rope_type": "default"})}
    if "original_max_position_embeddings" in params:
        params["original_max_position_embeddings"] = 8192
    hf = hm.llama(max_position_embeddings=131072, rope_parameters=params)
    model = imported(hf, tmp_path)
    ids = torch.randint(0, hm.VOCAB, (2, 9))
    pos = torch.tensor([[40000], [131000]]) + torch.arange(9)  # far positions, a short sequence
    with torch.no_grad():
        assert rel_max(hf(ids, position_ids=pos).logits, model(ids, positions=pos)) < 1e-5


@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_greedy_generate_matches_hf_with_left_padding(arch, tmp_path):
    hf = DECODERS[arch]()
    model = imported(hf, tmp_path)
    prompts = [[5, 9, 2, 44, 17, 3, 8], [7, 1], [30, 31, 32, 33]]
    n = max(map(len, prompts))
    ids = torch.tensor([[0] * (n - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)[:, n:]
    got = model.generate(prompts, 32)
    assert [row[len(p):] for row, p in zip(got, prompts, strict=True)] == ref.tolist()


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_encoder_mlm_and_classifier_match(family, tmp_path):
    ids = torch.randint(3, hm.VOCAB, (3, 11))
    keep = torch.ones(3, 11, dtype=torch.bool)
    keep[1, 7:] = False  # right padding, as these encoders are fed
    keep[2, 4:] = False
    pad = 1 if family == "roberta" else 0
    ids = ids.masked_fill(~keep, pad)
    for head, cls in (("mlm", MaskedLM), ("cls", FirstTokenClassifier)):
        hf = getattr(hm, family)(head)
        model = imported(hf, tmp_path / head)
        assert isinstance(model, cls)
        with torch.no_grad():
            ref, got = hf(ids, attention_mask=keep.long()).logits, model(ids, mask=keep)
        if head == "mlm":
            ref, got = ref[keep], got[keep]  # padded positions carry no prediction
        assert rel_max(ref, got) < 1e-5


def test_sharded_checkpoint_imports(tmp_path):
    hf = hm.llama()
    folder = hm.save(hf, tmp_path / "hf", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists() and len(list(folder.glob("*.safetensors"))) > 2
    ids = torch.randint(0, hm.VOCAB, (1, 6))
    with torch.no_grad():
        assert rel_max(hf(ids).logits, from_hf(folder)(ids)) < 1e-5


def test_a_wrong_rope_layout_would_be_caught(tmp_path):
    """The parity checks can fail: the same weights with efformer's interleaved rotary disagree with HF."""
    hf = hm.llama()
    model = imported(hf, tmp_path)
    model.backbone.pos.opts = model.backbone.pos.opts.model_copy(update={"layout": "interleaved"})
    ids = torch.randint(0, hm.VOCAB, (1, 9))
    with torch.no_grad():
        assert rel_err(hf(ids).logits, model(ids)) > 1e-3
