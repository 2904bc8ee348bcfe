"""``from_hf`` / ``to_hf`` / ``from_pretrained``: Hugging Face model folders in and out of efformer.

Import builds the efformer model the folder's ``config.json`` describes (through the architecture's
mapping in ``archs.py``), then fills every one of its tensors from the safetensors by the mapping's
rules; a tensor the mapping leaves unused, or one missing or of the wrong shape, is refused, so an
imported model is the checkpoint or an error. Export runs the same rules backwards for models HF's
Llama / Mistral / Mixtral / Qwen2 / GPT-2 classes can represent, and writes the folder atomically (a temporary
sibling renamed into place, as ``efformer.save`` does).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from efformer.durable import fsync_dir, fsync_file
from efformer.errors import CapabilityError, CheckpointError, ConfigError, EfformerError
from efformer.interop.archs import ARCHS, Rule, to_efformer, to_hf_tensors
from efformer.interop.folder import CONFIG, SINGLE, Weights, hf_folder, read_json
from efformer.interop.heads import FirstTokenClassifier, MaskedLM
from efformer.interop.vision_archs import VISION_ARCHS, VisionArch
from efformer.models.config import ModelConfig, build_config
from efformer.models.io import MANIFEST_FILE, _as_path, load, publish_folder
from efformer.models.lm import CausalLM
from efformer.models.vision import ImageClassifier, VisionConfig, build_vision_config
from efformer.nn.moe import MoEOptions, expert_width

_HEADS = {"lm": CausalLM, "mlm": MaskedLM, "cls": FirstTokenClassifier}
_HEAD_SUFFIX = (("ForCausalLM", "lm"), ("LMHeadModel", "lm"), ("ForMaskedLM", "mlm"),
                ("ForSequenceClassification", "cls"))


# ---- import -----------------------------------------------------------------------------------
def from_hf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The efformer model equal to the Hugging Face model in the local folder ``path`` (safetensors only)."""
    folder = hf_folder(path)
    hf_cfg = read_json(folder / CONFIG, "a Hugging Face model folder needs its config.json (save_pretrained writes "
                                        "it); copy it from the model's source")
    model_type = hf_cfg.get("model_type")
    arch = ARCHS.get(model_type)
    if model_type in VISION_ARCHS:
        return _from_hf_vision(folder, hf_cfg, VISION_ARCHS[model_type], dtype)
    if arch is None:
        raise CheckpointError(f"{folder / CONFIG}: model_type {model_type!r} is not supported; efformer imports "
                              f"{', '.join(sorted([*ARCHS, *VISION_ARCHS]))}")
    head = _head_kind(folder, hf_cfg, arch.heads)
    cfg = _mapped_config(folder, hf_cfg, lambda: build_config(arch.config(hf_cfg)))
    weights = Weights(folder)
    model = _HEADS[head](cfg)
    model.load_state_dict(_import_tensors(arch.body + arch.heads[head], arch.ignore, weights, model, folder))
    return model.to(dtype).eval()


def _from_hf_vision(folder: Path, hf_cfg: dict, arch: VisionArch, dtype: torch.dtype) -> nn.Module:
    """An ImageClassifier from a HF vision classifier folder, by the architecture's rules."""
    names = hf_cfg.get("architectures") or list(arch.classes)
    if not set(names) & set(arch.classes):
        raise CheckpointError(f"{folder / CONFIG}: architectures {names} name no head efformer imports for "
                              f"{hf_cfg.get('model_type')} (known: {', '.join(arch.classes)}); save the model as one")
    cfg = _mapped_config(folder, hf_cfg, lambda: build_vision_config(arch.config(hf_cfg)))
    model = ImageClassifier(cfg)
    rules = _mapped_config(folder, hf_cfg, lambda: arch.rules(hf_cfg))
    model.load_state_dict(_import_tensors(rules, arch.ignore, Weights(folder), model, folder))
    return model.to(dtype).eval()


def _mapped_config(folder: Path, hf_cfg: dict, build):
    """``build()`` with a missing config field or an efformer refusal reported against config.json."""
    model_type = hf_cfg.get("model_type")
    try:
        return build()
    except KeyError as e:
        raise CheckpointError(f"{folder / CONFIG} lacks the field {e.args[0]!r} a {model_type} config has; restore "
                              "the file from the model's source") from None
    except EfformerError as e:
        if isinstance(e, CheckpointError):
            raise CheckpointError(f"{folder / CONFIG}: {e}") from None
        raise CheckpointError(f"{folder / CONFIG} maps to an invalid efformer config: {e}") from None


