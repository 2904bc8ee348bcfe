"""One declarative mapping per Hugging Face architecture: config fields -> efformer config, and weight
names -> efformer names with their transforms.

A :class:`Rule` ties efformer tensor names to HF tensor names with a transform (``same``, ``t`` for
GPT-2's Conv1D, ``cat`` of HF's separate k/v and gate/up into efformer's fused ones, ``t_split`` /
``split`` of GPT-2's fused ``c_attn``, ``fold`` of BERT's token-type row into the word embedding,
``rows`` keeping the last rows, which drops RoBERTa's padding offset, ``experts_in`` / ``experts_out``
stacking Mixtral's per-expert w1|w3 and w2 into efformer's (experts, in, out) tensors). ``{i}`` stands for
the layer index and ``{e}`` for the expert index (one HF name per expert, expert-major per name). A
rule applies when its efformer tensors exist in the built model (so bias rules cover biased and
unbiased checkpoints); ``a|b`` tries HF name ``a`` then ``b`` (BERT's tied decoder is
saved or not).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from efformer.errors import CheckpointError


@dataclass(frozen=True)
class Rule:
    """efformer names <- HF names by ``how``."""

    ef: tuple[str, ...]
    hf: tuple[str, ...]
    how: str | Callable = "same"  # a callable (hf tensors, efformer shapes) -> efformer tensors: import only


def r(ef: str | tuple[str, ...], hf: str | tuple[str, ...], how: str | Callable = "same") -> Rule:
    """A rule; single names may be given bare."""
    return Rule((ef,) if isinstance(ef, str) else ef, (hf,) if isinstance(hf, str) else hf, how)


def wb(ef: str, hf: str, how: str = "same") -> list[Rule]:
    """Rules for a module's ``weight`` and ``bias`` (the bias rule applies only where both sides have one)."""
    bias_how = {"t": "same", "t_split": "split"}.get(how, how)
    return [r(f"{ef}.weight", f"{hf}.weight", how), r(f"{ef}.bias", f"{hf}.bias", bias_how)]


def wbs(ef: tuple[str, ...], hf: tuple[str, ...], how: str) -> list[Rule]:
    """``wb`` over several modules on either side (fused projections)."""
    bias_how = {"t_split": "split"}.get(how, how)
    return [r(tuple(f"{e}.weight" for e in ef), tuple(f"{h}.weight" for h in hf), how),
            r(tuple(f"{e}.bias" for e in ef), tuple(f"{h}.bias" for h in hf), bias_how)]


