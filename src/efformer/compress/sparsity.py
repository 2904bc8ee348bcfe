"""Weight sparsity masks (magnitude, Wanda; unstructured, N:M, blocks) and calibrated activation sparsity (SCAP).

- Scores: magnitude ``|W|``; Wanda ("A Simple and Effective Pruning Approach for Large Language Models",
  Sun et al. 2023) ``|W_ij| * ||X_j||_2`` with X the calibration inputs of the linear.
- Patterns: ``unstructured`` drops the lowest scores at the given sparsity, compared within each output
  row (Wanda's comparison group; for magnitude too, so no row is emptied); ``nm`` keeps the n highest of
  every m consecutive inputs of each row (2:4 by default, sparsity n/m fixed); ``block`` drops whole
  (bh, bw) tiles with the lowest summed score, per layer (the block-structured sparsity of "LPViT:
  Low-Power Semi-structured Pruning for Vision Transformers"; edge tiles may be partial).
- The masks are applied by zeroing weights: the model keeps its dense shapes, saves and loads as before,
  and is exactly as fast on CPU (``benchmarks/lowrank_perplexity.py`` times it; a dense matmul does
  not skip zeros).
- Activation sparsity ("Post-Training Statistical Calibration for Higher Activation Sparsity", SCAP):
  per FFN input linear, a threshold t on |x| taken as the ``target`` quantile of the calibration inputs,
  so that inputs with |x| < t are zeroed at inference (what a sparse kernel would skip). We apply the
  plain threshold (no mode-centering) through forward pre-hooks; :class:`ActivationSparsity` holds the
  thresholds and the sparsity actually reached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import pydantic
import torch
from torch import Tensor, nn

from efformer.compress.api import _targets
from efformer.compress.calibration import check_windows, observe
from efformer.errors import ConfigError, ShapeError
from efformer.options import StrictModel, config_error


# ---- masks of one matrix ------------------------------------------------------------------------
def unstructured_mask(score: Tensor, sparsity: float) -> Tensor:
    """Keep-mask (out, in): in each row, the ``round(sparsity*in)`` lowest scores dropped."""
    drop = int(round(sparsity * score.shape[1]))
    keep = torch.ones_like(score, dtype=torch.bool)
    if drop:
        keep.scatter_(1, score.topk(drop, dim=1, largest=False).indices, False)
    return keep


def nm_mask(score: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Keep-mask (out, in): the n highest scores of every m consecutive inputs of each row (in % m == 0)."""
    out_f, in_f = score.shape
    if in_f % m:
        raise ShapeError(f"an N:M mask needs the input width {in_f} to be a multiple of m={m}")
    grouped = score.reshape(out_f, in_f // m, m)
    keep = torch.zeros_like(grouped, dtype=torch.bool).scatter(2, grouped.topk(n, dim=2).indices, True)
    return keep.reshape(out_f, in_f)


def block_mask(score: Tensor, sparsity: float, block: tuple[int, int] = (4, 4)) -> Tensor:
    """Keep-mask (out, in): whole (bh, bw) tiles with the lowest summed score dropped, ``sparsity`` of the tiles."""
    bh, bw = block
    out_f, in_f = score.shape
    ph, pw = -out_f % bh, -in_f % bw  # partial edge tiles: pad with zeros, which lower no tile's score
    padded = nn.functional.pad(score, (0, pw, 0, ph))
    tiles = padded.reshape((out_f + ph) // bh, bh, (in_f + pw) // bw, bw).sum((1, 3))
    drop = int(round(sparsity * tiles.numel()))
    keep = torch.ones(tiles.numel(), dtype=torch.bool)
    if drop:
        keep[tiles.flatten().topk(drop, largest=False).indices] = False
    keep = keep.reshape(tiles.shape).repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return keep[:out_f, :in_f]


def wanda_score(weight: Tensor, input_sq_sum: Tensor) -> Tensor:
    """Wanda's (out, in) score ``|W| * ||X_j||_2`` from the per-input sums of squares (in,) of the inputs."""
    return weight.abs() * input_sq_sum.sqrt().to(weight.dtype)[None, :]


# ---- the model-level call -----------------------------------------------------------------------
class SparsityConfig(StrictModel):
    """Which score and pattern, and how sparse."""

    method: Literal["magnitude", "wanda"] = pydantic.Field("magnitude", description="magnitude or wanda scores")
    pattern: Literal["unstructured", "nm", "block"] = pydantic.Field("unstructured", description="mask pattern")
    sparsity: float = pydantic.Field(0.5, ge=0, lt=1, description="fraction of weights (or tiles) zeroed; nm: n/m")
    n: int = pydantic.Field(2, ge=1, description="nm: kept per group of m")
    m: int = pydantic.Field(4, ge=2, description="nm: group length along the inputs")
    block: tuple[int, int] = pydantic.Field((4, 4), description="block: tile (rows, columns)")

    def __init__(self, **kw):
        try:
            super().__init__(**kw)
        except pydantic.ValidationError as e:
            raise config_error(e, "SparsityConfig", SparsityConfig) from None

    @pydantic.model_validator(mode="after")
    def _check(self) -> SparsityConfig:
        if self.n >= self.m:
            raise ValueError(f"n={self.n} must be below m={self.m}")
        if min(self.block) < 1:
            raise ValueError(f"block={self.block} needs positive sides")
        return self


class _SqSum:
    """Per-input-channel sum of squares (in,) of the inputs seen (Wanda's ||X_j||^2)."""

    def __init__(self):
        self.sq: Tensor | None = None

    def __call__(self, x: Tensor) -> None:
        s = (x.double() ** 2).sum(0)
        self.sq = s if self.sq is None else self.sq + s


def sparsify(model: nn.Module, config: SparsityConfig, calibration: Tensor | None = None,
             filter: Callable[[str, nn.Module], bool] | None = None) -> dict[str, float]:
    """Zero the masked weights of ``model``'s selected linears in place (``calibration`` (n, seq) for wanda);
    returns each linear's achieved sparsity. On any error the model is unchanged."""
    if not isinstance(config, SparsityConfig):
        raise ConfigError("config", type(config).__name__, "a SparsityConfig (efformer.compress.SparsityConfig)")
    targets = _targets(model, filter)
    if not targets:
        raise ConfigError("filter", "no linear selected", "the filter must accept at least one nn.Linear of the model")
    if config.pattern == "nm":
        for name, lin in targets.items():
            if lin.in_features % config.m:
                raise ShapeError(f"{name} has input width {lin.in_features}, not a multiple of m={config.m}; "
                                 "exclude it with a filter or use another pattern")
    if config.method == "wanda":
        check_windows(calibration, "wanda")
    stats = observe(model, calibration, targets, _SqSum) if config.method == "wanda" else {}
    masks = {}
    for name, lin in targets.items():
        w = lin.weight.detach()
        score = wanda_score(w, stats[name].sq) if config.method == "wanda" else w.abs()
        if config.pattern == "nm":
            masks[name] = nm_mask(score, config.n, config.m)
        elif config.pattern == "block":
            masks[name] = block_mask(score, config.sparsity, config.block)
        else:
            masks[name] = unstructured_mask(score, config.sparsity)
    with torch.no_grad():  # only now does the model change
        for name, lin in targets.items():
            lin.weight.mul_(masks[name].to(lin.weight.dtype))
    return {name: 1.0 - float(masks[name].float().mean()) for name in targets}


# ---- activation sparsity (SCAP) -----------------------------------------------------------------
def ffn_input_filter(name: str, module: nn.Module) -> bool:
    """The FFN's input linears (``...ffn.gate_up``/``up``/``fc1`` and ``...ffn.down``/``fc2``)."""
    return isinstance(module, nn.Linear) and ".ffn." in f".{name}"


class _AbsSample:
    """A bounded random sample of |x| (for the quantile; torch.quantile refuses more than 2^24 values)."""

    LIMIT = 1 << 22

    def __init__(self):
        self.parts: list[Tensor] = []
        self.count = 0
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self, x: Tensor) -> None:
        flat = x.detach().abs().flatten().float()
        room = self.LIMIT // 8  # per call, so many batches still fit
        if flat.numel() > room:
            flat = flat[torch.randint(0, flat.numel(), (room,), generator=self.gen)]
        self.parts.append(flat)
        self.count += flat.numel()

    def quantile(self, q: float) -> float:
        values = torch.cat(self.parts)
        if values.numel() > self.LIMIT:
            values = values[torch.randperm(values.numel(), generator=self.gen)[: self.LIMIT]]
        return float(torch.quantile(values, q))


class ActivationSparsity:
    """Forward pre-hooks zeroing inputs with |x| < threshold on each chosen linear; counts the zeros made."""

    def __init__(self):
        self.thresholds: dict[str, float] = {}
        self.zeros: dict[str, int] = {}
        self.total: dict[str, int] = {}
        self._handles = []

    def add(self, name: str, module: nn.Module, threshold: float) -> None:
        """Threshold ``module``'s input at ``threshold`` from now on."""
        self.thresholds[name], self.zeros[name], self.total[name] = threshold, 0, 0

        def hook(_module, args):
            x = args[0]
            keep = x.abs() >= threshold
            self.zeros[name] += int((~keep).sum())
            self.total[name] += keep.numel()
            return (x * keep,) + tuple(args[1:])
        self._handles.append(module.register_forward_pre_hook(hook))

    def achieved(self) -> dict[str, float]:
        """Fraction of inputs zeroed per linear since the hooks went on (or the last reset)."""
        return {n: self.zeros[n] / self.total[n] if self.total[n] else 0.0 for n in self.thresholds}

    def reset(self) -> None:
        """Restart the zero counts."""
        self.zeros = dict.fromkeys(self.thresholds, 0)
        self.total = dict.fromkeys(self.thresholds, 0)

    def remove(self) -> None:
        """Take the hooks off (the model computes densely again)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def calibrate_activation_sparsity(model: nn.Module, calibration: Tensor, target: float,
                                  filter: Callable[[str, nn.Module], bool] | None = None) -> ActivationSparsity:
    """Per selected linear (default: FFN inputs), the |x| threshold that zeroes ``target`` of its calibration
    inputs, layer by layer with the earlier thresholds already on; installs the hooks and returns them."""
    if isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target < 1:
        raise ConfigError("target", target, "an activation sparsity in (0, 1)")
    check_windows(calibration, "activation sparsity")
    targets = _targets(model, filter or ffn_input_filter)
    if not targets:
        raise ConfigError("filter", "no linear selected", "the model has no FFN linears; pass a filter")
    act = ActivationSparsity()
    try:
        for name, mod in targets.items():  # later inputs depend on earlier thresholds, so calibrate in order
            obs = observe(model, calibration, {name: mod}, _AbsSample, stop_after=mod)
            act.add(name, mod, obs[name].quantile(float(target)))
    except BaseException:
        act.remove()
        raise
    act.reset()
    return act
