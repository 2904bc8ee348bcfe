"""Image classifiers built from the same blocks as the text models: ViT, DeiT and staged pyramids.

Papers: "An Image is Worth 16x16 Words" (ViT); "Training data-efficient image transformers &
distillation through attention" (DeiT: the distillation token); "Swin Transformer", "Pyramid Vision
Transformer", "MetaFormer Is Actually What You Need for Vision" and "Rethinking Spatial Dimensions of
Vision Transformers" (PiT) (stages joined by patch merging or pooling); "XCiT: Cross-Covariance Image
Transformers" (a local patch interaction branch in each block).

Images (b, c, H, W) become patch tokens on an (h, w) grid; each stage is a stack of
:class:`~efformer.models.block.Block` with any mixer by name, given the grid through
``PositionalContext.grid``; between stages the grid is halved and the width changed. The presets are
CPU-sized (32 x 32 inputs) versions of the papers' tiny models: same layout, fewer channels.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Literal

import pydantic
import torch
from torch import Tensor, nn

from efformer.errors import CapabilityError, ConfigError, UnknownNameError
from efformer.mixers.vision_xcit import LocalPatchInteraction
from efformer.models.block import Block, norm_factory
from efformer.models.config import CrossFieldError, ModelConfig, Placement, StrictInt
from efformer.nn.patch import (
    ConditionalPosition,
    PatchEmbed,
    PatchMerge,
    PoolingMerge,
    check_images,
    resize_table,
    rope_2d,
    sincos_2d,
)
from efformer.nn.positional import PositionalContext
from efformer.options import StrictModel, config_error, validate_options
from efformer.registry import FFNS, MIXERS, NORMS


class StageConfig(StrictModel):
    """One stage of an image model: ``depth`` blocks of width ``d_model`` on one grid."""

    depth: StrictInt = pydantic.Field(2, gt=0)
    d_model: StrictInt = pydantic.Field(64, gt=0)
    n_heads: StrictInt = pydantic.Field(4, gt=0)
    # One mixer for every block of the stage, or one per block (e.g. Swin's plain and shifted windows).
    mixer: str | list[str] = "softmax"
    mixer_options: dict[str, Any] | list[dict[str, Any]] = {}
    ffn_mult: float | None = pydantic.Field(None, gt=0)  # None: the model's (PVT sets one per stage)
    lpi: bool = False  # XCiT: a local patch interaction branch between each block's mixer and FFN


class VisionConfig(StrictModel):
    """Everything needed to build an image classifier; round-trips through JSON."""

    task: Literal["image"] = "image"
    image_size: StrictInt = pydantic.Field(32, gt=0)  # the size learned positions are made for
    in_channels: StrictInt = pydantic.Field(3, gt=0)
    patch_size: StrictInt = pydantic.Field(4, gt=0)
    stem: Literal["linear", "conv"] = "linear"
    # linear stem: kernel > patch_size with padding overlaps patches (PVT v2: 7 / 3; PoolFormer: 7 / 2)
    patch_kernel: StrictInt | None = pydantic.Field(None, gt=0)
    patch_padding: StrictInt = pydantic.Field(0, ge=0)
    patch_norm: bool = False  # a LayerNorm of the patch tokens (Swin, PVT)
    stages: list[StageConfig] = pydantic.Field(default_factory=lambda: [StageConfig()], min_length=1)
    # between stages: Swin's patch merging (V1 or V2 order), PVT's / MetaFormer's strided conv, or PiT's
    # pooling (strided depthwise conv; the class token crosses it through a linear map)
    merge: Literal["patch_merge", "patch_merge_v2", "conv", "pit"] = "patch_merge"
    merge_kernel: StrictInt = pydantic.Field(2, ge=2, le=7)  # conv merge: kernel, padded by (kernel - 1) // 2
    merge_norm: bool = True  # conv merge: LayerNorm after it (PoolFormer has none)
    merge_pre_norm: bool = False  # a LayerNorm closing each stage before the merge (PVT v2)
    # learned_stages: one learned table per stage, added after each merge (PVT)
    positional: Literal["none", "learned", "learned_stages", "sincos2d", "rope2d", "cpe"] = "learned"
    pooling: Literal["cls", "mean"] = "cls"
    class_token_stage: Literal["first", "last"] = "first"  # last: the class token joins at the last stage (PVT)
    norm_eps: float | None = pydantic.Field(None, gt=0)  # epsilon of every norm (None: each norm's default)
    layer_scale: float | None = pydantic.Field(None, gt=0)  # per-channel branch scales from this value (PoolFormer)
    distillation: bool = False  # DeiT: a second (distillation) token with its own head
    n_classes: StrictInt = pydantic.Field(10, gt=1)
    norm: str = "layernorm"
    norm_placement: Placement = "pre"
    ffn: str = "gelu"
    ffn_mult: float = pydantic.Field(4.0, gt=0)
    ffn_options: dict[str, Any] = {}  # of an FFN that has options (mixffn: relu)
    dropout: float = pydantic.Field(0.0, ge=0, lt=1)
    attn_dropout: float = pydantic.Field(0.0, ge=0, lt=1)

    @pydantic.model_validator(mode="after")
    def _check(self) -> VisionConfig:
        if self.image_size % self.patch_size:
            raise CrossFieldError("patch_size", f"patch_size={self.patch_size} does not divide "
                                  f"image_size={self.image_size}")
        if self.stem == "conv" and self.patch_size & (self.patch_size - 1):
            raise CrossFieldError("patch_size", f"patch_size={self.patch_size} must be a power of 2 for stem='conv' "
                                  "(one stride-2 convolution per halving); use stem='linear' for other sizes")
        if self.pooling == "cls" and len(self.stages) > 1 and self.class_token_stage == "first" \
                and self.merge != "pit":
            raise CrossFieldError("pooling", "pooling='cls' needs one stage (patch merging has no place for a "
                                  "class token); use pooling='mean' for a staged model, "
                                  "class_token_stage='last' (PVT), or merge='pit' (PiT: a linear map carries it)")
        widths = [s.d_model for s in self.stages]
        if self.merge == "pit" and any(b % a for a, b in zip(widths[:-1], widths[1:], strict=True)):
            raise CrossFieldError("stages", f"merge='pit' with widths {widths}: PiT's depthwise pooling (groups = "
                                  "input channels) widens each stage by a whole factor; make each d_model a "
                                  "multiple of the last")
        if any(s.lpi for s in self.stages) and self.norm_placement != "pre":
            raise CrossFieldError("norm_placement", f"norm_placement={self.norm_placement!r}: XCiT's local patch "
                                  "interaction (stages[i].lpi) is a pre-norm branch; use norm_placement='pre'")
        if self.patch_kernel is not None and not 1 <= self.patch_kernel - 2 * self.patch_padding <= self.patch_size:
            raise CrossFieldError("patch_kernel", f"patch_kernel={self.patch_kernel} with patch_padding="
                                  f"{self.patch_padding} must satisfy 1 <= kernel - 2 padding <= patch_size="
                                  f"{self.patch_size}, so the grid stays image_size / patch_size")
        if self.distillation and self.pooling != "cls":
            raise CrossFieldError("distillation", "the distillation token needs pooling='cls'")
        return self

    def to_json(self) -> str:
        """The config as a JSON string (what save writes to config.json)."""
        return json.dumps(self.model_dump(), indent=2, sort_keys=True)

    def grid(self) -> int:
        """Side of the first stage's token grid at ``image_size``."""
        return self.image_size // self.patch_size

    def stage_grids(self) -> list[int]:
        """Side of each stage's grid at ``image_size`` (merges halve it, rounding up)."""
        sides = [self.grid()]
        for _ in self.stages[1:]:
            sides.append(-(-sides[-1] // 2))
        return sides

    def class_stage(self) -> int | None:
        """The stage whose tokens include the class (and distillation) token, or None."""
        if self.pooling != "cls":
            return None
        return 0 if self.class_token_stage == "first" else len(self.stages) - 1

    def class_stages(self) -> range:
        """Every stage holding the class token: from where it joins on (PiT's merges carry it), else that one."""
        first = self.class_stage()
        if first is None:
            return range(0)
        return range(first, len(self.stages) if self.merge == "pit" else first + 1)

    def stage_config(self, i: int) -> ModelConfig:
        """Stage ``i`` as a ModelConfig for its blocks (their mixers, norms and FFN)."""
        s = self.stages[i]
        # one mixer name with per-block options (Swin's alternating shifts) is that name in every block
        mixer = [s.mixer] * s.depth if isinstance(s.mixer, str) and isinstance(s.mixer_options, list) else s.mixer
        return ModelConfig.model_validate(dict(
            task="classifier", d_model=s.d_model, n_heads=s.n_heads, n_layers=s.depth, mixer=mixer,
            mixer_options=s.mixer_options, positional="none", norm=self.norm, norm_placement=self.norm_placement,
            ffn=self.ffn, ffn_mult=s.ffn_mult or self.ffn_mult, ffn_options=self.ffn_options, dropout=self.dropout,
            attn_dropout=self.attn_dropout,
            max_len=max(self.grid() ** 2, 1) + 2, norm_eps=self.norm_eps, layer_scale=self.layer_scale))


def build_vision_config(data: dict[str, Any] | VisionConfig | None = None, **overrides: Any) -> VisionConfig:
    """A validated VisionConfig; ``mixer=``/``mixer_options=`` overrides set every stage's. Checks the parts."""
    merged = (data.model_dump() if isinstance(data, VisionConfig) else copy.deepcopy(data or {})) | {}
    for key in ("mixer", "mixer_options"):
        if key in overrides:
            value = overrides.pop(key)
            merged["stages"] = [{**s, key: value} for s in merged.get("stages", [StageConfig().model_dump()])]
    merged.update(overrides)
    try:
        cfg = VisionConfig.model_validate(merged)
    except pydantic.ValidationError as e:
        cause = e.errors()[0].get("ctx", {}).get("error")
        if isinstance(cause, CrossFieldError):
            raise ConfigError(cause.field, merged.get(cause.field), str(cause)) from None
        raise config_error(e, "", VisionConfig) from None
    NORMS.get(cfg.norm)
    if FFNS.get(cfg.ffn).Options.model_fields or cfg.ffn_options:
        validate_options(FFNS.get(cfg.ffn).Options, cfg.ffn_options, "ffn_options")
    kind = "rotary" if cfg.positional == "rope2d" else "none"
    for i, s in enumerate(cfg.stages):
        try:
            mcfg = cfg.stage_config(i)
        except pydantic.ValidationError as e:
            cause = e.errors()[0].get("ctx", {}).get("error")
            msg = str(cause) if isinstance(cause, CrossFieldError) else e.errors()[0]["msg"]
            raise ConfigError(f"stages[{i}]", s.model_dump(), msg) from None
        for j, (name, opts) in enumerate(mcfg.layer_mixers()):
            cls = MIXERS.get(name)
            validated = validate_options(cls.Options, opts, f"stages[{i}].mixer_options[{j}]")
            reasons = cls.capabilities.why_not(name, causal=False, positional=kind, grid=True)
            if reasons:
                raise CapabilityError(f"stage {i} block {j}: " + "; ".join(reasons))
            n_extra = (1 + cfg.distillation) if i in cfg.class_stages() else 0
            lead = getattr(validated, "leading_tokens", 0)
            if cls.capabilities.grid and n_extra and lead != n_extra:
                raise ConfigError("pooling", "cls", f"stage {i} uses the 2-D mixer {name!r}, which takes only patch "
                                  "tokens (no class token); use pooling='mean'")
            if cls.capabilities.grid and lead != n_extra:
                raise ConfigError(f"stages[{i}].mixer_options[{j}].leading_tokens", lead, f"stage {i} has {n_extra} "
                                  "class/distillation tokens before its grid; set leading_tokens to that")
    return cfg


class ImageClassifier(nn.Module):
    """Images (b, c, H, W) -> class logits (b, n_classes): patch tokens, staged blocks, pooling, head."""

    reducer = None  # efformer.reduce's hook between blocks (token merging/pruning); None = off

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        s0 = cfg.stages[0]
        eps = {} if cfg.norm_eps is None else {"eps": cfg.norm_eps}
        self.patch = PatchEmbed(cfg.in_channels, s0.d_model, cfg.patch_size, cfg.stem, kernel=cfg.patch_kernel,
                                padding=cfg.patch_padding, norm=cfg.patch_norm, **eps)
        self.n_extra = (1 + cfg.distillation) if cfg.pooling == "cls" else 0
        self.cls_stage = cfg.class_stage()
        d_cls = cfg.stages[self.cls_stage or 0].d_model
        if self.n_extra:
            self.extra = nn.Parameter(torch.randn(self.n_extra, d_cls) * 0.02)
        if cfg.positional == "learned":
            self.pos_table = nn.Parameter(torch.randn(cfg.grid() ** 2, s0.d_model) * 0.02)
        if cfg.positional == "learned_stages":
            self.stage_pos = nn.ParameterList(nn.Parameter(torch.randn(g * g, s.d_model) * 0.02)
                                              for g, s in zip(cfg.stage_grids(), cfg.stages, strict=True))
        if cfg.positional in ("learned", "learned_stages") and self.n_extra:
            self.pos_extra = nn.Parameter(torch.randn(self.n_extra, d_cls) * 0.02)
        self.stages = nn.ModuleList()
        self.cpe = nn.ModuleList()
        self.merges = nn.ModuleList()
        for i, s in enumerate(cfg.stages):
            mcfg = cfg.stage_config(i)
            block = XCiTBlock if s.lpi else Block
            self.stages.append(nn.ModuleList(block(mcfg, name, opts) for name, opts in mcfg.layer_mixers()))
            self.cpe.append(ConditionalPosition(s.d_model) if cfg.positional == "cpe" else nn.Identity())
            if i and cfg.merge == "pit":
                self.merges.append(PoolingMerge(cfg.stages[i - 1].d_model, s.d_model))
            elif i:
                self.merges.append(PatchMerge(cfg.stages[i - 1].d_model, s.d_model, cfg.merge, kernel=cfg.merge_kernel,
                                              norm=cfg.merge_norm, pre_norm=cfg.merge_pre_norm, **eps))
        d = cfg.stages[-1].d_model
        self.final_norm = NORMS.get(cfg.norm)(d, **eps)
        self.head = nn.Linear(d, cfg.n_classes)
        if cfg.distillation:
            self.head_dist = nn.Linear(d, cfg.n_classes)

    def _context(self, b: int, h: int, w: int, extra: int, head_dim: int, dtype, device) -> PositionalContext:
        n = h * w + extra
        rotation = (rope_2d(h, w, extra, head_dim, b, dtype, device)
                    if self.cfg.positional == "rope2d" else None)
        return PositionalContext(torch.arange(n, device=device).expand(b, n), rotation=rotation,
                                 grid=(h, w))  # after ``extra`` class tokens (CvT's mixer takes them)

    def features(self, images: Tensor) -> Tensor:
        """Pooled features (b, d_last), or (b, 2, d_last) [class, distillation] with DeiT's token."""
        check_images(images, self.cfg.in_channels, self.cfg.patch_size)
        g = self.patch(images)  # (b, h, w, d)
        b, h, w, d = g.shape
        tok = g.reshape(b, h * w, d)
        if self.cfg.positional == "sincos2d":
            tok = tok + sincos_2d(h, w, d, images.device).to(tok.dtype)
        elif self.cfg.positional == "learned":
            tok = tok + resize_table(self.pos_table, self.cfg.grid(), self.cfg.grid(), h, w).to(tok.dtype)
        sides, extra = self.cfg.stage_grids(), 0
        for i, blocks in enumerate(self.stages):
            carried = None  # class tokens that crossed a PiT pooling merge (through its linear map)
            if i:
                carried, tok = tok[:, :extra], tok[:, extra:]
                g = self.merges[i - 1](tok.reshape(b, h, w, -1))
                carried = self.merges[i - 1].lead(carried) if extra else None
                h, w = g.shape[1:3]
                tok = g.reshape(b, h * w, -1)
            if self.cfg.positional == "learned_stages":
                tok = tok + resize_table(self.stage_pos[i], sides[i], sides[i], h, w).to(tok.dtype)
            extra = self.n_extra if i in self.cfg.class_stages() else 0
            if carried is not None:
                tok = torch.cat([carried, tok], 1)
            elif extra:
                lead = self.extra + (self.pos_extra if hasattr(self, "pos_extra") else 0)
                tok = torch.cat([lead.to(tok.dtype).expand(b, -1, -1), tok], 1)
            ctx = self._context(b, h, w, extra, self.cfg.stages[i].d_model // self.cfg.stages[i].n_heads, tok.dtype,
                                images.device)
            red = self.reducer
            if red is not None:
                tok, _, ctx = red.begin(tok, None, ctx, first=i == 0)
            for j, block in enumerate(blocks):
                tok, _ = block(tok, mask=None, state=None, positions=ctx)
                if red is not None and j + 1 < len(blocks):
                    tok, _, ctx = red.between(blocks, j, tok, None, ctx)
                if j == 0 and self.cfg.positional == "cpe":  # PEG after the first block of each stage
                    grid = self.cpe[i](tok[:, extra:].reshape(b, h, w, -1))
                    tok = torch.cat([tok[:, :extra], grid.reshape(b, h * w, -1)], 1)
            if red is not None:
                tok = red.end(tok)  # the full grid again, for patch merging and pooling
        tok = self.final_norm(tok)
        if self.cfg.distillation:
            return tok[:, :2]
        return tok[:, 0] if self.n_extra else tok.mean(1)

    def forward(self, images: Tensor, *, both_heads: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (b, n_classes); with DeiT's token, the mean of both heads, or both with ``both_heads``."""
        f = self.features(images)
        if not self.cfg.distillation:
            return self.head(f)
        cls_logits, dist_logits = self.head(f[:, 0]), self.head_dist(f[:, 1])
        return (cls_logits, dist_logits) if both_heads else (cls_logits + dist_logits) / 2


class XCiTBlock(Block):
    """XCiT's layer (pre-norm): x + mixer(norm1 x), then x + LPI(norm3 x) on the grid, then x + ffn(norm2 x).

    A class token passes XCA and the FFN but not LPI. XCiT itself adds its class token only after these
    layers, in two CaiT class-attention layers, which are not built here; ``xcit-tiny`` mean-pools instead,
    since a class token read after the last block would leave that block's LPI with no gradient.
    """

    def __init__(self, cfg: ModelConfig, mixer_name: str, mixer_options: dict):
        super().__init__(cfg, mixer_name, mixer_options)
        self.norm3 = norm_factory(cfg)(cfg.d_model)
        self.lpi = LocalPatchInteraction(cfg.d_model, **({} if cfg.norm_eps is None else {"eps": cfg.norm_eps}))
        if cfg.layer_scale is not None:  # XCiT scales all three branches
            self.scale3 = nn.Parameter(torch.full((cfg.d_model,), cfg.layer_scale))

    def forward(self, x: Tensor, *, mask, state, positions: PositionalContext):
        """(b, k + h*w, d) -> (b, k + h*w, d); the k class tokens take no LPI update."""
        def scaled(h, i):
            return h * getattr(self, f"scale{i}").to(h.dtype) if hasattr(self, "scale1") else h

        y, state = self.mixer(self.norm1(x), mask=mask, state=state, positions=positions)
        x = x + self.drop(scaled(y, 1))
        x = x + self.drop(scaled(self.lpi(self.norm3(x), positions), 3))
        h = self.norm2(x)
        h = self.ffn(h, positions=positions) if getattr(self.ffn, "takes_positions", False) else self.ffn(h)
        return x + self.drop(scaled(h, 2)), state


def _swin_stage(depth: int, d: int, heads: int, window: int) -> dict[str, Any]:
    """A Swin stage: blocks alternate plain and shifted (by window // 2) windows."""
    opts = [{"window": window, "shift": (j % 2) * (window // 2)} for j in range(depth)]
    return dict(depth=depth, d_model=d, n_heads=heads, mixer="swin", mixer_options=opts)


def _stages(mixer: str, depths, dims, heads, options=None) -> list[dict[str, Any]]:
    return [dict(depth=a, d_model=b, n_heads=c, mixer=mixer, mixer_options=(options or [{}] * len(depths))[i])
            for i, (a, b, c) in enumerate(zip(depths, dims, heads, strict=True))]


VISION_PRESETS: dict[str, dict[str, Any]] = {
    "vit-tiny": dict(patch_size=4, stages=[dict(depth=4, d_model=64, n_heads=4)], positional="learned",
                     pooling="cls"),
    "deit-tiny": dict(patch_size=4, stages=[dict(depth=4, d_model=64, n_heads=4)], positional="learned",
                      pooling="cls", distillation=True),
    "swin-tiny": dict(patch_size=2, stages=[_swin_stage(2, 32, 2, 4), _swin_stage(2, 64, 4, 4),
                                            _swin_stage(2, 128, 8, 4)],
                      merge="patch_merge", positional="none", pooling="mean"),
    "pvt-tiny": dict(patch_size=2, stages=_stages("sra", (2, 2, 2), (32, 64, 128), (1, 2, 4),
                                                  [{"ratio": 4}, {"ratio": 2}, {"ratio": 1}]),
                     merge="conv", positional="learned", pooling="mean"),
    "pit-tiny": dict(patch_size=2, stages=_stages("softmax", (2, 2, 2), (32, 64, 128), (2, 4, 8)), merge="pit",
                     positional="learned", pooling="cls"),
    "xcit-tiny": dict(patch_size=4, stem="conv", stages=[dict(depth=4, d_model=64, n_heads=4, mixer="xca", lpi=True)],
                      positional="sincos2d", pooling="mean", layer_scale=1.0),  # see XCiTBlock on pooling
    "poolformer-s12": dict(patch_size=2, stages=_stages("pool", (2, 2, 6, 2), (32, 64, 96, 128), (1, 1, 1, 1)),
                           merge="conv", positional="none", pooling="mean"),
}


def create_image_model(preset_or_config: str | dict | VisionConfig = "vit-tiny", **overrides: Any) -> ImageClassifier:
    """An image classifier from a preset name (see VISION_PRESETS), a dict or a VisionConfig, with overrides."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in VISION_PRESETS:
            raise UnknownNameError("image preset", preset_or_config, VISION_PRESETS)
        preset_or_config = VISION_PRESETS[preset_or_config]
    return ImageClassifier(build_vision_config(preset_or_config, **overrides))
