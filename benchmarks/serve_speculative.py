"""Speculative decoding: speed-up over the target alone and acceptance rate, greedy.

Untrained models agree little, so a random small draft is a lower bound; the target drafting for
itself (acceptance 1, but no cheaper draft) is the other bracket; ``--target``/``--draft`` take saved
model folders (e.g. two byte-level LMs trained by ``train_shakespeare_lm.py``) for the real case. Output
is asserted equal to the target's greedy output. A script, not a test.

    python benchmarks/serve_speculative.py --new-tokens 64 --k 2 4
    python benchmarks/serve_speculative.py --target /tmp/lm-shakespeare-ref --draft /tmp/lm-draft
"""

from __future__ import annotations

import argparse
import time

import torch

from efformer.models.factory import create_model
from efformer.models.io import load
from efformer.serve.speculative import speculative_generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--k", type=int, nargs="+", default=[2, 4])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--target", default=None, help="a saved model folder (default: a random softmax LM)")
    p.add_argument("--draft", default=None, help="a saved model folder (default: a random 1-layer gated_deltanet)")
    args = p.parse_args()
    torch.manual_seed(0)
    target = load(args.target).eval() if args.target else create_model(
        "lm-tiny", mixer="softmax", positional="rope", d_model=args.d_model, n_layers=args.layers, n_heads=4,
        max_len=1024).eval()
    draft = load(args.draft).eval() if args.draft else create_model(
        "lm-tiny", mixer="gated_deltanet", positional="none", d_model=64, n_layers=1, n_heads=4, max_len=1024).eval()
    draft_name = f"{draft.cfg.mixer} d={draft.cfg.d_model} x{draft.cfg.n_layers}"
    prompt = list(b"KING RICHARD. Now is the winter of our discontent\nMade glorious summer by this sun of York; ")
    t0 = time.perf_counter()
    want = target.generate([prompt], max_new_tokens=args.new_tokens)[0][len(prompt):]
    alone = time.perf_counter() - t0
    print(f"target alone: {args.new_tokens / alone:.1f} tok/s ({target.cfg.n_layers} layers, d={target.cfg.d_model})")
    print(f"{'draft':<22}{'k':>3}{'tok/s':>9}{'speed-up':>10}{'acceptance':>12}{'target calls':>14}")
    for name, d in ((draft_name, draft), ("target itself", target)):
        for k in args.k:
            t0 = time.perf_counter()
            got, stats = speculative_generate(target, d, prompt, args.new_tokens, k=k)
            wall = time.perf_counter() - t0
            assert got == want
            print(f"{name:<22}{k:>3}{args.new_tokens / wall:>9.1f}{alone / wall:>9.2f}x"
                  f"{stats.acceptance_rate:>12.2f}{stats.target_calls:>14}")


if __name__ == "__main__":
    main()
