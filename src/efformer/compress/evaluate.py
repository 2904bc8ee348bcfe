"""Perplexity of a causal LM over a token stream, with the window/stride protocol stated.

Protocol (that of HF's perplexity guide, and GPTQ's when ``stride == window``): windows of ``window``
tokens start every ``stride`` tokens; each window scores only the tokens no earlier window scored (the
last ``end - previous_end`` targets), so every token after the first is predicted exactly once, with at
least ``window - stride`` tokens of context when ``stride < window``. PPL = exp(mean NLL).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.errors import ConfigError, DataError


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor, window: int, stride: int | None = None, batch_size: int = 8,
               max_windows: int | None = None) -> float:
    """exp(mean next-token NLL) of ``model`` on ``ids`` (n,), windows of ``window`` every ``stride`` tokens."""
    stride = window if stride is None else stride
    if window < 2 or not 1 <= stride <= window:
        raise ConfigError("stride", stride, f"an integer in [1, window={window}], window >= 2")
    ids = ids.flatten().long()
    if ids.numel() < window:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one window of {window}; give more text "
                        "or a smaller --window")
    spans, prev = [], 0  # (begin, n_scored) per window
    for begin in range(0, ids.numel() - window + 1, stride):
        end = begin + window
        spans.append((begin, end - max(prev, begin + 1)))
        prev = end
    spans = spans[:max_windows] if max_windows else spans
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for i in range(0, len(spans), batch_size):
            chunk = spans[i:i + batch_size]
            x = torch.stack([ids[b:b + window] for b, _ in chunk])
            logits = model(x).float()
            for row, (_, n_scored) in enumerate(chunk):
                lg, tgt = logits[row, -n_scored - 1:-1], x[row, -n_scored:]
                nll += F.cross_entropy(lg, tgt, reduction="sum").item()
                count += n_scored
    finally:
        model.train(was_training)
    return math.exp(nll / count)
