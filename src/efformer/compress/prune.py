"""Structured pruning surgery: remove attention heads, FFN neurons or whole blocks for real.

The result is a new model whose weight matrices are smaller and whose config says so
(``layer_heads``, ``layer_ffn_hidden``, per-layer ``n_kv_heads``, fewer ``n_layers``); it is built
from that config exactly as ``efformer.load`` builds it, then given the kept rows and columns of the
input model's weights, so it saves, loads and generates like any efformer model. The input model is
never modified.

Units (see "Are Sixteen Heads Really Better than One?", Michel et al., 2019, for heads; "LLM-Pruner",
Ma et al., 2023, for coupled structures):

* ``heads``: a unit is one key/value group, i.e. one KV head together with the query heads that
  share it. Removing a whole group keeps grouped-query attention uniform (every KV head still serves
  the same number of query heads, so ``n_kv_heads`` divides the layer's heads) and shrinks the KV
  cache too, which is what decoding pays for; with plain multi-head attention a group is one head.
  Removing part of a group is refused (``GQAError``): it would leave groups of unequal sizes.
* ``neurons``: hidden unit j of the FFN: row j of ``up`` (GLU: rows j of both gate and up, which are
  one fused ``gate_up`` matrix) and column j of ``down``.
* ``blocks``: a whole layer (depth pruning, "ShortGPT: Layers in Large Language Models are More
  Redundant Than You Expect", Men et al., 2024).

Every unit is described by *owner maps*: for each weight it touches, the dimension and, for each
index along it, the unit that owns it. The scores in ``importance.py`` reduce per-element quantities
through the same maps, so what is scored is exactly what is cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from efformer.errors import CapabilityError, ConfigError
from efformer.mixers.softmax import SoftmaxAttention
from efformer.models.config import ModelConfig, build_config
from efformer.nn.ffn import GLU, MLP

KINDS = ("heads", "neurons", "blocks")
# The parameters a head-prunable attention may hold: anything else would be left unsliced.
_ATTN_PARAMS = {"q_proj", "kv_proj", "out_proj", "q_norm", "k_norm", "gate"}


class GQAError(ConfigError):
    """A head selection that would break grouped-query attention (part of a KV group)."""


@dataclass
class PrunePlan:
    """What to remove, in the input model's layer numbering: query heads and FFN neurons per layer, blocks."""

    heads: dict[int, list[int]] = field(default_factory=dict)  # layer -> query-head indices (whole KV groups)
    neurons: dict[int, list[int]] = field(default_factory=dict)  # layer -> FFN hidden indices
    blocks: list[int] = field(default_factory=list)  # layers removed entirely

    @property
    def empty(self) -> bool:
        """Whether the plan removes nothing."""
        return not (any(self.heads.values()) or any(self.neurons.values()) or self.blocks)


# ---- what can be pruned --------------------------------------------------------------------------
def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The model's blocks; refuses models pruning cannot act on (image models, quantized models)."""
    cfg = getattr(model, "cfg", None)
    backbone = getattr(model, "backbone", None)
    if not isinstance(cfg, ModelConfig) or backbone is None:
        raise CapabilityError(f"pruning takes an efformer text model (lm, classifier or dual: efformer.create_model, "
                              f"efformer.load or efformer.interop.from_hf), got {type(model).__name__}")
    if getattr(model, "quantization", None):
        raise CapabilityError("the model is quantized; prune the float model first, then quantize the pruned one")
    return backbone.blocks


