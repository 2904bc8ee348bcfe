"""efformer vs Hugging Face ``transformers`` (and ``x-transformers``) on one Llama-style model.

The same architecture (RMSNorm, RoPE, SwiGLU, untied head) is built in each library and efformer's
weights are copied over; the script asserts the logits agree within 1e-4 before timing anything.
Timed: greedy ``generate`` (tokens/s) at several batch x prompt shapes, a long-prompt prefill, and a
train step (forward, cross-entropy, backward). Rows are measured interleaved in one process; each ratio is
the median over rounds of that round's ratio, so machine load hits both sides alike.

Install the peers without letting pip replace torch::

    echo "torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')" > /tmp/c.txt
    pip install -c /tmp/c.txt -e '.[peers]'

Run: ``python benchmarks/bench_peers_generate.py`` (``--quick`` for a short check, ``--threads N``;
``--shapes 8x32 --no-prefill --rounds 7 --reps 1`` for the batch-8 decode row alone).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from efformer.models import CausalLM
from efformer.models.config import build_config

INSTALL = ("echo 'torch==<your torch version>' > /tmp/c.txt && "
           "pip install -c /tmp/c.txt transformers x-transformers  (or the efformer[peers] extra)")


def efformer_model(d: int, layers: int, heads: int, vocab: int, max_len: int) -> CausalLM:
    """The efformer Llama-style model (pre-RMSNorm, RoPE, SwiGLU, untied head), seeded."""
    torch.manual_seed(0)
    cfg = build_config(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, mixer="softmax",
                       positional="rope", norm="rmsnorm", ffn="swiglu", tie_embeddings=False, max_len=max_len)
    model = CausalLM(cfg).eval()
    with torch.no_grad():
        # Embeddings of unit scale (not 0.02), so RMSNorm's eps (1e-6 here and in HF, none in
        # x-transformers) moves logits by < 1e-6 and all three libraries compute the same function.
        model.backbone.embed.weight.normal_()
    return model


def _rope_perm(heads: int, hd: int) -> torch.Tensor:
    """Row order that turns efformer's interleaved rotary pairs (2j, 2j+1) into HF's halves (j, j+hd/2)."""
    per = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    return (torch.arange(heads)[:, None] * hd + per).flatten()


def hf_model(ef: CausalLM, max_len: int):
    """A ``transformers`` LlamaForCausalLM (sdpa attention) holding ``ef``'s weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = ef.cfg
    hidden = ef.backbone.blocks[0].ffn.down.in_features
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=hidden,
                      num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads,
                      max_position_embeddings=max_len, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      attention_bias=False, mlp_bias=False, rope_parameters={"rope_theta": 10000.0,
                                                                              "rope_type": "default"},
                      pad_token_id=None, bos_token_id=None, eos_token_id=None)
    hf = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    d, hd = c.d_model, c.d_model // c.n_heads
    perm = _rope_perm(c.n_heads, hd)
    bb = ef.backbone
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(bb.embed.weight)
        for blk, layer in zip(bb.blocks, hf.model.layers, strict=True):
            m = blk.mixer
            kw = m.kv_proj.weight
            layer.self_attn.q_proj.weight.copy_(m.q_proj.weight[perm])
            layer.self_attn.k_proj.weight.copy_(kw[:d][perm])
            layer.self_attn.v_proj.weight.copy_(kw[d:])
            layer.self_attn.o_proj.weight.copy_(m.out_proj.weight)
            gate, up = blk.ffn.gate_up.weight.chunk(2, dim=0)
            layer.mlp.gate_proj.weight.copy_(gate)
            layer.mlp.up_proj.weight.copy_(up)
            layer.mlp.down_proj.weight.copy_(blk.ffn.down.weight)
            layer.input_layernorm.weight.copy_(blk.norm1.weight)
            layer.post_attention_layernorm.weight.copy_(blk.norm2.weight)
        hf.model.norm.weight.copy_(bb.final_norm.weight)
        hf.lm_head.weight.copy_(ef.lm_head.weight)
    return hf


