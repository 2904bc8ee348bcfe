"""Mixtral through the interop package: from_hf against HF's MixtralForCausalLM (logits for more expert
counts, the router's exact choices and gates; logits and greedy generation of the default tiny Mixtral
are in test_hf), both checkpoint layouts, and to_hf back (round trip, refusals)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import efformer
from efformer.errors import CapabilityError
from efformer.interop import from_hf, to_hf
from efformer.nn.moe import MoE
from tests.interop import hf_models as hm

transformers = hm.transformers
# 4 experts top-2 (logits and greedy generation) is in test_hf's DECODERS; here the other corners
VARIANTS = {"3x top-1, window 5": {"num_local_experts": 3, "num_experts_per_tok": 1, "sliding_window": 5},
            "5x top-5": {"num_local_experts": 5, "num_experts_per_tok": 5}}


def rel_max(ref, got) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match(variant, tmp_path):
    hf = hm.mixtral(**VARIANTS[variant])
    model = from_hf(hm.save(hf, tmp_path / "hf"))
    assert model.cfg.ffn == "moe" and model.cfg.ffn_options["n_experts"] == hf.config.num_local_experts
    ids = torch.randint(0, hm.VOCAB, (2, 13))  # 13 > the window of 5
    with torch.no_grad():
        assert rel_max(hf(ids).logits, model(ids)) < 1e-5


def test_router_choices_and_gates_are_hfs_exactly(tmp_path):
    """Per layer, on HF's own FFN input: the same top-k experts per token and bit-identical gates."""
    hf = hm.mixtral()
    model = from_hf(hm.save(hf, tmp_path / "hf"))
    seen = {}
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (args[0], out)))
             for i, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        hf(torch.randint(0, hm.VOCAB, (3, 11)))
        for h in hooks:
            h.remove()
        for i, (x, (_, hf_gates, hf_experts)) in seen.items():
            moe = model.backbone.blocks[i].ffn
            assert isinstance(moe, MoE)
            tok, expert, gate = moe.route(x, torch.ones(x.shape[0], dtype=torch.bool))
            ours_e = torch.full_like(hf_experts, -1)
            ours_g = torch.zeros_like(hf_gates)
            slot = torch.arange(tok.numel()) // x.shape[0]  # route() lists every token's j-th choice, j = 0, 1
            ours_e[tok, slot], ours_g[tok, slot] = expert, gate
            assert torch.equal(ours_e, hf_experts)
            assert torch.equal(ours_g, hf_gates)


def test_fused_expert_layout_imports_the_same(tmp_path):
    """transformers 5's in-memory names (mlp.gate, fused mlp.experts.gate_up_proj / down_proj) load too."""
    hf = hm.mixtral()
    legacy = hm.save(hf, tmp_path / "legacy")
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(legacy / "config.json", fused / "config.json")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    a, b = from_hf(legacy), from_hf(fused)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def moe_lm(**options):
    cfg = dict(vocab_size=hm.VOCAB, d_model=32, n_layers=2, n_heads=4, max_len=64, tie_embeddings=False,
               mixer_options={"n_kv_heads": 2}, ffn="moe", ffn_mult=2.0,
               ffn_options={"n_experts": 4, "top_k": 2, "normalize_topk": True, **options})
    model = efformer.create_model("lm-tiny", **cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("window", [None, 4])
def test_round_trip_keeps_logits(window, tmp_path):
    model = moe_lm()
    if window:
        model = efformer.create_model("lm-tiny", **{**model.cfg.model_dump(), "mixer": "sliding_window",
                                                   "mixer_options": {"n_kv_heads": 2, "window": window}})
        model.eval()
    folder = to_hf(model, tmp_path / "hf")
    hf_cfg = json.loads((folder / "config.json").read_text())
    assert hf_cfg["model_type"] == "mixtral" and hf_cfg["sliding_window"] == window
    # eager experts: the default grouped-mm path needs 16-byte strides, which tiny widths lack
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, experts_implementation="eager").eval()
    back = from_hf(folder)
    assert back.cfg.ffn_options["aux_loss_weight"] == pytest.approx(model.cfg.ffn_options.get("aux_loss_weight",
                                                                                                0.01))
    ids = torch.randint(0, hm.VOCAB, (2, 19))
    with torch.no_grad():
        ref = model(ids)
        assert rel_max(ref, hf(ids).logits) < 1e-5
        assert rel_max(ref, back(ids)) < 1e-5


@pytest.mark.parametrize("change, reason", [
    ({"normalize_topk": False}, "renormalises"),
    ({"n_shared": 1}, "shared experts"),
    ({"activation": "gelu"}, "silu"),
    ({"routing": "expert", "allow_future_routing": True}, "expert-choice"),
])
def test_moes_mixtral_cannot_represent_are_refused(change, reason, tmp_path):
    with pytest.raises(CapabilityError, match=reason):
        to_hf(moe_lm(**change), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_mixture_of_depths_model_is_refused(tmp_path):
    """MoD changes the forward, so exporting it as a plain Llama would give other logits."""
    model = efformer.create_model("lm-tiny", vocab_size=hm.VOCAB, d_model=32, n_heads=4, mod_capacity=0.5)
    with pytest.raises(CapabilityError, match="Mixture-of-Depths"):
        to_hf(model, tmp_path / "hf")