def check_kind(model: nn.Module, kind: str) -> None:
    """A CapabilityError unless every layer of ``model`` has ``kind`` units this module can remove."""
    if kind not in KINDS:
        raise ConfigError("what", kind, f"one of {', '.join(KINDS)}")
    cfg, blocks = model.cfg, blocks_of(model)
    if kind == "heads":
        for i, blk in enumerate(blocks):
            m = blk.mixer
            extra = {n.split(".")[0] for n, _ in m.named_parameters()} - _ATTN_PARAMS
            if not isinstance(m, SoftmaxAttention) or extra:
                raise CapabilityError(f"layer {i}: mixer {m.name!r} has no head pruning here (only exact softmax "
                                      "attention and its variants without extra parameters); prune neurons or blocks")
        if model.backbone.pos.kind == "bias":
            raise CapabilityError(f"positional {cfg.positional!r} adds one score bias per head, shared by all layers, "
                                  "so heads cannot be removed per layer; prune neurons or blocks")
    elif kind == "neurons":
        bad = [i for i, b in enumerate(blocks) if not isinstance(b.ffn, MLP | GLU)]
        if bad:
            raise CapabilityError(f"layer {bad[0]}: ffn {cfg.ffn!r} has no neuron pruning (only the MLP and GLU "
                                  "feed-forward blocks); prune heads or blocks")
    else:
        if cfg.exit_layers:
            raise CapabilityError("depth pruning renumbers layers, so it cannot keep early-exit heads "
                                  f"(exit_layers={cfg.exit_layers}); prune heads or neurons")
        if cfg.norm_placement == "deepnorm":
            raise CapabilityError("DeepNorm's residual scale depends on n_layers, so removing a block changes "
                                  "every other block; prune heads or neurons")


def n_units(block: nn.Module, kind: str) -> int:
    """Units of ``kind`` in one block: KV groups, FFN hidden neurons, or 1 (the block)."""
    if kind == "heads":
        return block.mixer.n_kv_heads
    if kind == "neurons":
        return block.ffn.down.in_features
    return 1


