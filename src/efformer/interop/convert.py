"""Converting a trained model's attention to other mixers, keeping every projection they share; and the
training-free streaming conversion of "LightTransfer: Your Long-Context LLM is Secretly a Hybrid Model
with Effortless Adaptation" (lazy layers, whose attention sits on the first tokens and a recent window,
become sink + window attention with a bounded cache, as in "Efficient Streaming Language Models with
Attention Sinks").

Projections are carried by name and shape first (softmax -> sliding_window / longformer / local /
sparse / bigbird: the same modules, so every weight); otherwise through a canonical per-head form
(q, k, v of every head, o): grouped k/v heads are repeated to full heads when the target has no
grouping, and fused layouts (``kv_proj`` k|v, ``qkv_proj`` q|k|v, separate ``q/k/v_proj``) are
rebuilt. What the target has beyond them keeps its own initialisation (its paper's), and source
tensors with no place in the target (e.g. biases of a bias-free mixer) are dropped; ``convert``
reports all three per layer.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from efformer.errors import CapabilityError, ConfigError
from efformer.mixers.base import Mixer
from efformer.models.config import build_config
from efformer.registry import MIXERS


@dataclass
class Conversion:
    """What ``convert`` did to each converted layer: tensor names carried, initialised, dropped."""

    layers: list[int]
    carried: dict[int, list[str]] = field(default_factory=dict)
    initialised: dict[int, list[str]] = field(default_factory=dict)
    dropped: dict[int, list[str]] = field(default_factory=dict)


def convert(model: nn.Module, mixer: str, layers: list[int] | None = None, options: dict | None = None,
            ) -> tuple[nn.Module, Conversion]:
    """A copy of ``model`` whose ``layers`` (default: all) use ``mixer`` with ``options``, and the report."""
    cfg = getattr(model, "cfg", None)
    backbone = getattr(model, "backbone", None)
    if cfg is None or backbone is None:
        raise ConfigError("model", type(model).__name__, "an efformer model (create_model, load, from_hf)")
    cls = MIXERS.get(mixer)
    chosen = sorted(set(range(cfg.n_layers) if layers is None else layers))
    bad = [i for i in chosen if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < cfg.n_layers]
    if bad:
        raise ConfigError("layers", layers, f"layer indices in [0, {cfg.n_layers})")
    old = cfg.layer_mixers()
    names, opts = [], []
    for i, (name, o) in enumerate(old):
        if cfg.head_dim is not None:
            o = {k: v for k, v in o.items() if k != "head_dim"}  # the config adds it back to every layer
        if i in chosen:
            shared = {k: v for k, v in o.items() if k in cls.Options.model_fields and k != "form"}
            name, o = mixer, {**shared, **(options or {})}
        names.append(name)
        opts.append(o)
    new_cfg = build_config(cfg.model_dump(), mixer=names, mixer_options=opts)
    p = next(model.parameters())
    new = type(model)(new_cfg).to(device=p.device, dtype=p.dtype)
    report = Conversion(chosen)
    state = new.state_dict()
    src = model.state_dict()
    for key in state:
        if ".mixer." not in key or int(key.split(".")[2]) not in chosen:
            state[key] = src[key]
    for i in chosen:
        carried, dropped = transfer(backbone.blocks[i].mixer, new.backbone.blocks[i].mixer)
        prefix = f"backbone.blocks.{i}.mixer."
        for name, t in carried.items():
            state[prefix + name] = t
        report.carried[i] = sorted(carried)
        report.initialised[i] = sorted(n for n in new.backbone.blocks[i].mixer.state_dict() if n not in carried)
        report.dropped[i] = dropped
    new.load_state_dict(state)
    return new.train(model.training), report


def _canonical(m: Mixer) -> dict[str, Tensor]:
    """q, k, v (heads * d_head, d_model) for every head, o (d_model, heads * d_head), and their biases."""
    sd = {k: v.detach() for k, v in m.state_dict().items()}
    out: dict[str, Tensor] = {}
    for kind in ("weight", "bias"):
        if f"qkv_proj.{kind}" in sd:
            out[f"q.{kind}"], out[f"k.{kind}"], out[f"v.{kind}"] = sd[f"qkv_proj.{kind}"].chunk(3, 0)
        elif f"kv_proj.{kind}" in sd and f"q_proj.{kind}" in sd:
            out[f"q.{kind}"] = sd[f"q_proj.{kind}"]
            out[f"k.{kind}"], out[f"v.{kind}"] = sd[f"kv_proj.{kind}"].chunk(2, 0)
        elif all(f"{x}_proj.{kind}" in sd for x in "qkv"):
            for x in "qkv":
                out[f"{x}.{kind}"] = sd[f"{x}_proj.{kind}"]
        if f"out_proj.{kind}" in sd:
            out[f"o.{kind}"] = sd[f"out_proj.{kind}"]
    if "q.weight" in out:
        rows = out["q.weight"].shape[0]
        for x in "kv":
            for kind in ("weight", "bias"):
                t = out.get(f"{x}.{kind}")
                if t is not None and t.shape[0] < rows:  # grouped heads: repeat each to its queries' heads
                    d_head = rows // m.n_heads
                    out[f"{x}.{kind}"] = t.reshape(-1, d_head, *t.shape[1:]).repeat_interleave(
                        rows // t.shape[0], 0).reshape(rows, *t.shape[1:])
    return out


_LAYOUTS = {"qkv_proj": "qkv", "kv_proj": "kv", "q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "o"}


def transfer(src: Mixer, dst: Mixer) -> tuple[dict[str, Tensor], list[str]]:
    """Tensors of ``dst`` (by its names) that ``src`` provides, and ``src``'s tensor names left unused."""
    s, d = src.state_dict(), dst.state_dict()
    carried = {k: v.detach().clone() for k, v in s.items() if k in d and d[k].shape == v.shape}
    canon = _canonical(src)
    for key in d:
        module, _, kind = key.rpartition(".")
        parts = _LAYOUTS.get(module, "")
        if key not in carried and parts and all(f"{x}.{kind}" in canon for x in parts):
            t = torch.cat([canon[f"{x}.{kind}"] for x in parts], 0)
            if t.shape == d[key].shape:
                carried[key] = t.clone()
    got = {(x, key.rpartition(".")[2]) for key in carried for x in _LAYOUTS.get(key.rpartition(".")[0], "")}

    def used(key: str) -> bool:
        module, _, kind = key.rpartition(".")
        parts = _LAYOUTS.get(module, "")
        return key in carried or bool(parts) and all((x, kind) in got for x in parts)

    return carried, sorted(k for k in s if not used(k))