def xt_model(ef: CausalLM, max_len: int):
    """An ``x-transformers`` TransformerWrapper holding ``ef``'s weights (same RMSNorm, RoPE, SwiGLU)."""
    from x_transformers import Decoder, TransformerWrapper

    c = ef.cfg
    hd = c.d_model // c.n_heads
    hidden = ef.backbone.blocks[0].ffn.down.in_features
    xt = TransformerWrapper(
        num_tokens=c.vocab_size, max_seq_len=max_len, use_abs_pos_emb=False, tie_embedding=False,
        attn_layers=Decoder(dim=c.d_model, depth=c.n_layers, heads=c.n_heads, attn_dim_head=hd, rotary_pos_emb=True,
                            rotary_emb_dim=hd, use_rmsnorm=True, ff_glu=True, ff_swish=True, ff_no_bias=True,
                            ff_mult=hidden / c.d_model, attn_flash=True),
    ).eval()
    d = c.d_model
    bb = ef.backbone
    with torch.no_grad():
        xt.token_emb.emb.weight.copy_(bb.embed.weight)
        layers = xt.attn_layers.layers
        for i, blk in enumerate(bb.blocks):
            (attn_norm, _, _), attn, _ = layers[2 * i]
            (ff_norm, _, _), ff, _ = layers[2 * i + 1]
            m = blk.mixer
            kw = m.kv_proj.weight
            attn.to_q.weight.copy_(m.q_proj.weight)  # interleaved rotary pairs, as in efformer
            attn.to_k.weight.copy_(kw[:d])
            attn.to_v.weight.copy_(kw[d:])
            attn.to_out.weight.copy_(m.out_proj.weight)
            _copy_norm(attn_norm, blk.norm1.weight)
            _copy_norm(ff_norm, blk.norm2.weight)
            gate, up = blk.ffn.gate_up.weight.chunk(2, dim=0)
            ff.ff[0].proj.weight.copy_(torch.cat([up, gate]))  # its GLU: up, gate = proj(x).chunk(2)
            ff.ff[0].proj.bias.zero_()
            ff.ff[-1].weight.copy_(blk.ffn.down.weight)
        _copy_norm(xt.attn_layers.final_norm, bb.final_norm.weight)
        xt.to_logits.weight.copy_(ef.lm_head.weight)
    return xt


def _copy_norm(norm, weight: torch.Tensor) -> None:
    # x-transformers' RMSNorm is F.normalize(x) * sqrt(d) * (g + unit_offset), no eps (see efformer_model)
    norm.g.copy_(weight - float(norm.unit_offset))


def _hf_generate(hf, ids: torch.Tensor, new: int) -> torch.Tensor:
    return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0, eos_token_id=None)


def _xt_generate(wrapper, ids: torch.Tensor, new: int) -> torch.Tensor:
    out = wrapper.generate(ids, new, temperature=0.0, cache_kv=True)
    return torch.cat([ids, out], 1)


def measure(fns: dict, rounds: int, reps: int) -> dict[str, list[float]]:
    """Seconds per call of each fn in each round (the round's median over ``reps``): calls interleaved,
    so load changes hit every library alike within a round."""
    for f in fns.values():
        f()  # warm-up
    per_round = {k: [] for k in fns}
    for _ in range(rounds):
        times = {k: [] for k in fns}
        for _ in range(reps):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        for k, ts in times.items():
            per_round[k].append(statistics.median(ts))
    return per_round