def owners(block: nn.Module, kind: str) -> dict[str, tuple[int, Tensor]]:
    """For each weight of ``block`` a ``kind`` unit touches (name relative to the block): the dimension and,
    for each index along it, the unit owning it (LongTensor)."""
    if kind == "heads":
        m = block.mixer
        hd, kv, g = m.head_dim, m.n_kv_heads, m.n_heads // m.n_kv_heads
        q_rows = torch.arange(m.n_heads * hd) // hd // g
        kv_rows = (torch.arange(2 * kv * hd) % (kv * hd)) // hd
        maps = {"q_proj": (0, q_rows), "kv_proj": (0, kv_rows), "out_proj": (1, q_rows)}
        if hasattr(m, "gate"):
            maps["gate"] = (0, torch.arange(m.n_heads) // g)
        out = {}
        for mod, (dim, own) in maps.items():
            lin = getattr(m, mod)
            out[f"mixer.{mod}.weight"] = (dim, own)
            if lin.bias is not None and dim == 0:
                out[f"mixer.{mod}.bias"] = (0, own)
        return out
    if kind == "neurons":
        f = block.ffn
        h = f.down.in_features
        first = "gate_up" if isinstance(f, GLU) else "up"
        rows = torch.arange(2 * h) % h if isinstance(f, GLU) else torch.arange(h)
        out = {f"ffn.{first}.weight": (0, rows), "ffn.down.weight": (1, torch.arange(h))}
        if getattr(f, first).bias is not None:
            out[f"ffn.{first}.bias"] = (0, rows)
        return out
    raise ConfigError("what", kind, "'heads' or 'neurons' (blocks have no owner maps: a block is one unit)")


def output_projection(block: nn.Module, kind: str) -> nn.Linear:
    """The linear whose input columns carry the ``kind`` units' outputs (attention out_proj, FFN down)."""
    return block.mixer.out_proj if kind == "heads" else block.ffn.down


def _prefix(block_index: int, block: nn.Module) -> str:
    """State-dict prefix of the block's Block (MoD blocks wrap it as ``.block``)."""
    inner = ".block" if hasattr(block, "block") else ""
    return f"backbone.blocks.{block_index}{inner}."


# ---- plans -----------------------------------------------------------------------------------------
def _check_indices(what: str, per_layer: dict, n_layers: int, size_of) -> dict[int, list[int]]:
    out = {}
    for layer, idx in per_layer.items():
        if not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise ConfigError(f"plan.{what}", layer, f"a layer index in [0, {n_layers - 1}]")
        idx = sorted(set(int(i) for i in idx))
        size = size_of(layer)
        if idx and not 0 <= idx[0] <= idx[-1] < size:
            raise ConfigError(f"plan.{what}[{layer}]", idx, f"indices in [0, {size - 1}] (the layer has {size})")
        if len(idx) >= size:
            raise ConfigError(f"plan.{what}[{layer}]", f"all {size}", "keep at least one in every layer (remove "
                              "the whole layer with plan.blocks instead)")
        if idx:
            out[layer] = idx
    return out


def head_groups(block: nn.Module, layer: int, heads: list[int]) -> list[int]:
    """The KV groups that query heads ``heads`` make up; a GQAError unless they are whole groups."""
    m = block.mixer
    g = m.n_heads // m.n_kv_heads
    groups = sorted({h // g for h in heads})
    whole = sorted(h for k in groups for h in range(k * g, (k + 1) * g))
    if whole != sorted(heads):
        raise GQAError(f"plan.heads[{layer}]", sorted(heads), f"whole key/value groups: layer {layer} has "
                       f"{m.n_kv_heads} KV heads each shared by {g} query heads, so remove heads in sets "
                       f"{{{g}k, ..., {g}k+{g - 1}}} (e.g. {list(range(g))}); a partial group would break GQA")
    return groups


def check_plan(model: nn.Module, plan: PrunePlan) -> tuple[dict[int, list[int]], dict[int, list[int]], list[int]]:
    """(KV groups removed per layer, neurons removed per layer, blocks removed), or an EfformerError."""
    if not isinstance(plan, PrunePlan):
        raise ConfigError("plan", type(plan).__name__, "a PrunePlan(heads=..., neurons=..., blocks=...)")
    blocks = blocks_of(model)
    n = len(blocks)
    heads = _check_indices("heads", plan.heads, n, lambda i: blocks[i].mixer.n_heads) if plan.heads else {}
    if heads:
        check_kind(model, "heads")
    groups = {i: head_groups(blocks[i], i, h) for i, h in heads.items()}
    neurons = _check_indices("neurons", plan.neurons, n, lambda i: n_units(blocks[i], "neurons")) \
        if plan.neurons else {}
    if neurons:
        check_kind(model, "neurons")
    removed = sorted(set(plan.blocks))
    if removed:
        check_kind(model, "blocks")
        if not 0 <= removed[0] <= removed[-1] < n:
            raise ConfigError("plan.blocks", removed, f"layer indices in [0, {n - 1}]")
        if len(removed) >= n:
            raise ConfigError("plan.blocks", removed, f"keep at least one of the {n} blocks")
    return groups, neurons, removed


def _raw_options(cfg: ModelConfig) -> list[tuple[str, dict]]:
    """(mixer, options) per layer as the config states them (without the head_dim it adds to each)."""
    out = []
    for name, opts in cfg.layer_mixers():
        opts = dict(opts)
        if cfg.head_dim is not None:
            opts.pop("head_dim", None)
        out.append((name, opts))
    return out


def pruned_config(model: nn.Module, plan: PrunePlan) -> ModelConfig:
    """The config of ``model`` after ``plan`` (checked): per-layer heads, KV heads, widths, fewer layers."""
    groups, neurons, removed = check_plan(model, plan)
    cfg, blocks = model.cfg, blocks_of(model)
    if plan.empty:
        return cfg
    data = cfg.model_dump()
    keep = [i for i in range(len(blocks)) if i not in removed]
    if groups or cfg.layer_heads is not None:
        hd = {b.mixer.head_dim for b in blocks}
        if len(hd) != 1:
            raise CapabilityError(f"the layers' heads have different widths {sorted(hd)}; head pruning needs one")
        heads = [b.mixer.n_heads // b.mixer.n_kv_heads * (b.mixer.n_kv_heads - len(groups.get(i, [])))
                 for i, b in enumerate(blocks)]
        layers = _raw_options(cfg)
        options = [dict(o) for _, o in layers]
        for i, b in enumerate(blocks):
            if "n_kv_heads" in options[i] and options[i]["n_kv_heads"] is not None or groups.get(i):
                options[i]["n_kv_heads"] = b.mixer.n_kv_heads - len(groups.get(i, []))
        data.update(layer_heads=heads, head_dim=hd.pop(), mixer=[n for n, _ in layers], mixer_options=options)
    if neurons or cfg.layer_ffn_hidden is not None:
        data["layer_ffn_hidden"] = [n_units(b, "neurons") - len(neurons.get(i, [])) for i, b in enumerate(blocks)]
    if removed:
        data["n_layers"] = len(keep)
        for key in ("layer_heads", "layer_ffn_hidden"):
            if data.get(key) is not None:
                data[key] = [data[key][i] for i in keep]
        if isinstance(data["mixer"], list):
            data["mixer"] = [data["mixer"][i] for i in keep]
        if isinstance(data["mixer_options"], list):
            data["mixer_options"] = [data["mixer_options"][i] for i in keep]
        if isinstance(data["mod_capacity"], list):
            data["mod_capacity"] = [data["mod_capacity"][i] for i in keep]
    return build_config(data)


def kept_index(own: Tensor, removed_units: list[int]) -> Tensor:
    """Indices along a dimension whose owner unit is not removed (in order)."""
    if not removed_units:
        return torch.arange(own.numel())
    return (~torch.isin(own, torch.tensor(removed_units, dtype=own.dtype))).nonzero().flatten()


@torch.no_grad()
def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """A new, smaller model: ``model`` without the plan's heads, neurons and blocks (``model`` is untouched)."""
    cfg = pruned_config(model, plan)
    groups, neurons, removed = check_plan(model, plan)
    blocks = blocks_of(model)
    select: dict[str, list[tuple[int, Tensor]]] = {}  # old state-dict name -> (dim, kept indices)
    for i, blk in enumerate(blocks):
        for kind, cut in (("heads", groups.get(i)), ("neurons", neurons.get(i))):
            if cut:
                for name, (dim, own) in owners(blk, kind).items():
                    select.setdefault(_prefix(i, blk) + name, []).append((dim, kept_index(own, cut)))
    keep = [i for i in range(len(blocks)) if i not in removed]
    renumber = {f"backbone.blocks.{j}.": f"backbone.blocks.{i}." for j, i in enumerate(keep)}
    p = next(model.parameters())
    new = type(model)(cfg).to(device=p.device, dtype=p.dtype)
    old_sd, new_sd = model.state_dict(), new.state_dict()
    out = {}
    for name, want in new_sd.items():
        src = name
        if name.startswith("backbone.blocks."):
            j = name.split(".")[2]
            src = renumber[f"backbone.blocks.{j}."] + name[len(f"backbone.blocks.{j}."):]
        t = old_sd[src]
        for dim, idx in select.get(src, []):
            t = t.index_select(dim, idx.to(t.device))
        if t.shape != want.shape:  # a bug here, not a user error: the config and the slicing disagree
            raise RuntimeError(f"pruning {src}: sliced to {tuple(t.shape)} but the pruned config needs "
                               f"{tuple(want.shape)}")
        out[name] = t
    new.load_state_dict(out)
    return new.train(model.training)


# ---- measures ------------------------------------------------------------------------------------
def count_params(model: nn.Module) -> int:
    """Distinct parameters (tied weights once)."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: nn.Module, context: int = 256) -> float:
    """Forward FLOPs per token: 2 x every linear's weights (and the tied LM head), plus softmax attention's
    4 x heads x head_dim x ``context`` for scores and values (other mixers: their linears only)."""
    total = 0.0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += 2 * m.in_features * m.out_features
        if isinstance(m, SoftmaxAttention):
            total += 4 * m.n_heads * m.head_dim * context
    cfg = model.cfg
    if cfg.task == "lm" and cfg.tie_embeddings:
        total += 2 * cfg.vocab_size * cfg.d_model
    return total


def meta_model(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """``type(model)(cfg)`` on the meta device: shapes only, for measuring a candidate plan for free."""
    with torch.device("meta"):
        return type(model)(cfg)
