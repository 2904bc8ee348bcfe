"""Dense-to-MoE conversion after "LLaMA-MoE: Building Mixture-of-Experts from LLaMA with Continual
Pre-training" and "LLaMA-MoE v2": a trained GLU FFN's hidden neurons are split into equal groups,
each group becoming one expert (its rows of the gate/up projection and columns of the down one).

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
    """Neuron indices of each expert (n_experts, hidden / n_experts); every neuron appears once.

    ``gate_inputs`` (tokens, d): the FFN's calibration inputs, needed by ``coactivation``."""
    hidden = ffn.down.in_features
    if hidden % n_experts:
        raise ConfigError("n_experts", n_experts, f"must divide the FFN's hidden width {hidden}")
    size = hidden // n_experts
    gen = torch.Generator().manual_seed(seed)
    gate_w = ffn.gate_up.weight.detach()[:hidden].float().cpu()  # (h, d): one row per neuron
    if method == "random":
        return torch.randperm(hidden, generator=gen).reshape(n_experts, size)
    if method == "cluster":
        return _balanced_kmeans(gate_w, n_experts, gen)
    if method == "coactivation":
        if gate_inputs is None:
            raise ConfigError("calibration_ids", None, "token ids (batch, seq) to measure co-activation on")
        opened = (gate_inputs.detach().float().cpu() @ gate_w.t() > 0).float()  # (tokens, h): gate open
        return _balanced_graph_partition(opened.t() @ opened, n_experts)
    raise ConfigError("method", method, "one of random, cluster, coactivation")


def _balanced_kmeans(points: Tensor, k: int, gen: torch.Generator, iters: int = 25) -> Tensor:
    """(n, d) -> (k, n / k) indices: k-means whose assignment step fills clusters to n / k each."""
    n, size = points.shape[0], points.shape[0] // k
    centers = points[torch.randperm(n, generator=gen)[:k]].clone()
    groups = torch.zeros(k, size, dtype=torch.long)
    for _ in range(iters):
        groups = _fill_balanced(torch.cdist(points, centers), size)
        new = points[groups].mean(1)
        if torch.allclose(new, centers):
            break
        centers = new
    return groups.sort(dim=1).values


def _fill_balanced(dist: Tensor, size: int) -> Tensor:
    """Greedy balanced assignment: (point, cluster) pairs by increasing distance, each cluster to ``size``."""
    n, k = dist.shape
    taken = torch.zeros(n, dtype=torch.bool)
    members: list[list[int]] = [[] for _ in range(k)]
    for flat in dist.flatten().argsort(stable=True).tolist():
        p, c = divmod(flat, k)
        if not taken[p] and len(members[c]) < size:
            taken[p] = True
            members[c].append(p)
    return torch.tensor(members)


def _balanced_graph_partition(weights: Tensor, k: int) -> Tensor:
    """(n, n) co-activation counts -> (k, n / k) groups: each grows from the most connected free neuron
    by adding the free neuron most connected to the group so far."""
    n = weights.shape[0]
    size = n // k
    w = weights.clone().fill_diagonal_(0)
    free = torch.ones(n, dtype=torch.bool)
    groups = []
    for _ in range(k):
        seed = int(torch.where(free, w.sum(1), -torch.inf).argmax())
        group, link = [seed], w[seed].clone()
        free[seed] = False
        while len(group) < size:
            nxt = int(torch.where(free, link, -torch.inf).argmax())
            group.append(nxt)
            free[nxt] = False
            link += w[nxt]
        groups.append(sorted(group))
    return torch.tensor(groups)


@torch.no_grad()
def load_experts(moe: MoE, ffn: GLU, groups: Tensor) -> None:
    """Copy the dense FFN's neurons into the experts: expert e gets neurons ``groups[e]``; router zeroed."""
    hidden = ffn.down.in_features
    gate_w, up_w = ffn.gate_up.weight[:hidden], ffn.gate_up.weight[hidden:]
    for e, idx in enumerate(groups.tolist()):
        moe.w_in[e] = torch.cat([gate_w[idx], up_w[idx]]).t()
        moe.w_out[e] = ffn.down.weight[:, idx].t()
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
    if hidden % n_experts:
        raise ConfigError("n_experts", n_experts, f"must divide the FFN hidden width {hidden}")
    options = {"n_experts": n_experts, "top_k": top_k, "expert_hidden": hidden // n_experts,
               "activation": _GLU_ACT[blocks[0].ffn.activation], "expert_scale": float(n_experts), **moe_options}
    new_cfg = build_config(cfg, ffn="moe", ffn_options=options)
    inputs: list[Tensor | None] = [None] * len(blocks)
    if method == "coactivation":
        if calibration_ids is None:
            raise ConfigError("calibration_ids", None, "token ids (batch, seq) to measure co-activation on")
        def keep_input(i):
            return lambda module, args: inputs.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]))

        hooks = [b.ffn.register_forward_pre_hook(keep_input(i)) for i, b in enumerate(blocks)]
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(calibration_ids)
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
    new = type(model)(new_cfg).to(next(model.parameters()).device)
    state = {k: v for k, v in model.state_dict().items() if ".ffn." not in k}
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected and all(".ffn." in k for k in missing), (missing, unexpected)
    for i, (old_b, new_b) in enumerate(zip(blocks, new.backbone.blocks, strict=True)):
        groups = split_neurons(old_b.ffn, n_experts, method, gate_inputs=inputs[i], seed=seed + i)
        load_experts(new_b.ffn, old_b.ffn, groups)
    return new.train(model.training)
