"""Outlier migration before W8A8: SmoothQuant and Outlier Suppression+ (OS+), folded into the preceding norm.

SmoothQuant ("SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", Xiao et al., 2023): per input channel j, s_j = max|X_j|^alpha / max|W_j|^(1-alpha); the norm
that produces X is divided by s and every linear reading X has its column j multiplied by s_j, so
X W^T is unchanged while activation outliers move into the weights.
OS+ ("Outlier Suppression+: Accurate quantization of large language models by equivalent and
optimal shifting and scaling", Wei et al., 2023): first shift each channel by z_j = (max X_j + min X_j)/2
(folded into the norm's bias; the linears' biases gain W z), then scale channels whose range exceeds a
threshold t down to t, s_j = max(1, max|X_j - z_j| / t), with t chosen by a grid search that
minimises the W8A8 output error on calibration activations.
Pairs (norm -> linears reading its output) are found by tensor identity during calibration, so any
model whose linears read a norm's output directly is covered; an RMSNorm has no bias, so OS+
skips the shift there (scaling only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from efformer.compress.calibration import RangeObserver
from efformer.compress.qlinear import quantize_activations
from efformer.compress.rtn import rtn_quantize, weight_format

SAMPLE_TOKENS = 1024  # calibration activations kept per norm for OS+'s threshold search
OSP_GRID = 20


@dataclass
class NormPair:
    """A norm and the linears that read its output, with the statistics of that output."""

    norm_name: str
    norm: nn.Module
    linears: dict[str, nn.Linear]
    ranges: RangeObserver = field(default_factory=RangeObserver)
    sample: list[Tensor] = field(default_factory=list)


def is_norm(m: nn.Module) -> bool:
    """A per-channel affine norm we can fold a scale into (LayerNorm, RMSNorm and look-alikes)."""
    w = getattr(m, "weight", None)
    return "norm" in type(m).__name__.lower() and isinstance(w, Tensor) and w.dim() == 1


@torch.no_grad()
def find_pairs(model: nn.Module, windows: Tensor, targets: dict[str, nn.Linear], batch_size: int = 8) -> list[NormPair]:
    """Run ``model`` on ``windows`` and pair each norm with the target linears fed its exact output tensor."""
    norms = {n: m for n, m in model.named_modules() if is_norm(m)}
    latest: dict[int, tuple[str, Tensor]] = {}
    observed: set[int] = set()
    pairs: dict[str, NormPair] = {}
    handles = []

    def on_norm(name):
        def hook(_m, _args, out):
            latest[id(out)] = (name, out)  # the tensor is kept, so its id is not reused meanwhile
        return hook

    def on_linear(name, lin):
        def hook(_m, args):
            x = args[0]
            hit = latest.get(id(x))
            if hit is None or hit[1] is not x:
                return
            pair = pairs.setdefault(hit[0], NormPair(hit[0], norms[hit[0]], {}))
            pair.linears.setdefault(name, lin)
            if id(x) not in observed:  # the first linear reading this output records its statistics
                observed.add(id(x))
                flat = x.reshape(-1, x.shape[-1]).float()
                pair.ranges(flat)
                kept = sum(len(t) for t in pair.sample)
                if kept < SAMPLE_TOKENS:
                    pair.sample.append(flat[: SAMPLE_TOKENS - kept])
        return hook

    handles += [m.register_forward_hook(on_norm(n)) for n, m in norms.items()]
    handles += [m.register_forward_pre_hook(on_linear(n, m)) for n, m in targets.items()]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, windows.shape[0], batch_size):
            latest.clear()
            observed.clear()
            model(windows[i:i + batch_size])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
        latest.clear()
    return list(pairs.values())


def smoothquant_scales(act_absmax: Tensor, linears: list[nn.Linear], alpha: float) -> Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha) over all linears reading X, clamped to >= 1e-5 (in,)."""
    w_absmax = torch.stack([lin.weight.detach().abs().amax(0) for lin in linears]).amax(0).float()
    s = act_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return torch.where(act_absmax > 0, s.clamp(min=1e-5), torch.ones_like(s))


@torch.no_grad()
def fold(pair: NormPair, scale: Tensor, shift: Tensor | None) -> list[str]:
    """Make the norm output (X - shift) / scale and the linears read it exactly; returns the linears that
    gained a bias (they had none and the shift needs one)."""
    norm, added = pair.norm, []
    w_dtype = norm.weight.dtype
    if shift is not None:
        norm.bias.sub_(shift.to(w_dtype))
    norm.weight.div_(scale.to(w_dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(scale.to(w_dtype))
    for name, lin in pair.linears.items():
        if shift is not None:
            comp = lin.weight.float() @ shift
            if lin.bias is None:
                lin.bias = nn.Parameter(comp.to(lin.weight.dtype))
                added.append(name)
            else:
                lin.bias.add_(comp.to(lin.bias.dtype))
        lin.weight.mul_(scale.to(lin.weight.dtype))
    return added


def smoothquant(pairs: list[NormPair], alpha: float) -> list[str]:
    """Apply SmoothQuant's migration to every pair (in place)."""
    for p in pairs:
        fold(p, smoothquant_scales(p.ranges.absmax, list(p.linears.values()), alpha), None)
    return []


def _w8a8_error(x: Tensor, linears: list[nn.Linear], scale: Tensor, ref: list[Tensor]) -> float:
    """Output error of W8A8 (per-token int8 activations, per-channel int8 weights) after scaling by ``scale``."""
    xq, xs = quantize_activations(x / scale)
    xd = xq.float() * xs
    err = 0.0
    fmt = weight_format(8, -1, True)
    for lin, y in zip(linears, ref, strict=True):
        wd = rtn_quantize(lin.weight.float() * scale, fmt).dequantize()
        err += (xd @ wd.T - y).square().sum().item()
    return err


@torch.no_grad()
def osplus(pairs: list[NormPair], grid: int = OSP_GRID) -> list[str]:
    """Apply OS+ (shift where the norm has a bias, then scale with the searched threshold) in place."""
    added = []
    for p in pairs:
        lo, hi = p.ranges.lo, p.ranges.hi
        can_shift = getattr(p.norm, "bias", None) is not None
        shift = (hi + lo) / 2 if can_shift else torch.zeros_like(hi)
        amax = torch.maximum(hi - shift, shift - lo).clamp(min=1e-8)
        x = torch.cat(p.sample)[:SAMPLE_TOKENS] - shift
        linears = list(p.linears.values())
        ref = [x @ lin.weight.float().T for lin in linears]  # the bias cancels in the error
        best, best_s = None, torch.ones_like(amax)
        top = amax.max()
        for k in range(1, grid + 1):
            t = top * k / grid
            s = (amax / t).clamp(min=1.0)
            e = _w8a8_error(x, linears, s, ref)
            if best is None or e < best:
                best, best_s = e, s
        added += fold(p, best_s, shift if can_shift else None)
    return added