# ---- LightTransfer: which layers are lazy -----------------------------------------------------------
@torch.no_grad()
def attention_mass(model: nn.Module, ids: Tensor, sink: int = 4, window: int = 64) -> list[float]:
    """Per layer, the attention probability on the first ``sink`` keys plus the last ``window`` keys
    (the query included), averaged over heads and over queries that have keys outside both (1.0 if none).

    ``ids`` (b, n) is sample text; every layer must be exact softmax attention (it measures its scores).
    """
    inputs: dict[int, tuple] = {}
    hooks = []
    for i, blk in enumerate(model.backbone.blocks):
        if not hasattr(blk.mixer, "_qkv"):
            raise CapabilityError(f"layer {i} uses mixer {blk.mixer.name!r}; attention_mass measures softmax "
                                  "attention scores, so measure before converting")
        hooks.append(blk.mixer.register_forward_hook(
            lambda mod, args, kwargs, out, i=i: inputs.__setitem__(i, (args[0], kwargs["positions"])),
            with_kwargs=True))
    try:
        model.eval()(ids)
    finally:
        for h in hooks:
            h.remove()
    n = ids.shape[1]
    i_idx, j_idx = torch.arange(n)[:, None], torch.arange(n)[None, :]
    near = (j_idx < sink) | ((i_idx - j_idx) < window)
    far_rows = (i_idx[:, 0] >= sink + window)  # queries that have a key outside sink + window
    masses = []
    for i, blk in enumerate(model.backbone.blocks):
        m = blk.mixer
        x, pos = inputs[i]
        q, k, _ = m._qkv(x, pos)
        k = k.repeat_interleave(m.n_heads // k.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(m.head_dim)
        scores = scores.masked_fill(j_idx > i_idx, float("-inf"))
        p = scores.softmax(-1)
        mass = (p * near).sum(-1)[..., far_rows]  # (b, h, far queries)
        masses.append(float(mass.mean()) if mass.numel() else 1.0)
    return masses


def stream_convert(model: nn.Module, ids: Tensor, fraction: float = 0.5, sink: int = 4, window: int = 64,
                   ) -> tuple[nn.Module, Conversion, list[float]]:
    """Turn the ``fraction`` of layers with the most attention mass on sink + window into sink + window
    attention (longformer with ``sink`` global tokens, causal), without training; also the masses."""
    if not 0 <= fraction <= 1:
        raise ConfigError("fraction", fraction, "a share of the layers in [0, 1]")
    masses = attention_mass(model, ids, sink, window)
    k = round(fraction * len(masses))
    lazy = sorted(sorted(range(len(masses)), key=lambda i: -masses[i])[:k])
    new, report = convert(copy.deepcopy(model), "longformer", lazy, {"window": window, "global_tokens": sink})
    return new, report, masses
