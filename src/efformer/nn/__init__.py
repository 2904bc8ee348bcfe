"""Building blocks: norms, positional schemes, feed-forward blocks and the Transformer block."""

from efformer.nn import acm, ffn, matformer, moe, mohd, monet, norms, patch, pattention, positional, repbn  # noqa: F401  (register themselves)