def _head_kind(folder: Path, hf_cfg: dict, heads: dict) -> str:
    """Which head the checkpoint holds, from ``architectures`` (or the architecture's first head)."""
    names = hf_cfg.get("architectures") or []
    for name in names:
        for suffix, kind in _HEAD_SUFFIX:
            if str(name).endswith(suffix) and kind in heads:
                return kind
    if names:
        raise CheckpointError(f"{folder / CONFIG}: architectures {names} name no head efformer imports for "
                              f"{hf_cfg.get('model_type')} (known: {', '.join(heads)}); save the model with one")
    return next(iter(heads))


def _expand(rules: list[Rule], cfg: ModelConfig | VisionConfig) -> list[Rule]:
    """Rules with ``{i}`` filled per layer, and each HF name holding ``{e}`` repeated once per expert
    (vision rules come with their indices filled: a VisionConfig has stages, not one layer count)."""
    n_experts = int(getattr(cfg, "ffn_options", {}).get("n_experts", 0))
    out = []
    for rule in rules:
        per_layer = any("{i}" in n for n in rule.ef)
        for i in range(getattr(cfg, "n_layers", 0)) if per_layer else [None]:
            def fill(names, i=i):
                return tuple(n.replace("{i}", str(i)) for n in names)

            hf = tuple(n.replace("{e}", str(e)) for n in fill(rule.hf)
                       for e in (range(n_experts) if "{e}" in n else [None]))
            out.append(Rule(fill(rule.ef), hf, rule.how))
    return out


def _import_tensors(rules, ignore, weights: Weights, model: nn.Module, folder: Path) -> dict[str, Tensor]:
    """The model's state dict filled from the checkpoint by ``rules``; every tensor accounted for."""
    state, out, used = model.state_dict(), {}, set()
    for rule in _expand(rules, model.cfg):
        if not all(e in state for e in rule.ef):
            continue  # e.g. a bias this model has none of
        names = [_pick(alts, weights, folder, rule.ef[0]) for alts in rule.hf]
        read = {n: weights.get(n) for n in dict.fromkeys(names)}  # a fused tensor named once per expert: read once
        tensors = [read[n] for n in names]
        used.update(names)
        shapes = [tuple(state[e].shape) for e in rule.ef]
        try:
            outs = to_efformer(rule.how, tensors, shapes)
        except RuntimeError:
            outs = [torch.empty(0)] * len(shapes)  # mismatched pieces: reported as a shape error below
        for e, t, want in zip(rule.ef, outs, shapes, strict=True):
            if tuple(t.shape) != want:
                got = ", ".join(f"{n} {tuple(x.shape)}" for n, x in zip(names, tensors, strict=True))
                raise CheckpointError(f"{weights.where[names[0]]}: tensor(s) {got} do not fit {e} {want} that "
                                      f"{folder / CONFIG} describes; the weights and config.json belong to "
                                      "different models: restore the matching pair")
            out[e] = t
    missing = sorted(set(state) - set(out))
    if missing:  # a mapping bug, not a user's: every efformer tensor needs a rule
        raise CheckpointError(f"{folder}: no checkpoint tensor maps to {missing[:5]}")
    unused = sorted(n for n in weights.names() - used if not n.endswith(ignore))
    if unused:
        raise CheckpointError(f"{weights.where[unused[0]]} holds {len(unused)} tensors the {folder / CONFIG} model "
                              f"does not use ({', '.join(unused[:4])}); the weights and config.json belong to "
                              "different models: restore the matching pair")
    return out


def _pick(alternatives: str, weights: Weights, folder: Path, target: str) -> str:
    names = weights.names()
    for name in alternatives.split("|"):
        if name in names:
            return name
    raise CheckpointError(f"{folder}: the safetensors hold no tensor {alternatives.split('|')[0]!r} (for {target}) "
                          f"that {folder / CONFIG} implies; restore the complete weights from the model's source")


