"""to_hf: efformer -> HF folder that transformers loads with the same logits -> efformer again; refusals;
atomic writes; from_pretrained telling the two kinds of folder apart."""

from __future__ import annotations

import os

import pytest
import torch

import efformer
from efformer.errors import CapabilityError, CheckpointError
from efformer.interop import from_hf, from_pretrained, to_hf
from tests.interop import hf_models as hm

transformers = hm.transformers
BASE = dict(vocab_size=hm.VOCAB, d_model=32, n_layers=2, n_heads=4, max_len=64)
LIKE = {
    "llama": dict(mixer_options={"n_kv_heads": 2}),
    "llama-untied-yarn": dict(tie_embeddings=False, positional_options={"scaling": "yarn", "factor": 4.0,
                                                                        "original_max_len": 8}),
    "qwen2": dict(mixer_options={"qkv_bias": True, "out_bias": False}),
    "mistral": dict(mixer="sliding_window", mixer_options={"window": 4}),
    "gpt2": dict(positional="learned", norm="layernorm", ffn="gelu_tanh", mixer_options={"qkv_bias": True}),
}


def noisy(model):
    """Norm weights are ones and biases zeros at init; randomise so every mapping matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("kind", sorted(LIKE))
def test_round_trip_keeps_logits(kind, tmp_path):
    model = noisy(efformer.create_model("lm-tiny", **{**BASE, **LIKE[kind]}))
    folder = to_hf(model, tmp_path / "hf")
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert hf.config.model_type == kind.split("-")[0]
    back = from_hf(folder)
    ids = torch.randint(0, hm.VOCAB, (2, 19))
    with torch.no_grad():
        ref = model(ids)
        assert float((hf(ids).logits - ref).abs().max() / ref.abs().max()) < 1e-5
        assert float((back(ids) - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("change, reason", [
    (dict(mixer="performer"), "performer"),
    (dict(norm_placement="post"), "pre-LN"),
    (dict(ffn="gelu"), "swiglu"),
    (dict(positional="alibi"), "alibi"),
])
def test_unrepresentable_models_are_refused(change, reason, tmp_path):
    model = efformer.create_model("lm-tiny", **{**BASE, **change})
    with pytest.raises(CapabilityError, match=reason):
        to_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_an_encoder_is_refused(tmp_path):
    with pytest.raises(efformer.ConfigError, match="CausalLM"):
        to_hf(efformer.create_model("classifier-tiny"), tmp_path / "hf")


def test_a_failed_export_leaves_the_old_folder(tmp_path, monkeypatch):
    model = efformer.create_model("lm-tiny", **BASE)
    out = to_hf(model, tmp_path / "hf")
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}

    def half_written(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("efformer.interop.hf.save_file", half_written)
    with pytest.raises(CheckpointError, match="the model already at .* is unchanged"):
        to_hf(noisy(model), out)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary folder left behind


def test_export_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="other than"):
        to_hf(efformer.create_model("lm-tiny", **BASE), tmp_path / "hf")
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine"


def test_from_pretrained_reads_both_kinds(tmp_path):
    model = noisy(efformer.create_model("lm-tiny", **BASE))
    model.save_pretrained(tmp_path / "ef")
    to_hf(model, tmp_path / "hf")
    ids = torch.randint(0, hm.VOCAB, (1, 7))
    with torch.no_grad():
        ref = model(ids)
        assert torch.equal(efformer.from_pretrained(tmp_path / "ef")(ids), ref)
        assert float((from_pretrained(tmp_path / "hf")(ids) - ref).abs().max() / ref.abs().max()) < 1e-5
