"""Importance scores of the pruning units (KV groups, FFN neurons, blocks): higher = keep.

One score vector per layer (units of that layer); blocks get one score per layer. Methods:

* ``magnitude``: the L2 norm of every weight the unit owns (rows in, columns out).
* ``wanda``: |W| x ||X|| of "A Simple and Effective Pruning Approach for Large Language Models"
  (Sun et al., 2023), for structures: the unit's columns of the output projection (attention
  out_proj, FFN down), each |W_oc| weighted by the L2 norm of its input column c over the calibration
  tokens, summed over the unit. Removing the unit removes exactly those terms.
* ``taylor``: first-order Taylor of the calibration loss, |sum over the unit's weights of g x w|
  ("Importance Estimation for Neural Network Pruning", Molchanov et al., 2019; LLM-Pruner's group
  form). The loss: next-token cross-entropy for LMs; for classifiers (no labels), cross-entropy
  against the model's own predicted class.
* ``amp``: Adaptive MLP Pruning ("Adaptive MLP Pruning for Large Vision Transformers", Shen): the
  same Taylor form with the label-free information-entropy loss H(p) = -sum_v p_v log p_v of the
  model's full predictive distribution instead of a one-hot loss (the allocation, a binary search
  per layer, is in ``budget.py``).
* ``optin``: OPTIN's trajectory importance ("The Need for Speed: Pruning Transformers with One
  Recipe", Khaki & Plataniotis, 2024): how far removing the unit moves the features of every later
  layer (a distillation distance over the trajectory). Our estimate, which we chose for cost: the
  linearised distance sum_l ||dh_l||^2 / ||h_l||^2 of gating the unit off, computed for all units at
  once from R random projections of the normalised later features (E_r[(r.J d)^2] = ||J d||^2), so
  it costs R backward passes rather than one forward per unit. Comparable across layers, so OPTIN
  ranks units globally.
* ``block-influence``: 1 - mean cos(x_in, x_out) between a block's input and output hidden states
  over the calibration tokens (ShortGPT's Block Influence; FuseGPT starts from the same question).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.compress.calibration import check_windows, observe
from efformer.compress.prune import blocks_of, check_kind, n_units, output_projection, owners
from efformer.errors import CapabilityError, ConfigError

METHODS = ("magnitude", "wanda", "taylor", "amp", "optin", "block-influence")
NEEDS_CALIBRATION = ("wanda", "taylor", "amp", "optin", "block-influence")
SUPPORTS = {"magnitude": ("heads", "neurons"), "wanda": ("heads", "neurons"), "taylor": ("heads", "neurons"),
            "amp": ("neurons",), "optin": ("heads", "neurons"), "block-influence": ("blocks",)}
OPTIN_PROJECTIONS = 8  # random projections of the later features (R)


def check_method(model: nn.Module, method: str, what: str, calibration: Tensor | None) -> None:
    """Refuse an unknown method, a unit kind it cannot score, or missing calibration, before any work."""
    if method not in METHODS:
        raise ConfigError("method", method, f"one of {', '.join(METHODS)}")
    check_kind(model, what)
    if what not in SUPPORTS[method]:
        raise ConfigError("what", what, f"{method} scores {' and '.join(SUPPORTS[method])}; for "
                          f"{what} use {', '.join(m for m, k in SUPPORTS.items() if what in k)}")
    if method in NEEDS_CALIBRATION:
        check_windows(calibration, f"method {method!r}")
        if model.cfg.task == "dual":
            raise CapabilityError(f"method {method!r} runs the model on calibration text, which a dual encoder "
                                  "(two inputs) cannot take; use magnitude")


def reduce_units(block: nn.Module, kind: str, per_element: dict[str, Tensor], n: int) -> Tensor:
    """Sum per-element values (name -> tensor shaped like that weight) into the block's ``n`` units."""
    total = torch.zeros(n, dtype=torch.float64)
    for name, (dim, own) in owners(block, kind).items():
        if name in per_element:
            t = per_element[name].double()
            along = t if t.dim() == 1 else t.sum(1 - dim)
            total.index_add_(0, own, along.cpu())
    return total


