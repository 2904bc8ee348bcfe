"""The shared trunk of every model: token embedding, positional scheme, blocks, final norm."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from efformer.errors import CapabilityError, ShapeError
from efformer.models.block import live_dropout, norm_factory
from efformer.models.cache import Cache
from efformer.models.config import ModelConfig
from efformer.models.depth import MoDBlock, make_block
from efformer.nn.moe import link_pregated
from efformer.nn.positional import build_positional, segment_positions


class Backbone(nn.Module):
    """Embeddings -> N blocks -> final norm; any mixer, positional scheme, norm and FFN by name."""

    reducer = None  # efformer.reduce's hook between blocks (token merging/pruning); None = off

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = build_positional(
            cfg.positional, cfg.d_model, cfg.n_heads, cfg.max_len, cfg.causal, cfg.positional_options, cfg.head_dim
        )
        self.blocks = nn.ModuleList(make_block(cfg, i, name, opts) for i, (name, opts) in enumerate(cfg.layer_mixers()))
        for blk in self.blocks:
            if hasattr(blk, "bind_positional"):  # Mixture-of-Depths rebuilds the context of its chosen tokens
                blk.bind_positional(self.pos)
        link_pregated([blk.ffn for blk in self.blocks])  # pre-gated MoE: each layer routes the next
        norm = norm_factory(cfg)
        # post-LN and DeepNorm end every block with a norm already; Peri-LN also normalises embeddings
        self.final_norm = nn.Identity() if cfg.norm_placement in ("post", "deepnorm") else norm(cfg.d_model)
        self.embed_norm = norm(cfg.d_model) if cfg.norm_placement == "peri" or cfg.embed_norm else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        self.exit_hidden: dict[int, Tensor] = {}
        self.apply(_init_weights)

    @property
    def can_decode(self) -> bool:
        """Whether every layer's mixer has a decode state (else generation recomputes)."""
        return all(b.mixer.capabilities.decode for b in self.blocks)

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """Token ids (b, n) -> embeddings (b, n, d)."""
        check_tensor("input_ids", ids)
        if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 2:
            raise ShapeError(f"input ids must be an integer tensor (batch, seq), got {ids.dtype} {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ShapeError(
                f"token id {int(ids.max()) if int(ids.max()) >= self.cfg.vocab_size else int(ids.min())} "
                f"is outside the vocabulary [0, {self.cfg.vocab_size}); check the tokenizer or vocab_size"
            )
        return self.embed(ids)

    def forward(
        self, h: Tensor, *, mask: Tensor | None = None, positions: Tensor | None = None, cache: Cache | None = None,
        segments: Tensor | None = None,
    ) -> Tensor:
        """Embeddings (b, n, d) -> hidden states (b, n, d); ``cache`` is updated in place.

        ``segments`` (b, n) integer ids pack several sequences per row (no cache): positions restart
        per segment by default and every mixer must declare ``capabilities.packing``."""
        b, n, _ = h.shape
        if segments is not None:
            check_packed(segments, (b, n), cache, self.blocks)
            if positions is None:
                positions = segment_positions(segments)
        check_tensor("mask", mask, optional=True)
        check_tensor("positions", positions, optional=True)
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != (b, n):
                raise ShapeError(f"mask must be a bool keep-mask ({b}, {n}), got {mask.dtype} {tuple(mask.shape)}")
            if cache is None:  # (a cached step may be all padding: left-padded prompts arrive in pieces)
                empty = (~mask.any(1)).nonzero().flatten()
                if empty.numel():
                    raise ShapeError(f"mask row {int(empty[0])} is all False (keeps no token); a keep-mask marks "
                                     "real tokens True, and every row needs at least one")
        if positions is not None:
            if positions.dtype not in (torch.int32, torch.int64) or tuple(positions.shape) != (b, n):
                raise ShapeError(f"positions must be an integer tensor ({b}, {n}) like the input ids, got "
                                 f"{positions.dtype} {tuple(positions.shape)}")
            if positions.numel() and int(positions.min()) < 0:
                raise ShapeError(f"positions must be >= 0, got {int(positions.min())}")
        if positions is None:
            positions = default_positions(b, n, mask, h.device)
            if cache is not None:
                positions = positions + cache.next_position[:, None]
        if self.pos.kind == "embedding":
            h = h + self.pos.embed(positions).to(h.dtype)
        h = live_dropout(self.drop)(self.embed_norm(h))
        mask_all_true = mask is not None and bool(mask.all())
        layer_mask = None if mask_all_true else mask
        # Once per forward: rotary tables or the bias scheme, shared by every layer.
        context = self.pos.context(positions, h.dtype)
        context.segments = segments
        exits = set(self.cfg.exit_layers or ())
        self.exit_hidden = {}  # early exit: hidden states (b, n, d) after the exit layers, for their heads
        red = self.reducer if cache is None else None
        if red is not None:
            h, layer_mask, context = red.begin(h, layer_mask, context)
        for i, block in enumerate(self.blocks):
            state = cache.states[i] if cache is not None else None
            h, state = block(h, mask=layer_mask, state=state, positions=context)
            if i in exits or (exits and i == len(self.blocks) - 1):  # the last: the teacher of distillation
                self.exit_hidden[i] = h
            if red is not None and i + 1 < len(self.blocks):  # (exit layers are refused with a reducer)
                h, layer_mask, context = red.between(self.blocks, i, h, layer_mask, context)
        if red is not None:
            h = red.end(h)  # the full length again (each token gets the merged token it went into)
        if cache is not None:
            step = mask.sum(1) if mask is not None else n  # (an int: no tensor made per decode step)
            cache.next_position = cache.next_position + step
        return self.final_norm(h)

    def new_cache(self, batch: int, device=None, dtype=None) -> Cache:
        """An empty decode cache for ``batch`` rows."""
        p = next(self.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        return Cache(
            states=[blk.mixer.init_state(batch, device, dtype) for blk in self.blocks],
            next_position=torch.zeros(batch, dtype=torch.long, device=device),
        )


def check_packed(segments, shape: tuple[int, int], cache, blocks) -> None:
    """A ShapeError/CapabilityError unless ``segments`` can pack this batch: (b, n) integers, no cache,
    and every layer's mixer declares packing (else the caller pads)."""
    check_tensor("segments", segments)
    if segments.dtype not in (torch.int32, torch.int64) or tuple(segments.shape) != shape:
        raise ShapeError(f"segments must be an integer tensor {shape} like the input ids, got "
                         f"{segments.dtype} {tuple(segments.shape)}")
    if cache is not None:
        raise CapabilityError("segments (packed rows) run without a cache; prefill each sequence into its own row")
    if any(isinstance(b, MoDBlock) for b in blocks):
        raise CapabilityError("Mixture-of-Depths blocks route tokens across the whole row, so they cannot run "
                              "packed rows; pad the sequences into separate rows instead")
    bad = [b.mixer.name for b in blocks if not b.mixer.capabilities.packing]
    if bad:
        raise CapabilityError(f"mixers {sorted(set(bad))} cannot run packed rows (capabilities.packing is "
                              "False); pad the sequences into separate rows instead")


def default_positions(b: int, n: int, mask: Tensor | None, device) -> Tensor:
    """Positions (b, n) counting only kept tokens, so left padding does not shift real positions."""
    if mask is None:
        return torch.arange(n, device=device).expand(b, n)
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)


def check_tensor(name: str, x, optional: bool = False) -> None:
    """A ShapeError unless ``x`` is a torch tensor (or None when ``optional``): lists are refused by name."""
    if x is None and optional:
        return
    if not isinstance(x, Tensor):
        hint = " (wrap token lists with torch.tensor(ids))" if isinstance(x, list | tuple) else ""
        raise ShapeError(f"{name} must be a torch.Tensor, got {type(x).__name__}{hint}")
