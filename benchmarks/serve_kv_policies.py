"""KV policies on a long greedy generation: full cache vs sinks + window (StreamingLLM) vs int8.

For each policy: decode tokens/s, KV bytes held at the end (every layer), and the largest logit
deviation from the full fp32 cache over the steps (teacher-forced on the full cache's tokens, so the
two see the same context). Untrained weights; one run. A script, not a test.

    python benchmarks/serve_kv_policies.py --prompt 64 --new-tokens 512 --window 124
"""

from __future__ import annotations

import argparse
import time

import torch

from efformer.mixers.kv_policies import kv_bytes
from efformer.models.factory import create_model


def run(model, prompt, tokens, policy):
    """Teacher-forced decode of ``tokens`` after ``prompt``: logits (steps, vocab), seconds, KV bytes."""
    cache = model.new_cache(1, kv_policy=policy)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = [model(prompt, cache=cache)[:, -1]]
        for t in tokens[:-1]:
            out.append(model(t.view(1, 1), cache=cache)[:, -1])
    return torch.cat(out), time.perf_counter() - t0, sum(kv_bytes(s) for s in cache.states)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=124)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    torch.manual_seed(0)
    model = create_model("lm-tiny", mixer="softmax", positional="rope", d_model=args.d_model, n_layers=args.layers,
                         n_heads=4, max_len=args.prompt + args.new_tokens).eval()
    prompt = torch.randint(0, 256, (1, args.prompt))
    full = model.generate(prompt, args.new_tokens)[0, args.prompt :]
    policies = {"full": None, f"sinks {args.sinks} + window {args.window}": {"sinks": args.sinks,
                                                                             "window": args.window},
                "int8": {"int8": True}}
    print(f"{args.prompt} prompt + {args.new_tokens} new tokens, {args.layers} softmax layers, d={args.d_model}")
    print(f"{'policy':<26}{'tok/s':>8}{'KV bytes':>12}{'vs full':>9}{'max |dlogit|':>14}{'logit range':>13}")
    ref = None
    for name, pol in policies.items():
        logits, sec, nbytes = run(model, prompt, full, pol)
        if ref is None:
            ref, ref_bytes = logits, nbytes
        dev = float((logits - ref).abs().max())
        print(f"{name:<26}{args.new_tokens / sec:>8.1f}{nbytes:>12}{nbytes / ref_bytes:>8.3f}x{dev:>14.2e}"
              f"{float(ref.amax() - ref.amin()):>13.2f}")


if __name__ == "__main__":
    main()
