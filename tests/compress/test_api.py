"""``quantize``: targets, any mixer, HF models, bad input, failure leaves the model untouched, save -> load."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import efformer
from efformer.compress import FloatConfig, GPTQConfig, IntWeightLinear, RTNConfig, W8A8Config, make_config, quantize
from efformer.compress import api as api_mod
from efformer.errors import CheckpointError, ConfigError, ShapeError, UnknownNameError

IDS = torch.randint(1, 256, (3, 20), generator=torch.Generator().manual_seed(0))
CAL = torch.randint(1, 256, (6, 20), generator=torch.Generator().manual_seed(1))
CONFIGS = [RTNConfig(bits=4, group_size=32), RTNConfig(bits=8, group_size=-1, symmetric=True),
           GPTQConfig(bits=3, group_size=32, act_order=True), GPTQConfig(bits=4, group_size=-1, act_order=True),
           W8A8Config(), W8A8Config(smoothing="smoothquant"), W8A8Config(smoothing="osplus"),
           FloatConfig(format="fp4_e2m1", scaling="nv"), FloatConfig(format="fp8_e4m3", scaling="mx")]


def _model(**kw):
    torch.manual_seed(0)
    return efformer.create_model("lm-tiny", d_model=64, n_layers=2, n_heads=4, ffn_mult=3.0, **kw).eval()


def _linears(m):
    return {n for n, x in m.named_modules() if isinstance(x, nn.Linear)}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}")
def test_quantize_then_save_load_gives_identical_outputs(config, tmp_path):
    m = _model(tie_embeddings=False)
    ref = m(IDS)
    q = quantize(m, config, CAL)
    out = q(IDS)
    assert (out - ref).norm() / ref.norm() < (0.5 if config.method in ("rtn", "gptq", "float") else 0.1)
    assert isinstance(q.backbone.embed, nn.Embedding) and isinstance(q.lm_head, nn.Linear)  # head stays float
    efformer.save(q, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization"]["method"] == config.method
    back = efformer.load(tmp_path / "q")
    assert torch.equal(back(IDS), out)
    assert back.quantization == q.quantization


def test_every_linear_of_any_mixer_is_a_target():
    for mixer in ("gla", "performer", "mamba"):
        m = _model(mixer=mixer, positional="none")
        before = _linears(m)
        quantize(m, RTNConfig(bits=4, group_size=-1))
        assert not (_linears(m) & before)  # all replaced (tied embeddings: no lm_head)
        assert all(isinstance(m.get_submodule(n), IntWeightLinear) for n in before)
        assert torch.isfinite(m(IDS)).all()


def test_filter_and_default_exclusions():
    m = _model(tie_embeddings=False)
    quantize(m, RTNConfig(bits=4, group_size=32), filter=lambda n, mod: "ffn" in n)
    assert set(m.quantization["modules"]) == {f"backbone.blocks.{i}.ffn.{p}" for i in (0, 1) for p in ("gate_up",
                                                                                                   "down")}
    assert api_mod.default_filter("router", nn.Linear(2, 2)) is False


@pytest.mark.slow  # importing transformers alone takes most of its ~30 s on a busy 2-core machine
def test_hf_llama_is_quantized_with_gptq_and_smoothquant():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    ref = hf(IDS).logits
    g = quantize(copy.deepcopy(hf), GPTQConfig(bits=4, group_size=32), CAL)
    assert "lm_head" not in g.quantization["modules"] and len(g.quantization["modules"]) == 14
    assert (g(IDS).logits - ref).norm() / ref.norm() < 0.2
    s = quantize(copy.deepcopy(hf), W8A8Config(smoothing="smoothquant", quantize=False), CAL)
    assert (s(IDS).logits - ref).norm() / ref.norm() < 1e-5
    assert not torch.equal(s.model.layers[0].input_layernorm.weight, hf.model.layers[0].input_layernorm.weight)


def test_bad_configs_are_refused_by_name():
    with pytest.raises(UnknownNameError, match="awq"):
        make_config("awq")
    with pytest.raises(ConfigError, match="bits"):
        RTNConfig(bits=9)
    with pytest.raises(ConfigError, match="bits"):
        make_config("gptq", bits=1)
    with pytest.raises(ConfigError, match="format"):
        FloatConfig(format="fp6")
    with pytest.raises(ConfigError, match="group_size"):
        RTNConfig(group_size=0)
    m = _model()
    with pytest.raises(ConfigError, match="divide the input width 64"):
        quantize(m, RTNConfig(group_size=48))
    with pytest.raises(ConfigError, match="calibration"):
        quantize(m, GPTQConfig(group_size=32))
    with pytest.raises(ShapeError, match="calibration"):
        quantize(m, GPTQConfig(group_size=32), CAL.float())
    with pytest.raises(ConfigError, match="config"):
        quantize(m, {"method": "rtn"})
    assert not hasattr(m, "quantization")


def test_a_failed_quantize_leaves_the_model_untouched(monkeypatch):
    m = _model()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real(*a, **k)

    real = api_mod.gptq_mod.gptq_quantize
    monkeypatch.setattr(api_mod.gptq_mod, "gptq_quantize", boom)
    with pytest.raises(RuntimeError, match="injected"):
        quantize(m, GPTQConfig(bits=4, group_size=32), CAL)
    assert len(calls) == 3 and not hasattr(m, "quantization")
    assert all(isinstance(m.get_submodule(n), nn.Linear) for n in _linears(_model()))
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


def test_quantizing_twice_is_refused():
    m = quantize(_model(), RTNConfig(group_size=32))
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(m, RTNConfig(group_size=32))


def test_a_quantized_folder_missing_a_scale_tensor_is_refused(tmp_path):
    q = quantize(_model(), RTNConfig(bits=4, group_size=32))
    efformer.save(q, tmp_path / "q")
    w = tmp_path / "q" / "model.safetensors"
    tensors = load_file(w)
    del tensors["backbone.blocks.1.ffn.down.scale"]
    save_file(tensors, w)
    (tmp_path / "q" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="backbone.blocks.1.ffn.down.scale"):
        efformer.load(tmp_path / "q")


def test_a_bad_quantization_section_is_refused(tmp_path):
    q = quantize(_model(), RTNConfig(bits=4, group_size=32))
    efformer.save(q, tmp_path / "q")
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization"]["modules"]["backbone.blocks.0.mixer.q_proj"]["kind"] = "int3000"
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "q" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="int3000"):
        efformer.load(tmp_path / "q")
