"""Encoder models with the heads of BERT ("BERT: Pre-training of Deep Bidirectional Transformers for
Language Understanding") and RoBERTa ("RoBERTa: A Robustly Optimized BERT Pretraining Approach"):
the masked-LM head and the first-token sequence-classification head, on any efformer backbone."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from efformer.errors import CapabilityError
from efformer.models.backbone import Backbone
from efformer.models.block import norm_factory
from efformer.models.config import ModelConfig

_ACTS = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}


class MaskedLMHead(nn.Module):
    """dense -> activation -> norm -> vocab projection: hidden (b, n, d) -> logits (b, n, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = _ACTS[cfg.ffn]
        self.norm = norm_factory(cfg)(cfg.d_model)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, h: Tensor) -> Tensor:
        """(b, n, d) -> (b, n, vocab)."""
        return self.decoder(self.norm(self.act(self.dense(h))))


class FirstTokenHead(nn.Module):
    """tanh(dense(h[:, 0])) -> class logits: hidden (b, n, d) -> (b, n_classes) (BERT's pooler, RoBERTa's head)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.n_classes)

    def forward(self, h: Tensor) -> Tensor:
        """(b, n, d) -> (b, n_classes)."""
        return self.out(torch.tanh(self.dense(h[:, 0])))


class _EncoderWithHead(nn.Module):
    """A bidirectional backbone and one head; token ids (b, n) [+ keep-mask] -> the head's output."""

    head_class: type[nn.Module]

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.head = self.head_class(cfg)

    def forward(self, input_ids: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """The head's logits for token ids (b, n) with an optional bool keep-mask (b, n)."""
        return self.head(self.backbone(self.backbone.embed_tokens(input_ids), mask=mask))

    def generate(self, *args, **kwargs):
        """Encoders do not generate: a CapabilityError that says what can."""
        raise CapabilityError(f"{type(self).__name__} is an encoder and cannot generate; import a decoder "
                              "(Llama, Mistral, Qwen2, GPT-2) to generate tokens")


class MaskedLM(_EncoderWithHead):
    """Masked language model: token ids (b, n) -> logits (b, n, vocab) at every position."""

    head_class = MaskedLMHead


class FirstTokenClassifier(_EncoderWithHead):
    """Sequence classifier on the first token's state: token ids (b, n) -> class logits (b, n_classes)."""

    head_class = FirstTokenHead
