"""Dense-to-MoE conversion (FFN neurons -> experts; also -> ACM learners, and attention heads -> attention
MoE) after "LLaMA-MoE: Building Mixture-of-Experts from LLaMA with Continual
Pre-training" and "LLaMA-MoE v2": a trained GLU FFN's hidden neurons are split into groups,
each group becoming one expert (its rows of the gate/up projection and columns of the down one).
Groups differ in size by at most one neuron; a shorter group's spare slot is a zero neuron.

Splits: ``random`` (a seeded permutation), ``cluster`` (balanced k-means on each neuron's gate-weight
row, so experts hold neurons that read similar directions) and ``coactivation`` (a balanced greedy
partition of the graph whose edge weights count calibration tokens on which two neurons' gates are
both open; the papers partition that graph with METIS, this greedy grower is the dependency-free
stand-in). The router starts at zero (uniform gates 1 / n_experts) and the routed sum is scaled by
n_experts, so every active expert has weight one: with top_k = n_experts the converted model computes
the dense one (up to float summation order); with fewer, each token gets the dense FFN restricted to
its chosen experts' neurons, a starting point for continued training.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from efformer.errors import ConfigError
from efformer.models.config import build_config
from efformer.nn.ffn import GLU
from efformer.nn.moe import MoE

Split = Literal["random", "cluster", "coactivation"]
_GLU_ACT = {"silu": "silu", "gelu": "gelu", "relu": "relu"}


def split_neurons(ffn: GLU, n_experts: int, method: Split = "random", *, gate_inputs: Tensor | None = None,
                  seed: int = 0) -> Tensor:
    """Neuron indices of each expert (n_experts, ceil(hidden / n_experts)); every neuron appears once, and
    -1 marks an empty slot (a zero neuron) when n_experts does not divide the hidden width.

    ``gate_inputs`` (tokens, d): the FFN's calibration inputs, needed by ``coactivation``."""
    hidden = ffn.down.in_features
    if not 1 <= n_experts <= hidden:
        raise ConfigError("n_experts", n_experts, f"between 1 and the FFN's hidden width {hidden}")
    sizes = [hidden // n_experts + (e < hidden % n_experts) for e in range(n_experts)]  # differ by at most 1
    gen = torch.Generator().manual_seed(seed)
    gate_w = ffn.gate_up.weight.detach()[:hidden].float().cpu()  # (h, d): one row per neuron
    if method == "random":
        perm = torch.randperm(hidden, generator=gen).tolist()
        starts = [sum(sizes[:e]) for e in range(n_experts)]
        return _padded([perm[s : s + n] for s, n in zip(starts, sizes, strict=True)])
    if method == "cluster":
        return _balanced_kmeans(gate_w, sizes, gen)
    if method == "coactivation":
        if gate_inputs is None:
            raise ConfigError("calibration_ids", None, "token ids (batch, seq) to measure co-activation on")
        opened = (gate_inputs.detach().float().cpu() @ gate_w.t() > 0).float()  # (tokens, h): gate open
        return _balanced_graph_partition(opened.t() @ opened, sizes)
    raise ConfigError("method", method, "one of random, cluster, coactivation")


def _padded(groups: list[list[int]]) -> Tensor:
    width = max(len(g) for g in groups)
    return torch.tensor([sorted(g) + [-1] * (width - len(g)) for g in groups])


def _balanced_kmeans(points: Tensor, sizes: list[int], gen: torch.Generator, iters: int = 25) -> Tensor:
    """(n, d) -> groups of the given sizes: k-means whose assignment step fills cluster e to sizes[e]."""
    k = len(sizes)
    centers = points[torch.randperm(points.shape[0], generator=gen)[:k]].clone()
    for _ in range(iters):
        members = _fill_balanced(torch.cdist(points, centers), sizes)
        new = torch.stack([points[m].mean(0) for m in members])
        if torch.allclose(new, centers):
            break
        centers = new
    return _padded(members)


def _fill_balanced(dist: Tensor, sizes: list[int]) -> list[list[int]]:
    """Greedy balanced assignment: (point, cluster) pairs by increasing distance, cluster c up to sizes[c]."""
    k = dist.shape[1]
    taken = torch.zeros(dist.shape[0], dtype=torch.bool)
    members: list[list[int]] = [[] for _ in range(k)]
    for flat in dist.flatten().argsort(stable=True).tolist():
        p, c = divmod(flat, k)
        if not taken[p] and len(members[c]) < sizes[c]:
            taken[p] = True
            members[c].append(p)
    return members


def _balanced_graph_partition(weights: Tensor, sizes: list[int]) -> Tensor:
    """(n, n) co-activation counts -> groups of the given sizes: each grows from the most connected free
    neuron by adding the free neuron most connected to the group so far."""
    w = weights.clone().fill_diagonal_(0)
    free = torch.ones(w.shape[0], dtype=torch.bool)
    groups = []
    for size in sizes:
        seed = int(torch.where(free, w.sum(1), -torch.inf).argmax())
        group, link = [seed], w[seed].clone()
        free[seed] = False
        while len(group) < size:
            nxt = int(torch.where(free, link, -torch.inf).argmax())
            group.append(nxt)
            free[nxt] = False
            link += w[nxt]
        groups.append(group)
    return _padded(groups)


@torch.no_grad()
def load_experts(moe: MoE, ffn: GLU, groups: Tensor) -> None:
    """Copy the dense FFN's neurons into the experts: expert e gets neurons ``groups[e]`` (-1: a zero
    neuron, whose GLU output act(0) * 0 is exactly 0); router zeroed."""
    hidden = ffn.down.in_features
    gate_w, up_w = ffn.gate_up.weight[:hidden], ffn.gate_up.weight[hidden:]
    moe.w_in.zero_()
    moe.w_out.zero_()
    h = moe.w_out.shape[1]
    for e, row in enumerate(groups.tolist()):
        idx = [i for i in row if i >= 0]
        moe.w_in[e, :, : len(idx)] = gate_w[idx].t()
        moe.w_in[e, :, h : h + len(idx)] = up_w[idx].t()
        moe.w_out[e, : len(idx)] = ffn.down.weight[:, idx].t()
    moe.router.weight.zero_()


def convert_to_moe(model: nn.Module, n_experts: int, top_k: int | None = None, method: Split = "random", *,
                   calibration_ids: Tensor | None = None, seed: int = 0, **moe_options) -> nn.Module:
    """A new model whose GLU FFNs are MoE FFNs made from their neurons (``top_k`` default: all experts).

    ``calibration_ids`` (b, n): token ids whose FFN inputs drive the ``coactivation`` split."""
    cfg = model.cfg
    blocks = model.backbone.blocks
    if not all(isinstance(b.ffn, GLU) for b in blocks):
        raise ConfigError("ffn", cfg.ffn, "a GLU FFN (swiglu, geglu, reglu) to convert; its neurons become experts")
    top_k = n_experts if top_k is None else top_k
    hidden = blocks[0].ffn.down.in_features
    if not 1 <= n_experts <= hidden:
        raise ConfigError("n_experts", n_experts, f"between 1 and the FFN's hidden width {hidden}")
    options = {"n_experts": n_experts, "top_k": top_k, "expert_hidden": -(-hidden // n_experts),
               "activation": _GLU_ACT[blocks[0].ffn.activation], "expert_scale": float(n_experts), **moe_options}
    new_cfg = build_config(cfg, ffn="moe", ffn_options=options)
    inputs: list[Tensor | None] = [None] * len(blocks)
    if method == "coactivation":
        if calibration_ids is None:
            raise ConfigError("calibration_ids", None, "token ids (batch, seq) to measure co-activation on")
        inputs = _ffn_inputs(model, calibration_ids)
    new = _with_new_ffns(model, new_cfg)
    for i, (old_b, new_b) in enumerate(zip(blocks, new.backbone.blocks, strict=True)):
        groups = split_neurons(old_b.ffn, n_experts, method, gate_inputs=inputs[i], seed=seed + i)
        load_experts(new_b.ffn, old_b.ffn, groups)
    return new.train(model.training)


def _ffn_inputs(model: nn.Module, ids: Tensor) -> list[Tensor]:
    """Each layer's FFN inputs (tokens, d) on the calibration ids (b, n), from one eval forward."""
    blocks = model.backbone.blocks
    inputs: list[Tensor] = [torch.empty(0)] * len(blocks)

    def keep_input(i):
        return lambda module, args: inputs.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]))

    hooks = [b.ffn.register_forward_pre_hook(keep_input(i)) for i, b in enumerate(blocks)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return inputs


def _with_new_ffns(model: nn.Module, cfg) -> nn.Module:
    """A model of ``cfg`` holding ``model``'s weights everywhere but in the FFNs (left to the caller)."""
    new = type(model)(cfg).to(next(model.parameters()).device)
    state = {k: v for k, v in model.state_dict().items() if ".ffn." not in k}
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected and all(".ffn." in k for k in missing), (missing, unexpected)
    return new


@torch.no_grad()
def convert_to_acm(model: nn.Module, n_learners: int, *, calibration_ids: Tensor | None = None,
                   **acm_options) -> nn.Module:
    """A new model whose GLU FFNs are Adaptive Computation Modules of their neurons (``efformer.nn.acm``):
    all learners together compute the dense FFN. With ``calibration_ids`` (b, n) the neurons are ordered
    by importance (mean |act(gate) * up| on those tokens times the norm of the neuron's down column), so
    the first learners carry most of the output; otherwise they keep their order."""
    cfg = model.cfg
    blocks = model.backbone.blocks
    if not all(isinstance(b.ffn, GLU) for b in blocks):
        raise ConfigError("ffn", cfg.ffn, "a GLU FFN (swiglu, geglu, reglu) to convert; its neurons become learners")
    hidden = blocks[0].ffn.down.in_features
    if not 1 <= n_learners <= hidden:
        raise ConfigError("n_learners", n_learners, f"between 1 and the FFN's hidden width {hidden}")
    options = {"n_learners": n_learners, "activation": _GLU_ACT[blocks[0].ffn.activation], **acm_options}
    new = _with_new_ffns(model, build_config(cfg, ffn="acm", ffn_options=options))
    inputs = _ffn_inputs(model, calibration_ids) if calibration_ids is not None else None
    for i, (old_b, new_b) in enumerate(zip(blocks, new.backbone.blocks, strict=True)):
        ffn, acm = old_b.ffn, new_b.ffn
        gate_w, up_w, down_w = ffn.gate_up.weight[:hidden], ffn.gate_up.weight[hidden:], ffn.down.weight.t()
        order = torch.arange(hidden)
        if inputs is not None:
            x = inputs[i]
            a = (ffn.act(x @ gate_w.t()) * (x @ up_w.t())).abs().mean(0)
            order = (a * down_w.norm(dim=1)).argsort(descending=True, stable=True).cpu()
        acm.w_gate.copy_(gate_w[order])
        acm.w_up.copy_(up_w[order])
        acm.w_down.copy_(down_w[order])
    return new.train(model.training)


@torch.no_grad()
def convert_attention_to_moe(model: nn.Module, n_experts: int, top_k: int | None = None, **options) -> nn.Module:
    """A new model whose softmax attention layers are LLaMA-MoE v2 attention MoE (``attention_moe``) with the
    same weights: query-head groups become experts, the router starts at zero and gates are scaled by
    n_experts, so with ``top_k`` = n_experts (the default) it computes the original attention."""
    cfg = model.cfg
    mixers = cfg.layer_mixers()
    if any(name != "softmax" for name, _ in mixers):
        raise ConfigError("mixer", cfg.mixer, "softmax attention in every layer (its query heads become experts)")
    top_k = n_experts if top_k is None else top_k
    head_dim = {} if cfg.head_dim is None else {"head_dim": cfg.head_dim}  # layer_mixers adds it; the config too
    per_layer = [{**{k: v for k, v in opts.items() if k not in head_dim}, "n_experts": n_experts, "top_k": top_k,
                  "expert_scale": float(n_experts), **options} for _, opts in mixers]
    new_cfg = build_config(cfg, mixer=["attention_moe"] * cfg.n_layers, mixer_options=per_layer)
    new = type(model)(new_cfg).to(next(model.parameters()).device)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("mixer.router.weight") for k in missing), (missing, unexpected)
    for block in new.backbone.blocks:
        block.mixer.router.weight.zero_()
    return new.train(model.training)