# ---- export -----------------------------------------------------------------------------------
def _export_plan(cfg: ModelConfig) -> tuple[str, dict]:
    """(model_type, HF config) for ``cfg``, or a CapabilityError with every reason it cannot be exported."""
    mixers = cfg.layer_mixers()
    names = {m for m, _ in mixers}
    opts = mixers[0][1]
    why: list[str] = []
    if cfg.task != "lm":
        why.append(f"task={cfg.task!r}: only causal LMs are exported")
    if names - {"softmax", "sliding_window"} or len({json.dumps(o, sort_keys=True) for _, o in mixers}) > 1:
        why.append(f"mixers {sorted(names)}: HF's Llama/Mistral/Qwen2/GPT-2 have softmax or sliding-window "
                   "attention with the same options in every layer")
    if opts.get("qk_norm"):
        why.append("qk_norm has no place in these HF classes")
    if cfg.mod_capacity is not None:
        why.append("mod_capacity: Mixture-of-Depths routing is in no HF decoder class")
    if cfg.norm_placement != "pre" or cfg.embed_norm:
        why.append(f"norm_placement={cfg.norm_placement!r}, embed_norm={cfg.embed_norm}: HF's decoders are pre-LN")
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    common = {"vocab_size": cfg.vocab_size, "num_hidden_layers": cfg.n_layers,
              "tie_word_embeddings": cfg.tie_embeddings, "pad_token_id": cfg.pad_id, "torch_dtype": "float32"}
    if cfg.positional == "rope":
        why += [w for ok, w in (
            (cfg.norm == "rmsnorm", f"norm={cfg.norm!r}: a rotary HF decoder uses rmsnorm"),
            (cfg.ffn in ("swiglu", "moe"), f"ffn={cfg.ffn!r}: a rotary HF decoder uses swiglu (or Mixtral's moe)"),
            (cfg.positional_options.get("rotary_fraction", 1.0) == 1.0, "partial rotary is not in HF's Llama"),
        ) if not ok]
        moe = _mixtral_fields(cfg, why) if cfg.ffn == "moe" else None
        if why:
            raise CapabilityError(f"cannot export to Hugging Face: {'; '.join(why)}")
        qkv, out = opts.get("qkv_bias", False), opts.get("out_bias")
        out = qkv if out is None else out
        sliding = "sliding_window" in names
        if moe is not None and (qkv or out):
            raise CapabilityError("cannot export to Hugging Face: Mixtral's attention has no biases "
                                  f"(qkv_bias={qkv}, out_bias={out})")
        if moe is not None:
            model_type = "mixtral"
        elif qkv == out and not (qkv and sliding):
            model_type = "mistral" if sliding else "llama"
        elif qkv and not out and not sliding:
            model_type = "qwen2"
        else:  # Llama biases all four projections or none; Qwen2 q/k/v only; Mistral none
            raise CapabilityError(f"cannot export to Hugging Face: qkv_bias={qkv}, out_bias={out} with mixers "
                                  f"{sorted(names)} match no HF decoder")
        hf = {**common, "hidden_size": cfg.d_model, "num_attention_heads": cfg.n_heads,
              "num_key_value_heads": opts.get("n_kv_heads") or cfg.n_heads, "head_dim": hd,
              "intermediate_size": round(2 * cfg.ffn_mult * cfg.d_model / 3), "hidden_act": "silu",
              "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps or 1e-6,
              "rope_parameters": _rope_parameters(cfg), "mlp_bias": bool(cfg.ffn_bias)}
        if model_type == "llama":
            hf["attention_bias"] = bool(qkv)
        if model_type in ("mistral", "mixtral"):
            hf["sliding_window"] = opts["window"] if sliding else None
        if moe is not None:
            del hf["mlp_bias"]
            hf.update(moe)
        return model_type, hf
    acts = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
    why += [w for ok, w in (
        (cfg.positional == "learned", f"positional={cfg.positional!r}: HF decoders use rope (Llama) or learned "
                                      "(GPT-2) positions"),
        (cfg.norm == "layernorm", f"norm={cfg.norm!r}: GPT-2 uses layernorm"),
        (cfg.ffn in acts and cfg.ffn_bias is not False, f"ffn={cfg.ffn!r}: GPT-2 uses a biased MLP"),
        ("sliding_window" not in names, "GPT-2 has no sliding window"),
        (opts.get("qkv_bias") and opts.get("out_bias") in (None, True), "GPT-2's attention has biases"),
        (opts.get("n_kv_heads") in (None, cfg.n_heads) and cfg.head_dim is None,
         "GPT-2 has plain multi-head attention"),
    ) if not ok]
    if why:
        raise CapabilityError(f"cannot export to Hugging Face: {'; '.join(why)}")
    return "gpt2", {**common, "n_embd": cfg.d_model, "n_head": cfg.n_heads, "n_layer": cfg.n_layers,
                    "n_positions": cfg.max_len, "n_inner": round(cfg.ffn_mult * cfg.d_model),
                    "activation_function": acts[cfg.ffn], "layer_norm_epsilon": cfg.norm_eps or 1e-5,
                    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _mixtral_fields(cfg: ModelConfig, why: list[str]) -> dict:
    """HF Mixtral config fields of a ``moe`` FFN; appends to ``why`` what Mixtral cannot represent."""
    o = MoEOptions.model_validate(cfg.ffn_options)
    why += [w for ok, w in (
        (o.routing == "token", "expert-choice routing: Mixtral's tokens choose their experts"),
        (o.normalize_topk, "normalize_topk=false: Mixtral renormalises the top-k gates"),
        (o.n_shared == 0 and o.bigmac_dim is None, "shared experts / BigMac dimensions are not in Mixtral"),
        (o.expert_scale == 1.0 and not o.pregated, "expert_scale and pregated routing are not in Mixtral"),
        (o.activation == "silu", f"activation={o.activation!r}: Mixtral's experts use silu"),
    ) if not ok]
    return {"num_local_experts": o.n_experts, "num_experts_per_tok": o.top_k,
            "intermediate_size": expert_width(cfg.d_model, cfg.ffn_mult, o),
            "router_aux_loss_coef": o.aux_loss_weight * cfg.n_layers / o.top_k}  # inverse of the import's scale


def _rope_parameters(cfg: ModelConfig) -> dict:
    o = cfg.positional_options
    p = {"rope_theta": o.get("base", 10000.0), "rope_type": "default"}
    kind = o.get("scaling", "none")
    if kind != "none":
        p.update(rope_type=kind, factor=o.get("factor", 1.0))
        orig = o.get("original_max_len") or cfg.max_len
        if kind in ("llama3", "yarn"):
            p["original_max_position_embeddings"] = orig
        if kind == "dynamic" and orig != cfg.max_len:
            raise CapabilityError("cannot export to Hugging Face: HF's dynamic RoPE grows past "
                                  f"max_position_embeddings, so original_max_len ({orig}) must equal max_len")
        if kind == "llama3":
            p.update(low_freq_factor=o.get("low_freq_factor", 1.0), high_freq_factor=o.get("high_freq_factor", 4.0))
        if kind == "yarn":
            p.update({k: o[k] for k in ("beta_fast", "beta_slow", "attention_factor", "truncate") if k in o})
    return p


def _half_layout(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """q/k projection rows reordered so HF's rotate-half layout pairs the dims efformer's interleaved one did."""
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    perm = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    out = dict(state)
    for i, (_, opts) in enumerate(cfg.layer_mixers()):
        kv = opts.get("n_kv_heads") or cfg.n_heads
        for name, rotated_heads in (("q_proj", cfg.n_heads), ("kv_proj", kv)):  # kv_proj: k heads first, then v
            for kind in ("weight", "bias"):
                key = f"backbone.blocks.{i}.mixer.{name}.{kind}"
                if key in state:
                    t = state[key].reshape(-1, hd, *state[key].shape[1:]).clone()
                    t[:rotated_heads] = t[:rotated_heads, perm]
                    out[key] = t.reshape(state[key].shape)
    return out


def to_hf(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model`` as a Hugging Face folder (config.json + model.safetensors) that transformers loads."""
    cfg = getattr(model, "cfg", None)
    if not isinstance(model, CausalLM) or not isinstance(cfg, ModelConfig):
        raise ConfigError("model", type(model).__name__, "an efformer CausalLM (HF export covers causal LMs)")
    model_type, hf_cfg = _export_plan(cfg)
    arch = ARCHS[model_type]
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if cfg.positional == "rope" and cfg.positional_options.get("layout", "interleaved") == "interleaved":
        state = _half_layout(state, cfg)
    tensors = {}
    for rule in _expand(arch.body + arch.heads["lm"], cfg):
        if all(e in state for e in rule.ef):
            outs = to_hf_tensors(rule.how, [state[e] for e in rule.ef], len(rule.hf))
            tensors.update({h.split("|")[0]: t.contiguous() for h, t in zip(rule.hf, outs, strict=True)})
    architecture = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "mixtral": "MixtralForCausalLM", "gpt2": "GPT2LMHeadModel"}[model_type]
    hf_cfg = {"architectures": [architecture], "model_type": model_type, **hf_cfg}
    return _write_folder_atomically(directory, hf_cfg, tensors)


def _write_folder_atomically(directory, hf_cfg: dict, tensors: dict[str, Tensor]) -> Path:
    out = _as_path(directory)
    if out.exists() and (not out.is_dir() or set(os.listdir(out)) - {CONFIG, SINGLE}):
        raise CheckpointError(f"cannot export to {out}: it is a file or holds files other than {CONFIG} and {SINGLE}; "
                              "export replaces the whole folder, so pick a new or empty one")

    def write(tmp: Path) -> None:
        (tmp / CONFIG).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True), encoding="utf-8")
        fsync_file(tmp / CONFIG)
        save_file(tensors, str(tmp / SINGLE), metadata={"format": "pt"})
        fsync_file(tmp / SINGLE)
        fsync_dir(tmp)

    return publish_folder(out, write, "export")


# ---- either kind of folder --------------------------------------------------------------------
def from_pretrained(path: str | os.PathLike, **kwargs) -> nn.Module:
    """A model from an efformer folder (``efformer.save``) or a Hugging Face folder, told apart by their files."""
    folder = hf_folder(path)
    if (folder / MANIFEST_FILE).exists():
        return load(folder)
    cfg = read_json(folder / CONFIG, "a model folder needs config.json (efformer.save and save_pretrained write it)")
    if "model_type" in cfg:
        return from_hf(folder, **kwargs)
    return load(folder)  # an efformer folder without a manifest (made by hand or by an older efformer)