def _params(block: nn.Module, kind: str) -> dict[str, Tensor]:
    named = dict(block.named_parameters())
    if hasattr(block, "block"):  # MoD wraps the Block
        named = {k.removeprefix("block."): v for k, v in named.items()}
    return {name: named[name] for name in owners(block, kind)}


def magnitude(model: nn.Module, kind: str) -> list[Tensor]:
    """L2 norm of each unit's weights, per layer."""
    out = []
    for blk in blocks_of(model):
        sq = {k: p.detach().square() for k, p in _params(blk, kind).items()}
        out.append(reduce_units(blk, kind, sq, n_units(blk, kind)).sqrt())
    return out


class _SquareSum:
    """Per-column sum of squares (in,) of the inputs seen."""

    def __init__(self):
        self.s: Tensor | None = None

    def __call__(self, x: Tensor) -> None:
        s = x.double().square().sum(0)
        self.s = s if self.s is None else self.s + s


def wanda(model: nn.Module, kind: str, calibration: Tensor) -> list[Tensor]:
    """Sum over the unit's output-projection columns c of ||X_c|| * sum_o |W_oc|, per layer."""
    blocks = blocks_of(model)
    projs = {str(i): output_projection(b, kind) for i, b in enumerate(blocks)}
    obs = observe(model, calibration, projs, _SquareSum)
    out = []
    for i, blk in enumerate(blocks):
        lin = projs[str(i)]
        score = lin.weight.detach().abs().double().cpu() * obs[str(i)].s.sqrt().cpu()[None, :]
        name = "mixer.out_proj.weight" if kind == "heads" else "ffn.down.weight"
        out.append(reduce_units(blk, kind, {name: score}, n_units(blk, kind)))
    return out


def calibration_loss(model: nn.Module, x: Tensor, loss: str = "ce") -> Tensor:
    """Mean loss on windows ``x`` (b, n): ``ce`` (LM: next token; classifier: its own predicted class) or
    ``entropy`` (label-free: mean entropy of the predictive distributions)."""
    logits = model(x)
    if logits.dtype in (torch.float16, torch.bfloat16):  # float64 models keep their precision
        logits = logits.float()
    if model.cfg.task == "lm":
        logits = logits[:, :-1]
    if loss == "entropy":
        logp = logits.log_softmax(-1)
        return -(logp.exp() * logp).sum(-1).mean()
    if model.cfg.task == "lm":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    return F.cross_entropy(logits, logits.argmax(-1).detach())


def _grad_times_weight(model: nn.Module, kind: str, calibration: Tensor, loss: str, batch_size: int) -> list[Tensor]:
    """|sum over each unit of g * w| with g the gradient of the summed calibration loss, per layer."""
    blocks = blocks_of(model)
    params = [_params(b, kind) for b in blocks]
    watched = [p for ps in params for p in ps.values()]
    grads = [torch.zeros_like(p) for p in watched]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, calibration.shape[0], batch_size):
            g = torch.autograd.grad(calibration_loss(model, calibration[i:i + batch_size], loss), watched,
                                    allow_unused=True)
            for acc, gi in zip(grads, g, strict=True):
                if gi is not None:
                    acc.add_(gi)
    finally:
        model.train(was_training)
    out, k = [], 0
    for blk, ps in zip(blocks, params, strict=True):
        gw = {}
        for name, p in ps.items():
            gw[name] = grads[k] * p.detach()
            k += 1
        out.append(reduce_units(blk, kind, gw, n_units(blk, kind)).abs())
    return out


def taylor(model: nn.Module, kind: str, calibration: Tensor, batch_size: int = 8) -> list[Tensor]:
    """First-order Taylor |sum g w| of the calibration cross-entropy, per layer."""
    return _grad_times_weight(model, kind, calibration, "ce", batch_size)


