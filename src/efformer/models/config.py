"""Validated model configs (pydantic v2); every invalid value raises a ConfigError naming the field."""

from __future__ import annotations

import inspect
import json
from typing import Annotated, Any, Literal

import pydantic
import torch

from efformer.errors import CapabilityError, ConfigError, EfformerError
from efformer.mixers.base import form_why_not
from efformer.options import StrictModel, config_error, validate_options
from efformer.registry import FFNS, MIXERS, NORMS, POSITIONALS

Task = Literal["lm", "classifier", "dual"]
# res_post: x + norm(f(x)), Swin V2's res-post-norm
Placement = Literal["pre", "post", "peri", "sandwich", "deepnorm", "res_post"]
# Integers stay integers: True is not 1 layer, 3.0 is not 3 heads (JSON and YAML give real ints).
StrictInt = Annotated[int, pydantic.Strict()]


class CrossFieldError(ValueError):
    """A check across fields failed; ``field`` is the one to change."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class ModelConfig(StrictModel):
    """Everything needed to build a model; round-trips through JSON."""

    task: Task = "lm"  # lm: causal LM; classifier: sequence classifier; dual: dual-encoder matcher
    vocab_size: StrictInt = pydantic.Field(256, gt=0)
    d_model: StrictInt = pydantic.Field(128, gt=0)
    n_layers: StrictInt = pydantic.Field(2, gt=0)
    n_heads: StrictInt = pydantic.Field(4, gt=0)
    # One mixer name for every layer, or one per layer (hybrid stacks).
    mixer: str | list[str] = "softmax"
    # Options of the mixer: one dict for one mixer; with a per-layer list of mixers, a list of dicts
    # aligned with it, or a dict keyed by mixer name (every key a mixer of the list).
    mixer_options: dict[str, Any] | list[dict[str, Any]] = {}
    positional: str = "rope"
    positional_options: dict[str, Any] = {}
    norm: str = "rmsnorm"
    norm_placement: Placement = "pre"
    ffn: str = "swiglu"
    ffn_mult: float = pydantic.Field(4.0, gt=0)
    ffn_options: dict[str, Any] = {}  # options of an FFN that has them (moe: experts, top-k, routing, ...)
    dropout: float = pydantic.Field(0.0, ge=0, lt=1)
    attn_dropout: float = pydantic.Field(0.0, ge=0, lt=1)
    max_len: StrictInt = pydantic.Field(2048, gt=0)
    tie_embeddings: bool = True
    n_classes: StrictInt = pydantic.Field(2, gt=1)  # classifier / dual only
    pooling: Literal["cls", "mean"] = "mean"  # classifier / dual only
    dual_features: Literal["uv", "uv_prod_diff"] = "uv_prod_diff"  # [u, v] or [u, v, u*v, u-v]
    pad_id: StrictInt = pydantic.Field(0, ge=0)
    # classifier / dual only: run the mixers causally, so causal-only mixers (Mamba, RetNet, ...) can
    # encode; a CLS token then goes at the end, where it has seen the whole sequence.
    encoder_causal: bool = False
    # Mixture-of-Depths (models/depth.py): the fraction of each row's tokens a block processes; one
    # value for every layer, or one per layer (None: a plain block there). None: no routing.
    mod_capacity: float | list[float | None] | None = None
    mod_gate: Literal["multiply", "straight_through"] = "multiply"  # scale chosen updates by the router
    mod_predictor_weight: float = pydantic.Field(0.01, ge=0)  # BCE weight of the causal-decoding predictor
    # Early exit (models/early_exit.py): layers (0-based) after which an exit head predicts; trained jointly
    # with weight exit_loss_weight each. None: no exits.
    exit_layers: list[StrictInt] | None = None
    exit_loss_weight: float = pydantic.Field(1.0, ge=0)
    # LGViT self-distillation: each exit also matches the final head's (detached) distribution, weight *
    # temperature^2 * KL; with freeze_for_exit_distillation it is LGViT's second stage.
    exit_distill_weight: float = pydantic.Field(0.0, ge=0)
    exit_distill_temperature: float = pydantic.Field(1.0, gt=0)
    # Settings imported models need (None / False: each part's own default).
    norm_eps: float | None = pydantic.Field(None, gt=0)  # epsilon of every norm
    ffn_bias: bool | None = None  # biases in the FFN (MLPs have them by default, GLUs not)
    head_dim: StrictInt | None = pydantic.Field(None, gt=0)  # per-head width of mixers and rotary (d_model // n_heads)
    embed_norm: bool = False  # normalise the embeddings before the first block (BERT; Peri-LN always does)
    # Block Transformer (models/block_transformer.py): tokens per block, and how many of the top layers
    # decode tokens locally inside a block (the rest attend over block embeddings). None: a plain LM.
    block_len: StrictInt | None = pydantic.Field(None, gt=0)
    block_token_layers: StrictInt = pydantic.Field(1, ge=0)
    # Structured pruning (compress/prune.py): query heads and FFN hidden width of each layer (None: n_heads,
    # and the width ffn_mult gives, everywhere); per-layer heads need head_dim set (heads keep their width).
    layer_heads: list[StrictInt] | None = None
    layer_ffn_hidden: list[StrictInt] | None = None
    # CaiT / PoolFormer layer scale: each residual branch times a learned per-channel vector starting here
    layer_scale: float | None = pydantic.Field(None, gt=0)

    @pydantic.model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.layer_scale is not None and self.norm_placement not in ("pre", "res_post"):
            raise CrossFieldError("layer_scale", f"layer_scale needs norm_placement 'pre' or 'res_post' (the branch "
                                  f"is scaled before the residual sum), not {self.norm_placement!r}")
        if self.d_model % self.n_heads:
            raise CrossFieldError("n_heads", f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
        if isinstance(self.mixer, list) and len(self.mixer) != self.n_layers:
            raise CrossFieldError("mixer", f"mixer list has {len(self.mixer)} entries but n_layers={self.n_layers}; "
                                  "give one mixer per layer, or one name for every layer")
        opts = self.mixer_options
        if isinstance(self.mixer, str) and isinstance(opts, list):
            raise CrossFieldError("mixer_options", f"a list, but mixer={self.mixer!r} is one name; give one dict "
                                  "of its options, or a list of mixers (one per layer)")
        if isinstance(self.mixer, list) and isinstance(opts, list) and len(opts) != len(self.mixer):
            raise CrossFieldError("mixer_options", f"mixer_options has {len(opts)} entries but mixer has "
                                  f"{len(self.mixer)}; give one dict per layer")
        if isinstance(self.mixer, list) and isinstance(opts, dict):
            stray = {k: v for k, v in sorted(opts.items()) if k not in self.mixer or not isinstance(v, dict)}
            if stray:
                raise CrossFieldError("mixer_options", "with a list of mixers, mixer_options must be a list of "
                                      f"dicts (one per layer) or a dict keyed by mixer name; {stray} are not mixers "
                                      f"of {self.mixer} with a dict of options (a flat dict would be ambiguous)")
        caps = self.mod_capacity if isinstance(self.mod_capacity, list) else [self.mod_capacity]
        if isinstance(self.mod_capacity, list) and len(caps) != self.n_layers:
            raise CrossFieldError("mod_capacity", f"mod_capacity has {len(caps)} entries but n_layers="
                                  f"{self.n_layers}; give one per layer (None for a plain block)")
        bad = [c for c in caps if c is not None and not 0 < c <= 1]
        if bad:
            raise CrossFieldError("mod_capacity", f"capacity {bad[0]} is outside (0, 1]: it is the fraction of "
                                  "tokens a block processes (1.0: all, the plain block)")
        ex = self.exit_layers or []
        if ex != sorted(set(ex)) or any(not 0 <= i < self.n_layers - 1 for i in ex):
            raise CrossFieldError("exit_layers", f"exit_layers={ex} must be distinct ascending layer indices in "
                                  f"[0, {self.n_layers - 2}] (after the last layer the model's own head predicts)")
        if self.exit_distill_weight and not ex:
            raise CrossFieldError("exit_distill_weight", "self-distillation of exits needs exit_layers")
        if ex and self.task == "dual":
            raise CrossFieldError("exit_layers", "early exit is for task='lm' or 'classifier', not 'dual'")
        if self.block_len is not None:
            if self.task != "lm" or self.exit_layers or self.mod_capacity is not None or self.layer_heads \
                    or self.layer_ffn_hidden:
                raise CrossFieldError("block_len", "the Block Transformer is a causal LM (task='lm') without exit "
                                      "layers, Mixture-of-Depths or per-layer (pruned) widths")
            if self.block_token_layers >= self.n_layers:
                raise CrossFieldError("block_token_layers", f"block_token_layers={self.block_token_layers} must be "
                                      f"< n_layers={self.n_layers}, so the block decoder keeps at least one layer")
        for name in ("layer_heads", "layer_ffn_hidden"):
            per = getattr(self, name)
            if per is not None and (len(per) != self.n_layers or min(per) < 1):
                raise CrossFieldError(name, f"{name}={per} must hold one positive integer per layer "
                                      f"(n_layers={self.n_layers})")
        if self.layer_heads is not None and self.head_dim is None:
            raise CrossFieldError("head_dim", "layer_heads needs head_dim set: a head keeps its width when "
                                  "others are pruned, so d_model // heads no longer gives it")
        if self.pad_id >= self.vocab_size:
            raise CrossFieldError("pad_id", f"pad_id={self.pad_id} must be < vocab_size={self.vocab_size}")
        return self

    @property
    def causal(self) -> bool:
        """Whether the mixers run causally (language models, and causal encoders)."""
        return self.task == "lm" or self.encoder_causal

    def layer_mixers(self) -> list[tuple[str, dict[str, Any]]]:
        """(mixer name, options) for each layer."""
        opts = self.mixer_options
        extra = {} if self.head_dim is None else {"head_dim": self.head_dim}
        if isinstance(self.mixer, str):
            return [(self.mixer, {**opts, **extra})] * self.n_layers  # type: ignore[dict-item]
        if isinstance(opts, list):
            return [(m, {**o, **extra}) for m, o in zip(self.mixer, opts, strict=True)]
        return [(m, {**opts.get(m, {}), **extra}) for m in self.mixer]

    def layer_n_heads(self, layer: int | None) -> int:
        """Query heads of layer ``layer`` (``n_heads`` unless pruning set ``layer_heads``; None: n_heads)."""
        return self.n_heads if layer is None or self.layer_heads is None else self.layer_heads[layer]

    def layer_mod_capacity(self, layer: int) -> float | None:
        """Mixture-of-Depths capacity of layer ``layer``, or None for a plain block."""
        return self.mod_capacity[layer] if isinstance(self.mod_capacity, list) else self.mod_capacity

    def to_json(self) -> str:
        """The config as a JSON string."""
        return json.dumps(self.model_dump(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """Parse and validate a JSON config."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError("config.json", text[:40], f"valid JSON ({e})") from None
        return build_config(data)


