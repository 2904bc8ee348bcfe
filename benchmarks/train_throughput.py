"""Training throughput of a causal LM through the real Trainer: tokens/s and model FLOPs utilisation.

MFU = achieved model FLOP/s / the fp32 matmul peak measured in the same run. Model FLOPs per token
are 6 x (matmul parameters, the tied output head included) + 12 x layers x d_model x seq_len for
attention scores and values (the usual PaLM/nanoGPT accounting).

    python benchmarks/train_throughput.py [--preset lm-small] [--seq-len 256] [--batch 8] [--steps 12]
"""

from __future__ import annotations

import argparse
import io
import time

import torch

from efformer.bench.perf import matmul_peak_gflops
from efformer.models import create_model
from efformer.train.data import TensorExamples
from efformer.train.trainer import Trainer


def main() -> None:
    """Train a few steps and print tokens/s and MFU."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="lm-small")
    p.add_argument("--mixer", default="softmax")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = create_model(a.preset, mixer=a.mixer, max_len=a.seq_len)
    cfg = model.cfg
    data = TensorExamples(torch.randint(0, cfg.vocab_size, (a.batch * (a.steps + 2), a.seq_len)))
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    if cfg.tie_embeddings:
        matmul_params += model.backbone.embed.weight.numel()
    flops_per_token = 6 * matmul_params + 12 * cfg.n_layers * cfg.d_model * a.seq_len
    peak = matmul_peak_gflops()
    settings = {"steps": a.steps + 2, "batch_size": a.batch, "eval_every": 0, "checkpoint_every": 0, "log_every": 1000}
    trainer = Trainer(model, settings, data, out_dir="/tmp/efformer-throughput", progress_stream=io.StringIO())
    trainer.train_step()
    trainer.train_step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(a.steps):
        trainer.train_step()
    dt = time.perf_counter() - t0
    tok_s = a.steps * a.batch * (a.seq_len - 1) / dt
    achieved = tok_s * flops_per_token / 1e9
    print(f"{a.preset} ({cfg.n_layers} layers, d={cfg.d_model}, mixer={a.mixer}), seq {a.seq_len}, batch {a.batch}, "
          f"{a.threads} threads")
    print(f"matmul peak (fp32 1024^3, same run): {peak:.1f} GFLOP/s")
    print(f"tokens/s: {tok_s:,.0f}   model GFLOP/s: {achieved:.1f}   MFU: {achieved / peak:.1%}")


if __name__ == "__main__":
    main()
