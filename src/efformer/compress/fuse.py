"""FuseGPT-style fusion after depth pruning: fold removed blocks into their neighbours.

Paper: "FuseGPT: Learnable Layers Fusion of Generative Pre-trained Transformers" (Pei et al., 2024).
A removed block's linears are injected into the same linears of the nearest kept blocks below and
above it, frozen, but weighted elementwise by a learnable low-rank matrix:

    W_neighbour' = W_neighbour + (A @ B) * W_removed        A (out, r) zeros, B (r, in) random

A starts at zero, so fine-tuning starts from plain removal and can only move towards a better fused
model. Only A and B train (the neighbours' own weights stay as they were), for ``steps`` Adam steps of
a distillation loss, KL(original's predictions || fused model's), on the calibration windows; then
the products are merged into the weights, so the result has exactly the shapes of the depth-pruned
model and saves and loads as an ordinary efformer model. What we chose where the paper leaves room:
both neighbours (when they exist) receive the block, each with its own A, B; the loss is the
distillation of the model's final predictions (not intermediate features); linears whose shapes
differ between the blocks (e.g. after head pruning) and the removed block's biases are not fused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.compress.prune import PrunePlan, apply_plan, blocks_of, check_plan
from efformer.errors import ConfigError


class _FusedLinear(nn.Module):
    """``base`` with ``(A @ B) * injected`` added to its weight: (..., in) -> (..., out)."""

    def __init__(self, base: nn.Linear, injected: list[Tensor], rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.injected = [w.detach() for w in injected]
        out_f, in_f = base.weight.shape
        dev, dt = base.weight.device, base.weight.dtype
        self.a = nn.ParameterList(nn.Parameter(torch.zeros(out_f, rank, device=dev, dtype=dt)) for _ in injected)
        self.b = nn.ParameterList(
            nn.Parameter((torch.randn(rank, in_f, generator=generator) / rank ** 0.5).to(dev, dt)) for _ in injected)

    def weight(self) -> Tensor:
        """The fused weight (out, in)."""
        w = self.base.weight
        for a, b, inj in zip(self.a, self.b, self.injected, strict=True):
            w = w + (a @ b) * inj
        return w

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out)."""
        return F.linear(x, self.weight(), self.base.bias)


def _linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def fuse(model: nn.Module, blocks: list[int], calibration: Tensor, *, rank: int = 8, steps: int = 100,
         lr: float = 1e-2, batch_size: int = 4, seed: int = 0, progress=None) -> nn.Module:
    """``model`` without ``blocks`` (its layer indices), each folded into its kept neighbours and tuned
    briefly on ``calibration`` (n, seq); a new model, the input untouched."""
    for name, v, lo in (("rank", rank, 1), ("steps", steps, 0), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(name, v, f"an integer >= {lo}")
    plan = PrunePlan(blocks=list(blocks))
    check_plan(model, plan)
    if calibration is None:
        raise ConfigError("calibration", None, "fusion fine-tunes on calibration windows: a LongTensor (n, seq)")
    progress = progress or (lambda _m: None)
    removed = sorted(set(blocks))
    old = blocks_of(model)
    keep = [i for i in range(len(old)) if i not in removed]
    new = apply_plan(model, plan)
    new_blocks = blocks_of(new)
    gen = torch.Generator().manual_seed(seed)
    injections: dict[tuple[int, str], list[Tensor]] = {}
    for r in removed:
        below = [j for j, i in enumerate(keep) if i < r][-1:]
        above = [j for j, i in enumerate(keep) if i > r][:1]
        src = _linears(old[r])
        for j in below + above:
            for name, lin in _linears(new_blocks[j]).items():
                if name in src and src[name].weight.shape == lin.weight.shape:
                    injections.setdefault((j, name), []).append(src[name].weight)
    fused = {}
    for (j, name), inj in injections.items():
        f = _FusedLinear(_linears(new_blocks[j])[name], inj, rank, gen)
        _set(new_blocks[j], name, f)
        fused[(j, name)] = f
    for p in new.parameters():
        p.requires_grad_(False)
    params = [p for f in fused.values() for p in (*f.a, *f.b)]
    for p in params:
        p.requires_grad_(True)
    was_training = model.training
    model.eval()
    new.eval()  # no dropout: the distillation target is the deterministic original
    try:
        if params and steps:
            opt = torch.optim.Adam(params, lr=lr)
            n = calibration.shape[0]
            for step in range(steps):
                idx = torch.arange(step * batch_size, (step + 1) * batch_size) % n
                x = calibration[idx]
                with torch.no_grad():
                    teacher = model(x).float().log_softmax(-1)
                student = new(x).float().log_softmax(-1)
                loss = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step % max(1, steps // 5) == 0 or step == steps - 1:
                    progress(f"fuse step {step + 1}/{steps}: KL to the original {loss.item():.4f}")
    finally:
        model.train(was_training)
    with torch.no_grad():
        for (j, name), f in fused.items():
            f.base.weight.copy_(f.weight())
            _set(new_blocks[j], name, f.base)
    for p in new.parameters():
        p.requires_grad_(True)
    return new.train(was_training)
