"""LoRA adapters ("LoRA: Low-Rank Adaptation of Large Language Models", Hu et al. 2021) on any efformer model.

``add_lora(model, rank, targets, alpha)`` wraps each selected ``nn.Linear`` (the same selection as
``quantize``: by default every linear but heads and routers; or a list of module-name suffixes like
peft's ``target_modules``; or a filter ``(name, module) -> bool``) in a :class:`LoRALinear`:
``y = W x + b + (alpha / r) * B (A x)`` with A (r, in) drawn like ``nn.Linear``'s weight and B (out, r)
zero, so the wrapped model starts out computing exactly what it did. Every other parameter is frozen,
so the existing trainer (which optimizes the parameters that require grad) trains only the adapters.
``merge_lora`` folds ``alpha/r * B A`` into W (inference at the original cost), ``unmerge_lora``
takes it out again; ``remove_lora`` returns a plain model (merged or not) that ``efformer.save`` writes
as an ordinary model. ``save_adapters`` / ``load_adapters`` keep the adapters alone in a safetensors
file (the rank, alpha and module names in its metadata), written atomically.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from efformer.compress.api import _set, default_filter
from efformer.durable import fsync_dir, fsync_file
from efformer.errors import CheckpointError, ConfigError

FORMAT = "efformer-lora"
Targets = Sequence[str] | Callable[[str, nn.Module], bool] | None


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha/rank) * x A^T B^T``: a frozen (out, in) linear plus a trainable rank-r update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, float(alpha)
        self.scaling = self.alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype,
                                               device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype,
                                               device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) initialise A
        self.merged = False

    @property
    def in_features(self) -> int:
        """Input width of the wrapped linear."""
        return self.base.in_features

    @property
    def out_features(self) -> int:
        """Output width of the wrapped linear."""
        return self.base.out_features

    @property
    def delta(self) -> Tensor:
        """The (out, in) update ``alpha/rank * B A`` the adapter adds to the weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out)."""
        y = self.base(x)
        if self.merged:
            return y
        return y + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (no-op when merged)."""
        if not self.merged:
            self.base.weight.add_(self.delta.to(self.base.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the base weight again (no-op when not merged)."""
        if self.merged:
            self.base.weight.sub_(self.delta.to(self.base.weight.dtype))
            self.merged = False


def _select(model: nn.Module, targets: Targets) -> dict[str, nn.Linear]:
    if targets is None or callable(targets):
        keep = targets or default_filter
        return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and keep(n, m)}
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise ConfigError("targets", targets, "a list of module names or name suffixes (e.g. ['q_proj', 'down']), "
                          "a filter (name, module) -> bool, or None for every linear but the heads")
    found = {n: m for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)}
    bad = [n for n, m in found.items() if not isinstance(m, nn.Linear)]
    if bad:
        raise ConfigError("targets", bad[0], f"is a {type(found[bad[0]]).__name__}, not an nn.Linear; LoRA wraps "
                          "linears only")
    return found


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA-wrapped linears by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, rank: int, targets: Targets = None, alpha: float | None = None) -> nn.Module:
    """Wrap the ``targets`` linears of ``model`` in rank-``rank`` adapters (scale ``alpha/rank``; alpha defaults to
    rank) and freeze everything else, in place. Returns the model; on any error it is unchanged."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError("rank", rank, "a positive integer (the adapters' inner width)")
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError("alpha", alpha, "a positive number (the update is scaled by alpha/rank)")
    if lora_modules(model):
        raise ConfigError("model", "already has LoRA adapters", "merge or remove them first (remove_lora)")
    chosen = _select(model, targets)
    if not chosen:
        raise ConfigError("targets", targets, "selects no nn.Linear of the model; name existing linears "
                          "(efformer models: q_proj, kv_proj, out_proj, gate_up, down, ...)")
    for name, lin in chosen.items():
        if rank > min(lin.in_features, lin.out_features):
            raise ConfigError("rank", rank, f"must be <= min(in, out) = {min(lin.in_features, lin.out_features)} of "
                              f"{name} ({lin.out_features} x {lin.in_features}); lower it or leave that linear out")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, lin in chosen.items():
        _set(model, name, LoRALinear(lin, rank, alpha))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (outputs unchanged, no extra cost per token)."""
    for m in lora_modules(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every merged adapter out of its base weight again."""
    for m in lora_modules(model).values():
        m.unmerge()
    return model


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every adapter by its base linear (with the update folded in when ``merge``); unfreezes the model."""
    for name, m in lora_modules(model).items():
        m.merge() if merge else m.unmerge()
        _set(model, name, m.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors alone: ``{module}.lora_A`` (r, in) and ``{module}.lora_B`` (out, r)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = m.lora_A.detach(), m.lora_B.detach()
    return out


def save_adapters(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's adapters (only) to the safetensors file ``path``, atomically."""
    mods = lora_modules(model)
    if not mods:
        raise ConfigError("model", "has no LoRA adapters", "call efformer.compress.add_lora first")
    if any(m.merged for m in mods.values()):
        raise ConfigError("model", "adapters are merged", "unmerge_lora before saving adapters (the base weights "
                          "would otherwise hold them twice on load)")
    first = next(iter(mods.values()))
    meta = {"format": FORMAT, "rank": str(first.rank), "alpha": repr(first.alpha), "modules": json.dumps(list(mods))}
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        save_file({k: v.cpu().contiguous() for k, v in lora_state_dict(model).items()}, str(tmp), metadata=meta)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapters saved by :func:`save_adapters` into ``model`` (adding them first if it has none)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file; give a file written by save_adapters")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        rank, alpha, names = int(meta["rank"]), float(meta["alpha"]), json.loads(meta["modules"])
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise CheckpointError(f"{path} is not an adapter file written by save_adapters ({type(e).__name__}: {e})") \
            from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an efformer LoRA adapter file (format {meta.get('format')!r})")
    have = lora_modules(model)
    if not have:
        missing = [n for n in names if n not in dict(model.named_modules())]
        if missing:
            raise CheckpointError(f"{path} has adapters for {missing[:3]}, which this model does not have")
        add_lora(model, rank, names, alpha)
        have = lora_modules(model)
    if set(have) != set(names):
        raise CheckpointError(f"{path} holds adapters for {len(names)} modules but the model has them on "
                              f"{len(have)} others; remove_lora first or add the same targets")
    for name, m in have.items():
        a, b = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
        if a is None or b is None or a.shape != m.lora_A.shape or b.shape != m.lora_B.shape or m.alpha != alpha:
            raise CheckpointError(f"{path}: the adapter of {name} is missing or does not fit (rank {m.rank}, "
                                  f"alpha {m.alpha} here); add_lora with the file's rank {rank} and alpha {alpha}")
        if m.merged:
            raise ConfigError("model", "adapters are merged", "unmerge_lora before loading adapters")
    with torch.no_grad():
        for name, m in have.items():
            m.lora_A.copy_(tensors[f"{name}.lora_A"])
            m.lora_B.copy_(tensors[f"{name}.lora_B"])
    return model
