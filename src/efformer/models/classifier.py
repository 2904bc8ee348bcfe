"""Sequence classifier (the LRA head) and dual-encoder matcher (the LRA retrieval head)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from efformer.errors import CapabilityError, ShapeError
from efformer.models.backbone import Backbone, check_tensor
from efformer.models.config import ModelConfig


class _Encoder(nn.Module):
    """Backbone plus pooling: token ids (b, n) -> pooled vector (b, d)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        if cfg.pooling == "cls":
            self.cls = nn.Parameter(torch.randn(cfg.d_model) * 0.02)

    def encode(self, input_ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """Pooled representation (b, d): CLS vector or mean over kept tokens."""
        check_tensor("input_ids", input_ids)
        h = self.backbone.embed_tokens(input_ids)
        # A learned CLS vector: first in a bidirectional encoder, last in a causal one (where only
        # the last position has seen every token).
        at_end = self.cfg.encoder_causal
        if self.cfg.pooling == "cls":
            b = h.shape[0]
            cls = self.cls.expand(b, 1, -1).to(h.dtype)
            h = torch.cat([h, cls] if at_end else [cls, h], dim=1)
            if mask is not None:
                one = mask.new_ones(b, 1)
                mask = torch.cat([mask, one] if at_end else [one, mask], dim=1)
        h = self.backbone(h, mask=mask)
        if self.cfg.pooling == "cls":
            return h[:, -1] if at_end else h[:, 0]
        if mask is None:
            return h.mean(1)
        w = mask[..., None].to(h.dtype)
        return (h * w).sum(1) / w.sum(1).clamp(min=1)


    def generate(self, *args, **kwargs):
        """Encoders do not generate: a CapabilityError that says what can."""
        raise CapabilityError(f"{type(self).__name__} (task={self.cfg.task!r}) is an encoder and cannot generate; "
                              "build a language model (task='lm', e.g. create_model('lm-tiny')) to generate tokens")


def _head(d_in: int, d: int, n_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d), nn.ReLU(), nn.Linear(d, n_classes))


class SequenceClassifier(_Encoder):
    """Token ids (b, n) [+ keep-mask] -> class logits (b, n_classes)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.head = _head(cfg.d_model, cfg.d_model, cfg.n_classes)

    def forward(self, input_ids: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """Class logits (b, n_classes)."""
        return self.head(self.encode(input_ids, mask))


class DualEncoderClassifier(_Encoder):
    """Two sequences through one shared tower -> logits (b, n_classes) from [u, v(, u*v, u-v)]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        k = 4 if cfg.dual_features == "uv_prod_diff" else 2
        self.head = _head(k * cfg.d_model, cfg.d_model, cfg.n_classes)

    def forward(
        self, ids1: Tensor, ids2: Tensor, *, mask1: Tensor | None = None, mask2: Tensor | None = None
    ) -> Tensor:
        """Class logits (b, n_classes) for the pair (ids1, ids2)."""
        check_tensor("ids1", ids1)
        check_tensor("ids2", ids2)
        if ids1.dim() == 2 and ids2.dim() == 2 and ids1.shape[0] != ids2.shape[0]:
            raise ShapeError(f"ids1 and ids2 must hold the same number of rows (pairs), got batch {ids1.shape[0]} "
                             f"and {ids2.shape[0]}")
        u, v = self.encode(ids1, mask1), self.encode(ids2, mask2)
        feats = [u, v, u * v, u - v] if self.cfg.dual_features == "uv_prod_diff" else [u, v]
        return self.head(torch.cat(feats, dim=-1))