def median_ratio(per_round: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of time(b) / time(a): > 1 when ``a`` is faster (each round under the same load)."""
    return statistics.median(tb / ta for ta, tb in zip(per_round[a], per_round[b], strict=True))


def check_logits(ef, peers: dict, vocab: int) -> None:
    """Every peer's logits equal efformer's within 1e-4 on a random prompt (else the timing compares nothing)."""
    ids = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ef(ids)
        for name, (logits_fn, _) in peers.items():
            err = (logits_fn(ids) - ref).abs().max().item()
            assert err < 1e-4, f"{name} logits differ from efformer's by {err:.2e}: the weight mapping is wrong"
            print(f"logits match {name}: max abs diff {err:.1e}")


def _time_cells(per_round: dict[str, list[float]], names: list[str]) -> list[str]:
    """Best ms of each library, then efformer's time over each peer's (median of per-round ratios)."""
    cells = [f"{min(per_round['efformer']) * 1e3:.0f} ms"] + [f"{min(per_round[k]) * 1e3:.0f} ms" for k in names]
    return cells + [f"**{median_ratio(per_round, k, 'efformer'):.2f}** (time)" for k in names]


def main(argv=None) -> int:
    """Run the comparison and print a markdown table of ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="timed calls of each library per round")
    ap.add_argument("--quick", action="store_true", help="small shapes, one round")
    ap.add_argument("--no-xt", action="store_true", help="skip x-transformers")
    ap.add_argument("--shapes", nargs="+", metavar="BxN", help="generate shapes, e.g. 8x32 1x512 (default: all four)")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill and train-step rows")
    args = ap.parse_args(argv)
    if importlib.util.find_spec("transformers") is None:
        print(f"transformers is not installed; install the peers with: {INSTALL}")
        return 2
    torch.set_num_threads(args.threads)
    vocab, d, layers, heads, max_len = 32000, 512, 8, 8, 4096
    ef = efformer_model(d, layers, heads, vocab, max_len)
    hf = hf_model(ef, max_len)
    peers = {"transformers": (lambda ids: hf(ids).logits, lambda ids, n: _hf_generate(hf, ids, n))}
    if not args.no_xt and importlib.util.find_spec("x_transformers") is not None:
        from x_transformers import AutoregressiveWrapper

        xt = xt_model(ef, max_len)
        xw = AutoregressiveWrapper(xt, ignore_index=-100, pad_value=0).eval()
        peers["x-transformers"] = (lambda ids: xt(ids), lambda ids, n: _xt_generate(xw, ids, n))
    elif not args.no_xt:
        print("x-transformers is not installed; skipping it")
    check_logits(ef, peers, vocab)

    shapes = [(1, 32), (8, 32)] if args.quick else [(1, 32), (8, 32), (1, 512), (8, 512)]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    new = 16 if args.quick else args.new_tokens
    rounds, reps = (1, 1) if args.quick else (args.rounds, args.reps)
    names = list(peers)
    header = "| workload | efformer | " + " | ".join(names) + " | " + " | ".join(f"efformer/{n}" for n in names) + " |"
    print()
    print(header)
    print("|" + "---|" * (2 + 2 * len(names)))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for b, n in shapes:
            ids = torch.randint(1, vocab, (b, n), generator=gen)
            fns = {"efformer": lambda ids=ids: ef.generate(ids, new)}
            fns.update({k: (lambda ids=ids, g=g: g(ids, new)) for k, (_, g) in peers.items()})
            per_round = measure(fns, rounds, reps)
            tps = {k: b * new / min(s) for k, s in per_round.items()}
            cells = [f"{tps['efformer']:.0f} tok/s"] + [f"{tps[k]:.0f} tok/s" for k in names]
            cells += [f"**{median_ratio(per_round, 'efformer', k):.2f}**" for k in names]
            print(f"| generate b{b} prompt {n} +{new} (tokens/s) | " + " | ".join(cells) + " |", flush=True)
        if args.no_prefill:
            return _footer(args.threads)
        n = 256 if args.quick else 2048
        ids = torch.randint(1, vocab, (1, n), generator=gen)
        fns = {"efformer": lambda: ef.generate(ids, 1)}
        fns.update({k: (lambda g=g: g(ids, 1)) for k, (_, g) in peers.items()})
        per_round = measure(fns, rounds, max(1, reps - 1))
        cells = _time_cells(per_round, names)
        print(f"| prefill b1 prompt {n} via generate (time) | " + " | ".join(cells) + " |", flush=True)

    b, n = (2, 128) if args.quick else (8, 512)
    ids = torch.randint(1, vocab, (b, n + 1), generator=gen)

    def step(logits_fn):
        logits = logits_fn(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()

    for m in [ef, hf] + ([xt] if "x-transformers" in peers else []):
        m.train()
    fns = {"efformer": lambda: step(ef)}
    fns.update({k: (lambda f=f: step(f)) for k, (f, _) in peers.items()})
    per_round = measure(fns, rounds, max(1, reps - 1))
    cells = _time_cells(per_round, names)
    print(f"| train step b{b} seq {n} fwd+bwd (time) | " + " | ".join(cells) + " |")
    return _footer(args.threads)


def _footer(threads: int) -> int:
    print(f"\nfp32, {threads} threads, torch {torch.__version__}; load average {os.getloadavg()[0]:.1f} at the end. "
          "Ratios are medians of per-round ratios (> 1: efformer faster for tokens/s, slower for time rows); "
          "absolute figures are the best round.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
