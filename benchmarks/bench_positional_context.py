"""Rotary tables computed once per forward (the backbone's PositionalContext) vs once per layer and
per q/k call (how mixers rotated before), on the same model, interleaved in one run.

"per layer" swaps the model's scheme for one whose rotation recomputes angles, cos and sin in fp32
on every ``queries``/``keys`` call and upcasts q/k to fp32 to rotate them, exactly as the mixers
did before the context existed. Same weights, same outputs (checked); only where the work happens
differs.

    python benchmarks/bench_positional_context.py [--lengths 1024 4096] [--layers 8] [--repeat 5]
"""

from __future__ import annotations

import argparse

import torch

import efformer
from efformer.bench.perf import time_ms
from efformer.nn.positional import PositionalContext, Rope


class PerCallRotation:
    """The old per-call rotation: angles, cos and sin recomputed for every q and every k."""

    def __init__(self, rope: Rope, positions: torch.Tensor):
        self.rope, self.positions = rope, positions

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        ang = self.positions[:, None, :, None].float() * self.rope.inv_freq
        cos, sin = ang.cos(), ang.sin()
        r = self.rope.rot_dim
        xr, xp = x[..., :r].float(), x[..., r:]
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
        return torch.cat([out.to(x.dtype), xp], dim=-1)

    queries = keys = _rotate


class PerLayerRope(Rope):
    """RoPE whose context defers all table work to every rotate call (the old behaviour)."""

    def context(self, positions, dtype):
        """A context whose rotation recomputes its tables on each call."""
        return PositionalContext(positions, rotation=PerCallRotation(self, positions))


def main() -> None:
    """Time both ways for each length and print the table."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    model = efformer.create_model("lm-small", n_layers=a.layers, d_model=a.d_model, n_heads=a.heads,
                                  positional="rope", max_len=max(a.lengths)).eval()
    once = model.backbone.pos
    per_layer = PerLayerRope(a.d_model, a.heads, max(a.lengths), True)
    print(f"{a.layers}-layer RoPE LM, d_model={a.d_model}, heads={a.heads}, batch={a.batch}, fp32, forward, "
          f"threads={torch.get_num_threads()}; min of {a.repeat} interleaved medians")
    print(f"{'N':>6} {'per layer ms':>13} {'once ms':>9} {'once / per layer':>17}")
    for n in a.lengths:
        ids = torch.randint(0, model.cfg.vocab_size, (a.batch, n))

        def run(scheme, ids=ids):
            model.backbone.pos = scheme
            with torch.no_grad():
                return model(ids)

        assert torch.allclose(run(once), run(per_layer), atol=1e-5), "the two ways must compute the same logits"
        best = {"per": float("inf"), "once": float("inf")}
        for _ in range(a.repeat):  # interleave, so machine noise hits both alike
            best["per"] = min(best["per"], time_ms(lambda: run(per_layer), warmup=1, repeat=3))
            best["once"] = min(best["once"], time_ms(lambda: run(once), warmup=1, repeat=3))
        model.backbone.pos = once
        print(f"{n:>6} {best['per']:>13.1f} {best['once']:>9.1f} {best['once'] / best['per']:>17.3f}")


if __name__ == "__main__":
    main()