def amp(model: nn.Module, kind: str, calibration: Tensor, batch_size: int = 8) -> list[Tensor]:
    """AMP's label-free entropy Taylor |sum g w| (g: gradient of the predictive entropy), per layer."""
    return _grad_times_weight(model, kind, calibration, "entropy", batch_size)


@contextlib.contextmanager
def gated(model: nn.Module, kind: str, gates: list[Tensor]) -> Iterator[None]:
    """Multiply each layer's ``kind`` unit outputs by ``gates[i]`` (n_units,) inside the block: 0 removes the
    unit exactly (its columns of the output projection see zeros), 1 keeps it."""
    handles = []
    for blk, g in zip(blocks_of(model), gates, strict=True):
        _, own = owners(blk, kind)["mixer.out_proj.weight" if kind == "heads" else "ffn.down.weight"]
        own = own.to(g.device)
        handles.append(output_projection(blk, kind).register_forward_pre_hook(
            lambda _m, args, g=g, own=own: (args[0] * g[own].to(args[0].dtype),)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run_blocks(model: nn.Module, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Run ``model`` on ``x``; each block's input and output hidden states (b, n, d), in layer order."""
    ins: list[Tensor] = []
    outs: list[Tensor] = []
    handles = []
    for b in blocks_of(model):
        handles.append(b.register_forward_pre_hook(lambda _m, args: ins.append(args[0])))
        handles.append(b.register_forward_hook(lambda _m, _a, o: outs.append(o[0])))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return ins, outs


def optin(model: nn.Module, kind: str, calibration: Tensor, projections: int = OPTIN_PROJECTIONS,
          batch_size: int = 8, seed: int = 0) -> list[Tensor]:
    """Linearised trajectory distance of gating each unit off, sum over later layers of ||dh||^2/||h||^2."""
    blocks = blocks_of(model)
    dev = next(model.parameters()).device
    gates = [torch.ones(n_units(b, kind), device=dev, requires_grad=True) for b in blocks]
    acc = [torch.zeros(g.numel(), dtype=torch.float64) for g in gates]
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with gated(model, kind, gates):
            for i in range(0, calibration.shape[0], batch_size):
                _, outs = _run_blocks(model, calibration[i:i + batch_size])
                feats = [(o / o.detach().norm().clamp(min=1e-12)).float() for o in outs]
                for _ in range(projections):
                    proj = sum((f * torch.randn(f.shape, generator=gen).to(f.device)).sum() for f in feats)
                    grads = torch.autograd.grad(proj, gates, retain_graph=True)
                    for a, g in zip(acc, grads, strict=True):
                        a.add_(g.detach().double().cpu().square() / projections)
    finally:
        model.train(was_training)
    return acc


@torch.no_grad()
def block_influence(model: nn.Module, calibration: Tensor, batch_size: int = 8) -> list[Tensor]:
    """1 - mean cos(input, output) of each block over the calibration tokens: one value per layer."""
    blocks = blocks_of(model)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    count = 0
    was_training = model.training
    model.eval()
    try:
        for i in range(0, calibration.shape[0], batch_size):
            ins, outs = _run_blocks(model, calibration[i:i + batch_size])
            for j, (a, b) in enumerate(zip(ins, outs, strict=True)):
                sums[j] += F.cosine_similarity(a.double(), b.double(), dim=-1).sum().cpu()
            count += ins[0].shape[0] * ins[0].shape[1]
    finally:
        model.train(was_training)
    return [1 - s / count for s in sums]


def scores(model: nn.Module, method: str, kind: str, calibration: Tensor | None = None) -> list[Tensor]:
    """Importance (higher = keep) of every ``kind`` unit, one tensor per layer (blocks: one value each)."""
    check_method(model, method, kind, calibration)
    if method == "magnitude":
        return magnitude(model, kind)
    if method == "wanda":
        return wanda(model, kind, calibration)
    if method == "taylor":
        return taylor(model, kind, calibration)
    if method == "amp":
        return amp(model, kind, calibration)
    if method == "optin":
        return optin(model, kind, calibration)
    return [s.reshape(1) for s in block_influence(model, calibration)]
