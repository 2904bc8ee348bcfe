"""efformer ``generate`` vs ``transformers`` ``generate`` on the same imported Llama-style checkpoint.

A random ``LlamaForCausalLM`` (GQA, untied head) is saved with ``save_pretrained``, imported with
``efformer.from_hf``, checked for equal logits, then both generate greedily (tokens/s) at batch 1 and
8. Default: d_model 512, 8 layers, prompt 512, 128 new tokens; smaller with flags. Timing helpers
(interleaved rounds, min of medians) come from ``bench_peers_generate.py``.

Run: ``python benchmarks/bench_interop_generate.py`` (``--d-model 128 --layers 2 --prompt 64 --new 16``
for a short check).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_peers_generate import INSTALL, _hf_generate, measure  # noqa: E402

from efformer.interop import from_hf  # noqa: E402


def main(argv=None) -> int:
    """Import, check logits, time both libraries and print a markdown table with the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if importlib.util.find_spec("transformers") is None:
        print(f"transformers is not installed; install the peers with: {INSTALL}")
        return 2
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_model * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    hf = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ef = from_hf(tmp)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ids = torch.randint(1, args.vocab, (2, 48), generator=gen)
        ref = hf(ids).logits
        err = float((ef(ids) - ref).abs().max() / ref.abs().max())
        assert err < 1e-5, f"imported logits differ by {err:.1e} (relative): the import is wrong"
        print(f"imported model: logits match transformers (max relative diff {err:.1e})\n")
        print("| workload | efformer | transformers | efformer/transformers |")
        print("|---|---|---|---|")
        for b in args.batches:
            ids = torch.randint(1, args.vocab, (b, args.prompt), generator=gen)
            same = torch.equal(ef.generate(ids, 8), _hf_generate(hf, ids, 8))
            secs = measure({"efformer": lambda ids=ids: ef.generate(ids, args.new),
                            "transformers": lambda ids=ids: _hf_generate(hf, ids, args.new)}, args.rounds, args.reps)
            tps = {k: b * args.new / s for k, s in secs.items()}
            print(f"| generate b{b} prompt {args.prompt} +{args.new} (same first 8 tokens: {same}) | "
                  f"{tps['efformer']:.0f} tok/s | {tps['transformers']:.0f} tok/s | "
                  f"**{tps['efformer'] / tps['transformers']:.2f}** |", flush=True)
    print(f"\nfp32, {args.threads} threads, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"d_model {args.d_model}, {args.layers} layers; ratio > 1: efformer is faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