# ---- transforms: HF tensors -> efformer tensors (shapes of the efformer targets), and back -----------
def to_efformer(how: str, hf: list[Tensor], shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """The efformer tensors of one rule from its HF tensors, given the efformer shapes."""
    if callable(how):
        return how(hf, shapes)
    if how == "same":
        return [hf[0]]
    if how == "t":
        return [hf[0].t()]
    if how == "cat":
        return [torch.cat(hf, 0)]
    if how in ("t_split", "split"):
        w = hf[0].t() if how == "t_split" else hf[0]
        return list(w.split([s[0] for s in shapes], 0))
    if how == "fold":
        return [hf[0] + hf[1][0]]  # word embedding + token type 0 (the only type a plain input has)
    if how == "rows":
        return [hf[0][hf[0].shape[0] - shapes[0][0]:]]  # RoBERTa's table starts at padding_idx + 1
    if how in ("experts_in", "experts_out"):
        if hf[0].dim() == 3:  # transformers 5's fused (experts, out, in) tensor, named once per expert
            return [hf[0].transpose(1, 2)]
        if how == "experts_out":  # w2 (d, h) per expert -> (experts, h, d)
            return [torch.stack([w.t() for w in hf])]
        n = len(hf) // 2  # w1 (gate) of every expert, then w3 (up): -> (experts, d, gate | up)
        return [torch.stack([torch.cat([g.t(), u.t()], 1) for g, u in zip(hf[:n], hf[n:], strict=True)])]
    raise AssertionError(how)


def to_hf_tensors(how: str, ef: list[Tensor], n_hf: int) -> list[Tensor]:
    """The HF tensors of one rule from its efformer tensors (export)."""
    if how == "same":
        return [ef[0]]
    if how == "t":
        return [ef[0].t()]
    if how == "cat":
        return list(ef[0].chunk(n_hf, 0))
    if how == "t_split":
        return [torch.cat(ef, 0).t()]
    if how == "split":
        return [torch.cat(ef, 0)]
    if how == "experts_out":
        return [w.t() for w in ef[0]]
    if how == "experts_in":
        gate, up = ef[0].transpose(1, 2).chunk(2, 1)  # (experts, h, d) each
        return [*gate, *up]
    raise CheckpointError(f"weight transform {how!r} has no inverse; this model cannot be exported")


# ---- architectures ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """A Hugging Face architecture: its config mapping and its weight rules (per head kind)."""

    config: Callable[[dict], dict]
    body: list[Rule]
    heads: dict[str, list[Rule]]  # "lm" | "mlm" | "cls" -> the head's rules
    ignore: tuple[str, ...] = ()  # HF tensor name suffixes that carry no parameter (buffers)


def _rope(c: dict) -> dict:
    """RoPE options from HF's ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``."""
    p = dict(c.get("rope_parameters") or {})
    if not p:
        p = {"rope_theta": c.get("rope_theta", 10000.0), **(c.get("rope_scaling") or {})}
    kind = p.get("rope_type", p.get("type", "default"))
    out: dict[str, Any] = {"base": float(p.get("rope_theta", c.get("rope_theta", 10000.0))), "layout": "half"}
    if p.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
        out["rotary_fraction"] = p.get("partial_rotary_factor", c.get("partial_rotary_factor"))
    if kind == "default":
        return out
    if kind not in ("linear", "dynamic", "llama3", "yarn"):
        raise CheckpointError(f"config.json: rope_type {kind!r} is not supported (efformer maps default, linear, "
                              "dynamic, llama3, yarn); use a model with one of those")
    out.update(scaling=kind, factor=float(p.get("factor") or 1.0))
    orig = p.get("original_max_position_embeddings")
    if kind == "dynamic":  # HF's dynamic scaling grows the base past max_position_embeddings
        orig = c["max_position_embeddings"]
    if orig is not None:
        out["original_max_len"] = int(orig)
    if kind == "llama3":
        out.update(low_freq_factor=float(p["low_freq_factor"]), high_freq_factor=float(p["high_freq_factor"]))
    if kind == "yarn":
        if p.get("factor") is None:
            out["factor"] = c["max_position_embeddings"] / orig
        for k in ("beta_fast", "beta_slow", "attention_factor", "truncate"):
            if p.get(k) is not None:
                out[k] = p[k]
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
        if p.get("attention_factor") is None and mscale and mscale_all:
            def m(s: float, k: float) -> float:
                return 1.0 if s <= 1 else 0.1 * k * math.log(s) + 1.0

            out["attention_factor"] = m(out["factor"], mscale) / m(out["factor"], mscale_all)
    return out


_ACT = {"silu": "swiglu", "swish": "swiglu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
        "relu": "relu"}


def _ffn(act: str, glu: bool) -> str:
    name = _ACT.get(act)
    if name is None or glu != (name == "swiglu"):
        raise CheckpointError(f"config.json: activation {act!r} is not supported here (known: "
                              f"{', '.join(k for k, v in _ACT.items() if (v == 'swiglu') == glu)})")
    return name


def _common(c: dict, d: int, heads: int) -> dict:
    pad = c.get("pad_token_id")
    return {"vocab_size": c["vocab_size"], "d_model": d, "n_heads": heads,
            "pad_id": pad if isinstance(pad, int) and 0 <= pad < c["vocab_size"] else 0}


def _llama_config(c: dict, qkv_bias: bool | None = None, out_bias: bool | None = None) -> dict:
    """Llama, Mistral, Qwen2 (whose q/k/v have biases and whose out projection has none)."""
    d, h = c["hidden_size"], c["num_attention_heads"]
    bias = bool(c.get("attention_bias", False))
    opts = {"n_kv_heads": c.get("num_key_value_heads") or h, "qkv_bias": bias if qkv_bias is None else qkv_bias,
            "out_bias": bias if out_bias is None else out_bias}
    mixer: str | list[str] = "softmax"
    window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
    types = c.get("layer_types") or (["sliding_attention" if window else "full_attention"] * c["num_hidden_layers"])
    names = ["sliding_window" if t == "sliding_attention" and window else "softmax" for t in types]
    if set(types) - {"full_attention", "sliding_attention"}:
        raise CheckpointError(f"config.json: layer_types {sorted(set(types))} hold a kind efformer does not map "
                              "(it maps full_attention and sliding_attention)")
    mixer_options: dict | list = opts
    if len(set(names)) == 1:
        mixer = names[0]
        mixer_options = {**opts, "window": window} if mixer == "sliding_window" else opts
    else:
        mixer = names
        mixer_options = [{**opts, "window": window} if n == "sliding_window" else opts for n in names]
    hd = c.get("head_dim") or d // h
    return {**_common(c, d, h), "task": "lm", "n_layers": c["num_hidden_layers"], "mixer": mixer,
            "mixer_options": mixer_options, "positional": "rope", "positional_options": _rope(c), "norm": "rmsnorm",
            "norm_eps": c.get("rms_norm_eps", 1e-6), "ffn": _ffn(c.get("hidden_act", "silu"), glu=True),
            "ffn_mult": 1.5 * c["intermediate_size"] / d, "ffn_bias": bool(c.get("mlp_bias", False)),
            "max_len": c.get("max_position_embeddings", 2048), "tie_embeddings": bool(c.get("tie_word_embeddings")),
            "head_dim": None if hd == d // h else hd}


def _mixtral_config(c: dict) -> dict:
    """Mixtral: Mistral's attention and a top-k MoE FFN (softmax over all experts, top-k renormalised).

    HF's balance loss (coefficient ``router_aux_loss_coef``) counts top-k assignments per token and
    averages over the layers; efformer's counts them per assignment and sums layers, so the weight is
    rescaled by top_k / n_layers. ``router_jitter_noise`` (training-time input noise) is not mapped."""
    k, layers = c["num_experts_per_tok"], c["num_hidden_layers"]
    opts = {"n_experts": c["num_local_experts"], "top_k": k, "normalize_topk": True,
            "expert_hidden": c["intermediate_size"], "activation": "silu", "z_loss_weight": 0.0,
            "aux_loss_weight": float(c.get("router_aux_loss_coef", 0.001)) * k / layers}
    # _llama_config refuses activations other than silu; Mixtral experts have no biases
    return {**_llama_config(c), "ffn": "moe", "ffn_options": opts, "ffn_bias": None}


def _gpt2_config(c: dict) -> dict:
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if c.get(key, ok) != ok:
            raise CheckpointError(f"config.json: {key}={c[key]!r} is not supported (efformer's attention needs "
                                  f"{key}={ok})")
    d = c["n_embd"]
    return {**_common(c, d, c["n_head"]), "task": "lm", "n_layers": c["n_layer"], "mixer": "softmax",
            "mixer_options": {"qkv_bias": True}, "positional": "learned", "norm": "layernorm",
            "norm_eps": c.get("layer_norm_epsilon", 1e-5), "ffn": _ffn(c.get("activation_function", "gelu_new"), False),
            "ffn_mult": (c.get("n_inner") or 4 * d) / d, "max_len": c.get("n_positions", 1024),
            "tie_embeddings": bool(c.get("tie_word_embeddings", True))}


def _bert_config(c: dict, offset: int = 0) -> dict:
    """BERT and RoBERTa (whose position table starts ``offset`` rows in)."""
    if c.get("position_embedding_type", "absolute") != "absolute" or c.get("is_decoder"):
        raise CheckpointError("config.json: only encoders with absolute position embeddings are supported "
                              f"(position_embedding_type={c.get('position_embedding_type')!r}, "
                              f"is_decoder={c.get('is_decoder')!r})")
    d = c["hidden_size"]
    labels = c.get("id2label")
    return {**_common(c, d, c["num_attention_heads"]), "task": "classifier", "n_layers": c["num_hidden_layers"],
            "mixer": "softmax", "mixer_options": {"qkv_bias": True}, "positional": "learned",
            "norm": "layernorm", "norm_placement": "post", "embed_norm": True,
            "norm_eps": c.get("layer_norm_eps", 1e-12),
            "ffn": _ffn(c.get("hidden_act", "gelu"), False), "ffn_mult": c["intermediate_size"] / d,
            "max_len": c.get("max_position_embeddings", 512) - offset,
            "n_classes": max(2, len(labels) if isinstance(labels, dict) else c.get("num_labels", 2)),
            "pooling": "cls"}


def _roberta_config(c: dict) -> dict:
    return _bert_config(c, offset=int(c.get("pad_token_id", 1)) + 1)  # positions count from padding_idx + 1


_L = "backbone.blocks.{i}"
_LLAMA = [
    r("backbone.embed.weight", "model.embed_tokens.weight"),
    r(f"{_L}.norm1.weight", "model.layers.{i}.input_layernorm.weight"),
    *wb(f"{_L}.mixer.q_proj", "model.layers.{i}.self_attn.q_proj"),
    *wbs((f"{_L}.mixer.kv_proj",), ("model.layers.{i}.self_attn.k_proj", "model.layers.{i}.self_attn.v_proj"), "cat"),
    *wb(f"{_L}.mixer.out_proj", "model.layers.{i}.self_attn.o_proj"),
    r(f"{_L}.norm2.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    *wbs((f"{_L}.ffn.gate_up",), ("model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"), "cat"),
    *wb(f"{_L}.ffn.down", "model.layers.{i}.mlp.down_proj"),
    r("backbone.final_norm.weight", "model.norm.weight"),
]
_MOE = "model.layers.{i}.block_sparse_moe"  # transformers 5 loads it as .mlp and may save fused experts
_MIXTRAL = [rule for rule in _LLAMA if ".ffn." not in rule.ef[0]] + [
    r(_L + ".ffn.router.weight", f"{_MOE}.gate.weight|model.layers.{{i}}.mlp.gate.weight"),
    r(_L + ".ffn.w_in", (f"{_MOE}.experts.{{e}}.w1.weight|model.layers.{{i}}.mlp.experts.gate_up_proj",
                         f"{_MOE}.experts.{{e}}.w3.weight|model.layers.{{i}}.mlp.experts.gate_up_proj"), "experts_in"),
    r(_L + ".ffn.w_out", f"{_MOE}.experts.{{e}}.w2.weight|model.layers.{{i}}.mlp.experts.down_proj", "experts_out"),
]
_GPT2 = [
    r("backbone.embed.weight", "transformer.wte.weight"),
    r("backbone.pos.table.weight", "transformer.wpe.weight"),
    *wb(f"{_L}.norm1", "transformer.h.{i}.ln_1"),
    *wbs((f"{_L}.mixer.q_proj", f"{_L}.mixer.kv_proj"), ("transformer.h.{i}.attn.c_attn",), "t_split"),
    *wb(f"{_L}.mixer.out_proj", "transformer.h.{i}.attn.c_proj", "t"),
    *wb(f"{_L}.norm2", "transformer.h.{i}.ln_2"),
    *wb(f"{_L}.ffn.up", "transformer.h.{i}.mlp.c_fc", "t"),
    *wb(f"{_L}.ffn.down", "transformer.h.{i}.mlp.c_proj", "t"),
    *wb("backbone.final_norm", "transformer.ln_f"),
]


def _encoder(p: str) -> list[Rule]:
    e, lay = f"{p}.embeddings", f"{p}.encoder.layer.{{i}}"
    return [
        r("backbone.embed.weight", (f"{e}.word_embeddings.weight", f"{e}.token_type_embeddings.weight"), "fold"),
        r("backbone.pos.table.weight", f"{e}.position_embeddings.weight", "rows"),
        *wb("backbone.embed_norm", f"{e}.LayerNorm"),
        *wb(f"{_L}.mixer.q_proj", f"{lay}.attention.self.query"),
        *wbs((f"{_L}.mixer.kv_proj",), (f"{lay}.attention.self.key", f"{lay}.attention.self.value"), "cat"),
        *wb(f"{_L}.mixer.out_proj", f"{lay}.attention.output.dense"),
        *wb(f"{_L}.norm1", f"{lay}.attention.output.LayerNorm"),
        *wb(f"{_L}.ffn.up", f"{lay}.intermediate.dense"),
        *wb(f"{_L}.ffn.down", f"{lay}.output.dense"),
        *wb(f"{_L}.norm2", f"{lay}.output.LayerNorm"),
    ]


_BERT_HEADS = {
    "mlm": [*wb("head.dense", "cls.predictions.transform.dense"),
            *wb("head.norm", "cls.predictions.transform.LayerNorm"),
            r("head.decoder.weight", "cls.predictions.decoder.weight|bert.embeddings.word_embeddings.weight"),
            r("head.decoder.bias", "cls.predictions.bias|cls.predictions.decoder.bias")],
    "cls": [*wb("head.dense", "bert.pooler.dense"), *wb("head.out", "classifier")],
}
_ROBERTA_HEADS = {
    "mlm": [*wb("head.dense", "lm_head.dense"), *wb("head.norm", "lm_head.layer_norm"),
            r("head.decoder.weight", "lm_head.decoder.weight|roberta.embeddings.word_embeddings.weight"),
            r("head.decoder.bias", "lm_head.bias|lm_head.decoder.bias")],
    "cls": [*wb("head.dense", "classifier.dense"), *wb("head.out", "classifier.out_proj")],
}
_LM_HEAD = {"lm": [r("lm_head.weight", "lm_head.weight")]}
_BUFFERS = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias", "position_ids", "token_type_ids")

ARCHS: dict[str, Arch] = {
    "llama": Arch(_llama_config, _LLAMA, _LM_HEAD, _BUFFERS),
    "mistral": Arch(_llama_config, _LLAMA, _LM_HEAD, _BUFFERS),
    "mixtral": Arch(_mixtral_config, _MIXTRAL, _LM_HEAD, _BUFFERS),
    "qwen2": Arch(lambda c: _llama_config(c, qkv_bias=True, out_bias=False), _LLAMA, _LM_HEAD, _BUFFERS),
    "gpt2": Arch(_gpt2_config, _GPT2, {"lm": []}, _BUFFERS),
    "bert": Arch(_bert_config, _encoder("bert"), _BERT_HEADS, _BUFFERS),
    "roberta": Arch(_roberta_config, _encoder("roberta"), _ROBERTA_HEADS, _BUFFERS),
}
