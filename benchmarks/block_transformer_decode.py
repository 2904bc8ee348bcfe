"""Block Transformer vs a plain LM of the same width and depth: greedy decode throughput.

Both have ``--layers`` softmax layers of width ``--d-model``; the Block Transformer gives the last
``--token-layers`` to the token decoder (KV cache <= block length) and runs its block decoder once per
``--block-len`` tokens. Untrained weights (throughput only). A script, not a test; one run.

    python benchmarks/block_transformer_decode.py --batch 8 --prompt 256 --new-tokens 128
"""

from __future__ import annotations

import argparse
import time

import torch

from efformer.models.block_transformer import BlockTransformerLM
from efformer.models.config import build_config
from efformer.models.lm import CausalLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--token-layers", type=int, default=2)
    p.add_argument("--block-len", type=int, nargs="+", default=[4, 8])
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = build_config(dict(task="lm", vocab_size=256, d_model=args.d_model, n_layers=args.layers, n_heads=4,
                            max_len=args.prompt + args.new_tokens, mixer="softmax", positional="rope"))
    prompt = torch.randint(0, 256, (args.batch, args.prompt))
    models = [("plain", CausalLM(cfg).eval())]
    models += [(f"block L={L}", BlockTransformerLM(build_config(cfg, block_len=L,
                                                                block_token_layers=args.token_layers)).eval())
               for L in args.block_len]
    print(f"batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, {args.layers} layers "
          f"(token decoder {args.token_layers}), d={args.d_model}")
    print(f"{'model':<14}{'params':>10}{'tok/s':>10}{'vs plain':>10}")
    base = None
    for name, m in models:
        m.generate(prompt[:, :8], 4)  # warm-up
        t0 = time.perf_counter()
        m.generate(prompt, args.new_tokens)
        rate = args.batch * args.new_tokens / (time.perf_counter() - t0)
        base = base or rate
        print(f"{name:<14}{sum(x.numel() for x in m.parameters()):>10}{rate:>10.1f}{rate / base:>9.2f}x")


if __name__ == "__main__":
    main()
