"""``quantize(model, config, calibration=None, filter=None)``: post-training quantization in place.

Like torchao's ``quantize_``: one call, one config class per method, every ``nn.Linear`` the filter
accepts is a target (by default all of them except LM/classifier heads and MoE routers; norms and
embeddings are never touched). The work happens on a deep copy; the input model is changed only at
the very end, by swapping in the finished module tree, so a failure leaves it exactly as it was.
The model then carries ``model.quantization`` (method, config, the spec of every replaced module),
which ``efformer.save`` writes into ``config.json`` and ``efformer.load`` uses to rebuild it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Literal

import pydantic
import torch
from torch import Tensor, nn

from efformer.compress import gptq as gptq_mod
from efformer.compress import smooth
from efformer.compress.calibration import HessianObserver, check_windows, observe
from efformer.compress.formats import FLOAT_FORMATS, float_fake_quant
from efformer.compress.probs import install_prob_quantizers
from efformer.compress.qlinear import IntWeightLinear, W8A8Linear
from efformer.compress.rtn import rtn_quantize, weight_format
from efformer.errors import ConfigError, UnknownNameError
from efformer.options import StrictModel, config_error

EXCLUDED = ("lm_head", "head", "router", "classifier")  # module-name parts left in float by default


class _Config(StrictModel):
    """Base of the quantization configs: bad values raise ConfigError naming the field."""

    def __init__(self, **kw):
        try:
            super().__init__(**kw)
        except pydantic.ValidationError as e:
            raise config_error(e, type(self).__name__, type(self)) from None


class RTNConfig(_Config):
    """Round-to-nearest integer weights, stored as codes (packed two per byte at <= 4 bits)."""

    method: Literal["rtn"] = "rtn"
    bits: int = pydantic.Field(4, ge=2, le=8, description="bits per weight (2..8)")
    group_size: int = pydantic.Field(128, ge=-1, description="columns sharing a scale; -1 = one per output row")
    symmetric: bool = pydantic.Field(False, description="signed codes with no zero point (else min/max affine)")
    mse_clip: bool = pydantic.Field(False, description="search a clipped range per row/group minimising "
                                    "|q - w|^2.4 (the GPTQ reference's mse option) instead of plain min/max")

    @pydantic.field_validator("group_size")
    @classmethod
    def _group(cls, g: int) -> int:
        if g == 0:
            raise ValueError("group_size must be -1 (per output row) or a positive number of columns")
        return g


class GPTQConfig(RTNConfig):
    """GPTQ (Hessian-aware error feedback), block by block on calibration windows."""

    method: Literal["gptq"] = "gptq"
    # On by default: it lowered GPTQ's held-out layer objective at every width and grouping measured
    # (benchmarks/gptq_layer_objective.py: 0.45 -> 0.37 of RTN's at 4-bit per channel on lm-small).
    act_order: bool = pydantic.Field(True, description="quantize columns by decreasing Hessian diagonal")
    static_groups: bool = pydantic.Field(False, description="group grids from the original weights up front")
    percdamp: float = pydantic.Field(0.01, gt=0, le=10, description="dampening, as a fraction of mean diag(H)")
    block_size: int = pydantic.Field(128, ge=1, description="columns per lazy batch update")


class W8A8Config(_Config):
    """int8 weights (per channel) x int8 activations (per token, dynamic), optionally smoothed first."""

    method: Literal["w8a8"] = "w8a8"
    smoothing: Literal["none", "smoothquant", "osplus"] = pydantic.Field(
        "none", description="outlier migration before quantizing: none, SmoothQuant or OS+")
    alpha: float = pydantic.Field(0.5, ge=0, le=1, description="SmoothQuant migration strength")
    quantize: bool = pydantic.Field(True, description="False: only apply the (exact) smoothing transform")
    prob_bits: int | None = pydantic.Field(
        None, ge=2, le=8, description="log2-quantize post-softmax attention probabilities to this many bits "
        "(FQ-ViT); None keeps them in float")


class FloatConfig(_Config):
    """Minifloat weights (FP8 E4M3/E5M2, FP4 E2M1) with a scale per tensor, channel, MX or NV block (fake-quant)."""

    method: Literal["float"] = "float"
    format: str = pydantic.Field("fp8_e4m3", description="fp8_e4m3, fp8_e5m2 or fp4_e2m1")
    scaling: Literal["tensor", "channel", "mx", "nv"] = pydantic.Field(
        "channel", description="tensor, channel, mx (pow2 per 32) or nv (fp8 per 16 under a tensor scale)")

    @pydantic.field_validator("format")
    @classmethod
    def _fmt(cls, f: str) -> str:
        if f not in FLOAT_FORMATS:
            raise ValueError(f"unknown float format; known: {', '.join(FLOAT_FORMATS)}")
        return f


CONFIGS = {c.model_fields["method"].default: c for c in (RTNConfig, GPTQConfig, W8A8Config, FloatConfig)}
QuantConfig = RTNConfig | GPTQConfig | W8A8Config | FloatConfig
Progress = Callable[[str, int, int, float], None]  # (layer name, index, total, seconds)


def make_config(method: str, **options) -> QuantConfig:
    """The config of ``method`` (rtn, gptq, w8a8, float) with ``options``."""
    if method not in CONFIGS:
        raise UnknownNameError("quantization method", method, CONFIGS)
    return CONFIGS[method](**options)


def default_filter(name: str, module: nn.Module) -> bool:
    """Every linear except heads (LM head, classifier head) and MoE routers."""
    return isinstance(module, nn.Linear) and not any(p in EXCLUDED for p in name.split("."))


def _targets(model: nn.Module, filter: Callable[[str, nn.Module], bool] | None) -> dict[str, nn.Linear]:
    keep = filter or default_filter
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and keep(n, m)}


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _check(config: object, targets: dict[str, nn.Linear], calibration: Tensor | None) -> None:
    """Refuse a bad config, width or calibration before any work."""
    if not isinstance(config, QuantConfig):
        raise ConfigError("config", type(config).__name__, f"one of {', '.join(c.__name__ for c in CONFIGS.values())}")
    if not targets:
        raise ConfigError("filter", "no linear selected", "the filter must accept at least one nn.Linear of the model")
    g = getattr(config, "group_size", -1)
    for name, lin in targets.items():
        if g > 0 and lin.in_features % g:
            raise ConfigError("group_size", g, f"must divide the input width {lin.in_features} of {name}; "
                              "use a divisor of every width, or -1 for one scale per row")
        if isinstance(config, FloatConfig) and config.scaling in ("mx", "nv"):
            block = 32 if config.scaling == "mx" else 16
            if lin.in_features % block:
                raise ConfigError("scaling", config.scaling, f"{config.scaling} blocks of {block} must divide the "
                                  f"input width {lin.in_features} of {name}; use 'channel'")
    needs = isinstance(config, GPTQConfig) or (isinstance(config, W8A8Config) and config.smoothing != "none")
    if needs:
        check_windows(calibration, config.method)


def _block_groups(names: list[str]) -> list[tuple[str, list[str]]]:
    """Targets grouped by their enclosing numbered block (``...blocks.3``), in order; others form one group."""
    groups: dict[str, list[str]] = {}
    for n in names:
        parts = n.split(".")
        idx = max((i for i, p in enumerate(parts[:-1]) if p.isdigit()), default=-1)
        groups.setdefault(".".join(parts[: idx + 1]), []).append(n)
    return list(groups.items())


def _rtn(work, targets, config, progress):
    fmt = weight_format(config.bits, config.group_size, config.symmetric)
    for i, (name, lin) in enumerate(targets.items()):
        t0 = time.perf_counter()
        _set(work, name, IntWeightLinear.from_quantized(rtn_quantize(lin.weight, fmt, config.mse_clip), lin.bias))
        progress(name, i, len(targets), time.perf_counter() - t0)


def _gptq(work, targets, config, calibration, progress):
    fmt = weight_format(config.bits, config.group_size, config.symmetric)
    done = 0
    for block_name, names in _block_groups(list(targets)):
        t0 = time.perf_counter()
        stop = work.get_submodule(block_name) if block_name else None
        mods = {n: targets[n] for n in names}
        obs = observe(work, calibration, mods, HessianObserver, stop_after=stop)  # inputs after earlier blocks
        per = (time.perf_counter() - t0) / len(names)
        for n in names:
            t1 = time.perf_counter()
            lin = mods[n]
            h = obs[n].h if obs[n].h is not None else torch.zeros(lin.in_features, lin.in_features)
            q = gptq_mod.gptq_quantize(lin.weight, h, fmt, act_order=config.act_order,
                                       static_groups=config.static_groups, percdamp=config.percdamp,
                                       block_size=config.block_size, mse_clip=config.mse_clip)
            _set(work, n, IntWeightLinear.from_quantized(q, lin.bias))
            progress(n, done, len(targets), per + time.perf_counter() - t1)
            done += 1


def _w8a8(work, targets, config, calibration, progress) -> dict[str, dict]:
    extra = {}
    if config.smoothing != "none":
        pairs = smooth.find_pairs(work, calibration, targets)
        added = smooth.smoothquant(pairs, config.alpha) if config.smoothing == "smoothquant" else smooth.osplus(pairs)
        extra = {n: {"kind": "linear", "bias": True} for n in added}
    if not config.quantize:
        return extra
    for i, (name, lin) in enumerate(targets.items()):
        t0 = time.perf_counter()
        _set(work, name, W8A8Linear.from_linear(lin.weight, lin.bias))
        progress(name, i, len(targets), time.perf_counter() - t0)
    return {}


def _float(work, targets, config, progress):
    fmt = FLOAT_FORMATS[config.format]
    for i, (name, lin) in enumerate(targets.items()):
        t0 = time.perf_counter()
        with torch.no_grad():
            lin.weight.copy_(float_fake_quant(lin.weight.float(), fmt, config.scaling).to(lin.weight.dtype))
        progress(name, i, len(targets), time.perf_counter() - t0)


def quantize(model: nn.Module, config: QuantConfig, calibration: Tensor | None = None,
             filter: Callable[[str, nn.Module], bool] | None = None, progress: Progress | None = None) -> nn.Module:
    """Quantize ``model``'s selected linears in place with ``config``; ``calibration`` (n, seq) token ids
    for GPTQ and smoothing. Returns the model; on any error the model is unchanged."""
    if getattr(model, "quantization", None):
        raise ConfigError("model", "already quantized", "quantize a float model (load the original again)")
    _check(config, _targets(model, filter), calibration)
    prob_bits = getattr(config, "prob_bits", None)
    work = copy.deepcopy(model)
    if prob_bits is not None:
        install_prob_quantizers(work, prob_bits)  # refuses a model without softmax attention
    targets = _targets(work, filter)
    progress = progress or (lambda *a: None)
    with torch.no_grad():
        if isinstance(config, GPTQConfig):
            _gptq(work, targets, config, calibration, progress)
        elif isinstance(config, RTNConfig):
            _rtn(work, targets, config, progress)
        elif isinstance(config, W8A8Config):
            extra = _w8a8(work, targets, config, calibration, progress)
        else:
            _float(work, targets, config, progress)
    modules = {n: m.spec() for n, m in work.named_modules() if hasattr(m, "spec") and n in targets}
    if isinstance(config, W8A8Config):
        modules.update(extra)
    section = {"method": config.method, "config": config.model_dump(), "modules": modules}
    # The swap: the original object takes the finished tree (nothing of it was touched before this point).
    model._modules, model._parameters, model._buffers = work._modules, work._parameters, work._buffers
    model.quantization = section
    return model
