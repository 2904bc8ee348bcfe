"""Low-bit attention probabilities: FQ-ViT's log2 quantizer installed on softmax attention mixers.

"FQ-ViT: Post-Training Quantization for Fully Quantized Vision Transformer" (Lin et al., 2022) keeps
post-softmax probabilities as powers of two, ``p_hat = 2^-round(-log2 p)`` with codes in
``[0, 2^bits - 1]``: the many small weights a softmax produces are resolved finely, the few large ones
coarsely, and ``p_hat @ V`` becomes shifts in integer hardware. Here it is fake-quant in float (no CPU
kernel multiplies by shifts). Weights that are exactly zero (masked keys: causal, padding, other packed
segments) stay zero, so the quantized mixer keeps causality and padding invariance; the smallest
non-zero weight becomes ``2^-(2^bits - 1)`` rather than vanishing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from efformer.compress.formats import Log2Format
from efformer.errors import ConfigError
from efformer.mixers.softmax import SoftmaxAttention


class Log2ProbQuantizer:
    """Attention weights (b, h, n, t) in [0, 1] -> the nearest powers of two in log space; zeros stay zero."""

    def __init__(self, bits: int):
        self.fmt = Log2Format(bits)

    def __call__(self, p: Tensor) -> Tensor:
        return torch.where(p > 0, self.fmt.fake_quant(p), torch.zeros_like(p))


def _plain_softmax(m: nn.Module) -> bool:
    """A mixer whose weights come from SoftmaxAttention's own explicit form (subclasses that compute their
    weights in their own forms are left alone: the hook would not reach them)."""
    cls = type(m)
    return isinstance(m, SoftmaxAttention) and cls.forward_reference is SoftmaxAttention.forward_reference \
        and cls.forward_fast is SoftmaxAttention.forward_fast


def install_prob_quantizers(model: nn.Module, bits: int) -> list[str]:
    """Give every plain softmax attention mixer of ``model`` a ``bits``-bit log2 probability quantizer;
    returns their module names. Raises ConfigError if the model has none."""
    names = [n for n, m in model.named_modules() if _plain_softmax(m)]
    if not names:
        raise ConfigError("prob_bits", bits, "the model has no softmax attention mixer whose probabilities could be "
                          "quantized; leave prob_bits unset for this model")
    for n in names:
        model.get_submodule(n).prob_quantizer = Log2ProbQuantizer(bits)
    return names