def build_config(data: dict[str, Any] | ModelConfig | None = None, **overrides: Any) -> ModelConfig:
    """A validated ModelConfig from a dict plus overrides; checks names and capabilities too."""
    if isinstance(data, ModelConfig):
        data = data.model_dump()
    if data is not None and not isinstance(data, dict):
        raise ConfigError("config", type(data).__name__, "a dict of config fields (or a ModelConfig, or a preset name "
                          "for create_model)")
    merged = {**(data or {}), **overrides}
    try:
        cfg = ModelConfig.model_validate(merged)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, CrossFieldError):  # our own cross-field checks name their field
            raise ConfigError(cause.field, merged.get(cause.field), str(cause)) from None
        raise config_error(e, "", ModelConfig) from None
    check_parts(cfg)
    return cfg


def check_parts(cfg: ModelConfig) -> None:
    """Refuse unknown part names, bad part options and impossible combinations, with the reason."""
    pos_cls = POSITIONALS.get(cfg.positional)
    validate_options(pos_cls.Options, cfg.positional_options, f"positional_options[{cfg.positional}]")
    if getattr(NORMS.get(cfg.norm), "mixes_tokens", False) and cfg.causal:
        raise ConfigError("norm", cfg.norm, "this norm takes statistics over all tokens, so a causal model would "
                          "see the future through it; use layernorm or rmsnorm")
    ffn_cls = FFNS.get(cfg.ffn)
    if getattr(ffn_cls, "needs_grid", False):
        raise ConfigError("ffn", cfg.ffn, "this FFN convolves a 2-D grid of image patches; use it in an image model "
                          "(models/vision.py) or pick gelu, swiglu, ...")
    if cfg.ffn_options and not ffn_cls.Options.model_fields:
        raise ConfigError("ffn_options", cfg.ffn_options, f"ffn {cfg.ffn!r} takes no options; leave it empty")
    if ffn_cls.Options.model_fields:
        ffn_opts = validate_options(ffn_cls.Options, cfg.ffn_options, "ffn_options")
        if getattr(ffn_opts, "pregated", False) and cfg.mod_capacity is not None:
            raise ConfigError("ffn_options.pregated", True, "not with mod_capacity: Mixture-of-Depths gives each "
                              "layer other tokens, so one layer cannot route the next one's")
        widths = getattr(ffn_opts, "layer_widths", None)
        if widths is not None and len(widths) != cfg.n_layers:
            raise ConfigError("ffn_options.layer_widths", widths, f"one width per layer (n_layers={cfg.n_layers})")
        with torch.device("meta"):  # its own checks (e.g. routing vs causal), allocating nothing
            ffn_cls(cfg.d_model, cfg.ffn_mult, cfg.dropout, options=ffn_opts, causal=cfg.causal)
    for field, value, part, kw in (("norm_eps", cfg.norm_eps, NORMS.get(cfg.norm), "eps"),
                                   ("ffn_bias", cfg.ffn_bias, FFNS.get(cfg.ffn), "bias")):
        if value is not None and kw not in inspect.signature(part).parameters:
            raise ConfigError(field, value, f"{part.__name__} takes no {kw!r}; leave {field} unset (None) for it")
    if cfg.layer_ffn_hidden is not None and "hidden" not in inspect.signature(FFNS.get(cfg.ffn)).parameters:
        raise ConfigError("layer_ffn_hidden", cfg.layer_ffn_hidden, f"ffn {cfg.ffn!r} takes no hidden width; "
                          "leave layer_ffn_hidden unset (None)")
    if cfg.head_dim is not None:
        for name, _ in cfg.layer_mixers():
            if "head_dim" not in MIXERS.get(name).Options.model_fields:
                raise ConfigError("head_dim", cfg.head_dim, f"mixer {name!r} has no head_dim option; leave head_dim "
                                  "unset (None: d_model // n_heads)")
    per_layer = isinstance(cfg.mixer, list)
    checked: set[str] = set()
    for i, (name, opts) in enumerate(cfg.layer_mixers()):
        cls = MIXERS.get(name)
        where = f"mixer_options[{i}]" if per_layer and isinstance(cfg.mixer_options, list) else f"mixer_options[{name}]"
        validated = validate_options(cls.Options, opts, where)
        if validated.form != "auto" and validated.form not in cls.capabilities.forms:
            raise ConfigError(f"{where}.form", validated.form, form_why_not(name, cls.capabilities, validated.form)[0])
        reasons = cls.capabilities.why_not(name, causal=cfg.causal, positional=pos_cls.kind, grid=False)
        if reasons:
            layer = f"layer {i}: " if per_layer else ""
            raise CapabilityError(layer + "; ".join(reasons))
        key = f"{name}:{cfg.layer_n_heads(i)}:{validated.model_dump_json()}"
        if key not in checked:  # layers with the same mixer, heads and options need one trial build
            checked.add(key)
            _check_constructor(cls, cfg, validated, cfg.layer_n_heads(i))


def _check_constructor(cls, cfg: ModelConfig, options, n_heads: int | None = None) -> None:
    """Run the mixer's own constructor checks (e.g. n_kv_heads dividing n_heads) on the meta device, so
    a config that cannot build is refused here, before any weight is allocated."""
    try:
        with torch.device("meta"):
            cls(cfg.d_model, n_heads or cfg.n_heads, causal=cfg.causal, options=options, dropout=cfg.attn_dropout,
                max_len=cfg.max_len)
    except EfformerError:
        raise
    except Exception:  # noqa: BLE001 - a constructor meta tensors cannot run (e.g. .item()); the real build checks
        pass
