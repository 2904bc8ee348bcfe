"""IceFormer on CPU: speed-up over exact attention at 4K-16K on a briefly trained model, and the accuracy kept.

Two sources of realistic attention (a fresh layer's near-uniform attention is no test of top-k):

- ``--steps N`` (N > 0): a small causal LM (softmax, RoPE) is trained for N steps on copying (a random
  segment, then the same segment again), which makes its attention sharp and content-based (induction
  heads). Its weights load unchanged into the same model with ``mixer="iceformer"`` (training-free).
  Per attention layer: exact (SDPA) and IceFormer times on that layer's real inputs, relative output
  error; for the model: copy accuracy on the second half with each mixer, and prediction agreement.
- ``--model DIR``: a saved efformer causal LM with softmax attention (e.g. a byte-level Shakespeare LM from
  benchmarks/train_shakespeare_lm.py). It reads N bytes of held-out Shakespeare (``--text``; Othello then
  Richard III) and runs the whole model at N with ``max_len`` raised to N (RoPE extends positions; no weight
  changes), exact and with IceFormer (the same weights, strictly). Per layer: exact (SDPA) and IceFormer times
  of the attention layer alone on that layer's real inputs (captured from the exact model) and its relative
  output error; for the model: bits per byte with each mixer and their change. Beyond the model's training
  length its perplexity is worse than in distribution; the change between the two mixers is the figure.
- ``--steps 0`` (default, for busy machines): one layer whose query projection is a multiple of its key
  projection, on inputs whose second half repeats the first with noise, so each query's largest
  scores are on itself and its copy (an induction head's retrieval pattern). Times and output error.

IceFormer's index block is N when bidirectional (one index) and 128 when causal (a query scans its own
block densely and searches one earlier block per dyadic level), unless ``--index-block`` is given.

    python benchmarks/bench_iceformer.py [--lengths 4096 8192 16384] [--steps 0] [--top-k 32] [--causal] ...

``--top-k 32 128 512 --probe 4 16 64`` sweeps (k, probe) pairs. A causal query scores its own block plus
2 x projections x probe candidates per earlier dyadic block, so a larger k without a larger probe only
keeps more of the same few candidates. Exact attention is timed again beside each setting.

Timings are single runs of a shared machine unless ``--repeat`` says otherwise; quote ratios.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import efformer
from efformer.bench.perf import time_ms
from efformer.registry import MIXERS


def copy_batch(batch: int, n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, n) token ids: a random segment of n // 2 tokens followed by the same segment (odd n: one pad token)."""
    half = torch.randint(1, vocab, (batch, n // 2), generator=gen)
    ids = torch.cat([half, half], 1)
    return torch.cat([ids, torch.zeros(batch, n - ids.shape[1], dtype=torch.long)], 1)


def build(mixer: str, a: argparse.Namespace, max_len: int, options: dict | None = None):
    """The benchmark's LM with ``mixer`` (options for it) and room for ``max_len`` tokens."""
    return efformer.create_model("lm-tiny", mixer=mixer, mixer_options=options or {}, vocab_size=a.vocab,
                                 d_model=a.d_model, n_layers=a.layers, n_heads=a.heads, max_len=max_len)


def train(a: argparse.Namespace):
    """Train the softmax LM on copying at length ``a.train_len``; returns it and its last loss."""
    torch.manual_seed(0)
    model = build("softmax", a, a.train_len)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    half = a.train_len // 2
    for _ in range(a.steps):
        ids = copy_batch(a.batch, a.train_len, a.vocab, gen)
        logits = model(ids)
        loss = F.cross_entropy(logits[:, half:-1].flatten(0, 1), ids[:, half + 1 :].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), loss.item()


def copy_accuracy(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Next-token accuracy over the second half (the part a copying model can predict)."""
    half = ids.shape[1] // 2
    return (logits[:, half:-1].argmax(-1) == ids[:, half + 1 :]).float().mean().item()


def sweep(a: argparse.Namespace) -> list[tuple[int, int]]:
    """The (top_k, probe) settings to run: ``--top-k`` and ``--probe`` paired in order (one value repeats)."""
    ks, probes = a.top_k, a.probe
    if len(probes) == 1:
        probes = probes * len(ks)
    if len(ks) == 1:
        ks = ks * len(probes)
    if len(ks) != len(probes):
        raise SystemExit(f"--top-k {a.top_k} and --probe {a.probe}: give one value or as many as the other")
    return list(zip(ks, probes, strict=True))


def ice_options(a: argparse.Namespace, n: int, top_k: int, probe: int) -> dict:
    """IceFormer's options at length n with k = top_k and ``probe`` candidates a side per projection."""
    causal = a.causal or a.steps > 0 or a.model is not None
    block = a.index_block or (128 if causal else n)
    return {"top_k": top_k, "probe": probe, "n_projections": a.projections, "index_block": block,
            "metric": a.metric, "form": "fast"}


def synthetic(a: argparse.Namespace) -> None:
    """One sharp content-attention layer on copy-structured inputs: times and relative error per length."""
    torch.manual_seed(0)
    print(f"synthetic sharp layer (q = {a.sharpness} W_k x), d_model={a.d_model} heads={a.heads} causal={a.causal} "
          f"threads={torch.get_num_threads()}")
    hdr = (f"{'N':>6} {'top_k':>5} {'probe':>5} {'block':>6} {'exact ms':>9} {'ice ms':>8} {'speed-up':>8}"
           f" {'rel err':>8}")
    print(hdr)
    print("-" * len(hdr))
    for n in a.lengths:
        sm = MIXERS.get("softmax")(a.d_model, a.heads, causal=a.causal, options={"form": "fast"},
                                                     max_len=n)
        with torch.no_grad():
            sm.q_proj.weight.copy_(a.sharpness * sm.kv_proj.weight[: a.d_model])
        half = torch.randn(1, n // 2, a.d_model)
        x = torch.cat([half, half + 0.1 * torch.randn_like(half), torch.randn(1, n % 2, a.d_model)], 1)
        for k, probe in sweep(a):
            opts = ice_options(a, n, k, probe)
            ice = MIXERS.get("iceformer")(a.d_model, a.heads, causal=a.causal, options=opts, max_len=n)
            ice.load_state_dict(sm.state_dict())
            with torch.no_grad():  # exact timed again beside each setting: a ratio of one moment's load
                (y_sm, _), t_sm = timed_call(sm, (x,), {}, a.repeat)
                (y_ice, _), t_ice = timed_call(ice, (x,), {}, a.repeat)
                err = ((y_sm - y_ice).norm() / y_sm.norm()).item()
            print(f"{n:>6} {k:>5} {probe:>5} {opts['index_block']:>6} {t_sm:>9.1f} {t_ice:>8.1f} "
                  f"{t_sm / t_ice:>7.2f}x {err:>8.4f}", flush=True)


def held_out_bytes(path: Path, n: int) -> torch.Tensor:
    """The first n + 1 bytes of the validation plays under ``path`` (the split train_shakespeare_lm.py holds out)."""
    data = b"\n".join((path / f).read_bytes() for f in ("othello_gut.txt", "richard_iii_gut.txt"))
    if len(data) < n + 1:
        raise SystemExit(f"--text {path}: {len(data)} bytes, fewer than N + 1 = {n + 1}")
    return torch.frombuffer(bytearray(data[: n + 1]), dtype=torch.uint8).long()


def trained_model(a: argparse.Namespace) -> None:
    """The saved LM at each length: per-layer times and errors on real activations, and bits per byte."""
    from efformer.models.io import load

    ref = load(a.model).eval()
    cfg = ref.cfg.model_dump()
    if cfg["mixer"] != "softmax" or cfg["task"] != "lm":
        raise SystemExit(f"--model {a.model}: needs a causal LM with softmax attention (has {cfg['task']}, "
                         f"{cfg['mixer']})")
    print(f"model {a.model}: d_model {cfg['d_model']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, "
          f"trained max_len {cfg['max_len']}, positional {cfg['positional']}; threads={torch.get_num_threads()}")
    print(f"iceformer options (top_k, probe swept): {ice_options(a, a.lengths[0], *sweep(a)[0])}")
    hdr = (f"{'N':>6} {'top_k':>5} {'probe':>5} {'layer':>5} {'exact ms':>9} {'ice ms':>8} {'speed-up':>8}"
           f" {'rel err':>8} | {'bpb exact':>9} {'bpb ice':>8} {'change':>7}")
    print(hdr)
    print("-" * len(hdr))
    for n in a.lengths:
        make = lambda mixer, opts, n=n: efformer.create_model({**cfg, "max_len": n, "mixer": mixer,  # noqa: E731
                                                          "mixer_options": opts}).eval()
        sm = make("softmax", cfg["mixer_options"])
        sm.load_state_dict(ref.state_dict())
        text = held_out_bytes(Path(a.text), n)
        ids, tgt = text[None, :-1], text[None, 1:]
        calls: list[tuple[tuple, dict]] = []  # each mixer's real inputs: x and the positional context
        hooks = [blk.mixer.register_forward_hook(lambda mod, args, kw, out, seen=calls: seen.append((args, kw)),
                                                 with_kwargs=True) for blk in sm.backbone.blocks]
        with torch.no_grad():
            bpb_sm = F.cross_entropy(sm(ids)[0], tgt[0]).item() / math.log(2)
        for h in hooks:
            h.remove()
        for k, probe in sweep(a):
            ice = make("iceformer", {**cfg["mixer_options"], **ice_options(a, n, k, probe)})
            ice.load_state_dict(ref.state_dict())  # training-free: the same weights, strictly
            with torch.no_grad():
                bpb_ice = F.cross_entropy(ice(ids)[0], tgt[0]).item() / math.log(2)
                for layer, ((args, kw), b_sm, b_ice) in enumerate(zip(calls, sm.backbone.blocks,
                                                                      ice.backbone.blocks, strict=True)):
                    # exact timed again beside each setting, so every speed-up is a ratio of one moment's load
                    (y_sm, _), t_sm = timed_call(b_sm.mixer, args, kw, a.repeat)
                    (y_ice, _), t_ice = timed_call(b_ice.mixer, args, kw, a.repeat)
                    err = ((y_sm - y_ice).norm() / y_sm.norm()).item()
                    tail = f" | {bpb_sm:>9.3f} {bpb_ice:>8.3f} {bpb_ice - bpb_sm:>+7.3f}" if layer == 0 else ""
                    print(f"{n:>6} {k:>5} {probe:>5} {layer:>5} {t_sm:>9.1f} {t_ice:>8.1f} {t_sm / t_ice:>7.2f}x "
                          f"{err:>8.4f}{tail}", flush=True)


def timed_call(m, args: tuple, kw: dict, repeat: int):
    """m(*args, **kw)'s output and its best wall time in ms over ``repeat`` calls."""
    best, out = math.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = m(*args, **kw)
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return out, best


def main() -> None:
    """Train, then sweep the lengths and print the table."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--top-k", type=int, nargs="+", default=[32],
                   help="k, one run per value (a sweep), paired in order with --probe")
    p.add_argument("--probe", type=int, nargs="+", default=[8],
                   help="candidates each side per projection and block; one value, or one per --top-k")
    p.add_argument("--projections", type=int, default=2)
    p.add_argument("--index-block", type=int, default=0,
                   help="0: causal sqrt(N * L * 2 probe) as a power of two, bidirectional N (one index)")
    p.add_argument("--sharpness", type=float, default=8.0, help="--steps 0: W_q = sharpness * W_k")
    p.add_argument("--metric", choices=["inner_product", "cosine"], default="cosine")
    p.add_argument("--causal", action="store_true", help="--steps 0 only: a causal layer (a trained LM is causal)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--model", default=None, help="a saved efformer causal LM (softmax attention) folder")
    p.add_argument("--text", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" /
                                         "shakespeare"), help="--model: folder of the held-out plays")
    a = p.parse_args()
    if a.model is not None:
        trained_model(a)
        return
    if a.steps == 0:
        synthetic(a)
        return
    t0 = time.perf_counter()
    exact, loss = train(a)
    print(f"trained softmax LM: {a.steps} steps at length {a.train_len}, last loss {loss:.3f} "
          f"({time.perf_counter() - t0:.0f} s); threads={torch.get_num_threads()}")
    print(f"iceformer options (top_k, probe swept): {ice_options(a, a.lengths[0], *sweep(a)[0])} (index_block "
          "per N)")
    hdr = (f"{'N':>6} {'top_k':>5} {'probe':>5} {'layer':>5} {'exact ms':>9} {'ice ms':>8} {'speed-up':>8}"
           f" {'rel err':>8} | {'acc exact':>9} {'acc ice':>8} {'agree':>6}")
    print(hdr)
    print("-" * len(hdr))
    gen = torch.Generator().manual_seed(2)
    for n, (k, probe) in [(n, kp) for n in a.lengths for kp in sweep(a)]:
        sm = build("softmax", a, n)
        sm.load_state_dict(exact.state_dict())
        ice = build("iceformer", a, n, ice_options(a, n, k, probe))
        ice.load_state_dict(exact.state_dict())  # training-free: the same weights, strictly
        sm, ice = sm.eval(), ice.eval()
        ids = copy_batch(1, n, a.vocab, gen)
        inputs: list[torch.Tensor] = []
        hooks = [blk.mixer.register_forward_hook(lambda mod, args, out, seen=inputs: seen.append(args[0]))
                 for blk in sm.backbone.blocks]
        with torch.no_grad():
            logits_sm = sm(ids)
            for h in hooks:
                h.remove()
            logits_ice = ice(ids)
            rows = []
            for layer, (x, m_sm, m_ice) in enumerate(zip(inputs, sm.backbone.blocks, ice.backbone.blocks,
                                                          strict=True)):
                y_sm, _ = m_sm.mixer(x)
                y_ice, _ = m_ice.mixer(x)
                err = ((y_sm - y_ice).norm() / y_sm.norm()).item()
                t_sm = time_ms(lambda m=m_sm.mixer, x=x: m(x), warmup=0, repeat=a.repeat)
                t_ice = time_ms(lambda m=m_ice.mixer, x=x: m(x), warmup=0, repeat=a.repeat)
                rows.append((layer, t_sm, t_ice, err))
        acc_sm, acc_ice = copy_accuracy(logits_sm, ids), copy_accuracy(logits_ice, ids)
        agree = (logits_sm.argmax(-1) == logits_ice.argmax(-1)).float().mean().item()
        for layer, t_sm, t_ice, err in rows:
            tail = f" | {acc_sm:>9.3f} {acc_ice:>8.3f} {agree:>6.3f}" if layer == 0 else ""
            print(f"{n:>6} {k:>5} {probe:>5} {layer:>5} {t_sm:>9.1f} {t_ice:>8.1f} {t_sm / t_ice:>7.2f}x "
                  f"{err:>8.4f}{tail}", flush=True)


if __name__ == "__main__":
    main()
