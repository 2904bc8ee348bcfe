"""``prune(model, method, what, target, calibration)``: score, allocate under a budget, cut.

A target keeps a fraction of a measure of the input model: ``params`` (distinct parameters),
``flops`` (forward FLOPs per token, ``prune.flops_per_token``), ``latency`` (measured forward time,
so the search re-measures each candidate), or ``units`` (the fraction of heads-groups / neurons /
blocks kept). It is met when the achieved fraction is within ``tolerance`` (default 0.01, i.e. one
percentage point of the original) of the target; a unit size too coarse for that (one block of a
4-layer model is ~25% of it) is refused with the achievable fractions named.

Allocation, by method:

* magnitude, wanda, taylor: the same fraction of units in every layer (the lowest-scored ones),
  since their raw scores are not comparable across layers;
* optin: one global ranking of all units by trajectory score per parameter (OPTIN's scores compare
  across layers), removing the lowest until the budget is met;
* amp: AMP's per-layer binary search: each layer drops the largest number of its lowest-scored
  neurons whose removal alone keeps the KL divergence of the model's predictions from the original's
  below a tolerance eps; the tolerance is then searched (log scale) until the budget is met;
* block-influence: the blocks with the lowest influence go first.

Every family is monotone in one parameter t in [0, 1] (more removed as t grows), so one bisection
over t serves all; the closest plan seen wins.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from efformer.compress import importance
from efformer.compress.prune import (
    PrunePlan,
    apply_plan,
    blocks_of,
    count_params,
    flops_per_token,
    meta_model,
    n_units,
    owners,
    pruned_config,
)
from efformer.errors import ConfigError

TARGET_KINDS = ("params", "flops", "latency", "units")
AMP_EPS = (1e-6, 1e2)  # range of AMP's KL tolerance (nats), searched on a log scale
AMP_WINDOWS = 2  # calibration windows AMP's per-layer search evaluates the KL on
AMP_GRID = 32  # steps of the per-layer binary search (a layer drops a multiple of ~1/32 of its neurons)
Progress = Callable[[str], None]


class BudgetError(ConfigError):
    """A target that cannot be met: it removes everything or nothing, or no plan lands within tolerance."""


@dataclass(frozen=True)
class Target:
    """Keep ``value`` (0 < value < 1) of the input model's ``kind`` (params, flops, latency, units)."""

    kind: str
    value: float


def parse_target(text: str) -> Target:
    """``"params=0.6"`` -> Target("params", 0.6); a BudgetError naming the problem otherwise."""
    kind, sep, value = str(text).partition("=")
    if not sep or kind not in TARGET_KINDS:
        raise BudgetError("target", text, f"KIND=FRACTION with KIND one of {', '.join(TARGET_KINDS)}, e.g. "
                          "params=0.6 (keep 60% of the parameters)")
    try:
        v = float(value)
    except ValueError:
        raise BudgetError("target", text, "a number after '=', e.g. params=0.6") from None
    return check_target(Target(kind, v))


def check_target(target: Target) -> Target:
    """Refuse targets that keep everything or nothing."""
    if not isinstance(target, Target) or target.kind not in TARGET_KINDS:
        raise BudgetError("target", target, f"a Target(kind, value) with kind one of {', '.join(TARGET_KINDS)}")
    if not math.isfinite(target.value) or target.value <= 0:
        raise BudgetError("target", f"{target.kind}={target.value}", "a fraction above 0: it would remove everything")
    if target.value >= 1:
        raise BudgetError("target", f"{target.kind}={target.value}", "a fraction below 1: it would remove nothing")
    return target


@dataclass
class PruneResult:
    """The pruned model, the plan that made it, and the achieved fraction of the target's measure."""

    model: nn.Module
    plan: PrunePlan
    target: Target
    achieved: float


def measure_latency(model: nn.Module, seq: int = 128, repeat: int = 5) -> float:
    """Median seconds of one forward of a (1, seq) batch (after one warm-up run)."""
    x = torch.randint(0, model.cfg.vocab_size, (1, min(seq, model.cfg.max_len)),
                      device=next(model.parameters()).device)
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeat):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# ---- plan families -------------------------------------------------------------------------------
def _plan(what: str, removed: list[list[int]], model: nn.Module) -> PrunePlan:
    """A PrunePlan from per-layer removed unit indices (heads: KV groups -> their query heads)."""
    if what == "blocks":
        return PrunePlan(blocks=[i for i, r in enumerate(removed) if r])
    if what == "neurons":
        return PrunePlan(neurons={i: r for i, r in enumerate(removed) if r})
    plan = PrunePlan()
    for i, (blk, groups) in enumerate(zip(blocks_of(model), removed, strict=True)):
        g = blk.mixer.n_heads // blk.mixer.n_kv_heads
        if groups:
            plan.heads[i] = [h for k in groups for h in range(k * g, (k + 1) * g)]
    return plan


def _uniform(scores: list[Tensor]) -> Callable[[float], list[list[int]]]:
    orders = [torch.argsort(s, stable=True).tolist() for s in scores]

    def family(t: float) -> list[list[int]]:
        return [o[:min(math.floor(t * len(o) + 1e-9), len(o) - 1)] for o in orders]
    return family


def _global(scores: list[Tensor], costs: list[Tensor], keep_one: bool) -> Callable[[float], list[list[int]]]:
    """Remove the globally lowest score-per-cost units; ``keep_one``: never the last unit of a layer."""
    flat = sorted((float(s[j] / costs[i][j]), i, j) for i, s in enumerate(scores) for j in range(len(s)))
    sizes = [len(s) for s in scores]

    def family(t: float) -> list[list[int]]:
        m = math.floor(t * len(flat) + 1e-9)
        out: list[list[int]] = [[] for _ in scores]
        for _, i, j in flat:
            if sum(map(len, out)) >= m:
                break
            if keep_one and len(out[i]) >= sizes[i] - 1:
                continue
            out[i].append(j)
        if not keep_one and sum(map(len, out)) >= len(flat):  # blocks: keep at least one
            out[flat[-1][1]] = []
        return [sorted(o) for o in out]
    return family


def _unit_costs(model: nn.Module, what: str) -> list[Tensor]:
    """Parameters each unit owns, per layer (OPTIN ranks importance per parameter removed)."""
    out = []
    for blk in blocks_of(model):
        cost = torch.zeros(n_units(blk, what), dtype=torch.float64)
        named = dict(blk.named_parameters())
        named = {k.removeprefix("block."): v for k, v in named.items()}
        for name, (dim, own) in owners(blk, what).items():
            other = named[name].numel() // named[name].shape[dim]
            cost.index_add_(0, own, torch.full((own.numel(),), float(other), dtype=torch.float64))
        out.append(cost)
    return out


def _amp(model: nn.Module, scores: list[Tensor], calibration: Tensor, progress: Progress) -> Callable:
    """AMP's family: t -> eps on a log scale -> per-layer binary search of the neurons to drop, over a grid
    of AMP_GRID steps per layer (KL evaluations are cached, so the outer search over eps reuses them)."""
    blocks = blocks_of(model)
    orders = [torch.argsort(s, stable=True) for s in scores]
    x = calibration[:AMP_WINDOWS]
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ref = model(x).float().log_softmax(-1)
    cache: dict[tuple[int, int], float] = {}

    def kl(layer: int, k: int) -> float:
        if k == 0:
            return 0.0
        if (layer, k) not in cache:
            gates = [torch.ones(n_units(b, "neurons"), device=dev) for b in blocks]
            gates[layer][orders[layer][:k]] = 0
            with torch.no_grad(), importance.gated(model, "neurons", gates):
                logp = model(x).float().log_softmax(-1)
            cache[(layer, k)] = float((ref.exp() * (ref - logp)).sum(-1).mean())
        return cache[(layer, k)]

    def family(t: float) -> list[list[int]]:
        eps = AMP_EPS[0] * (AMP_EPS[1] / AMP_EPS[0]) ** t
        out = []
        for i, o in enumerate(orders):
            grid = sorted({round(j * (len(o) - 1) / AMP_GRID) for j in range(AMP_GRID + 1)})
            lo, hi = 0, len(grid) - 1  # largest grid point whose kl <= eps (kl(0) = 0)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if kl(i, grid[mid]) <= eps else (lo, mid - 1)
            out.append(sorted(o[:grid[lo]].tolist()))
        progress(f"amp: eps={eps:.3g} drops {[len(r) for r in out]} neurons per layer")
        return out
    family.restore = lambda: model.train(was_training)  # type: ignore[attr-defined]
    return family


# ---- the search ----------------------------------------------------------------------------------
def _metric(model: nn.Module, target: Target, what: str, latency_fn: Callable[[nn.Module], float] | None,
            context: int) -> Callable[[PrunePlan, list[list[int]]], float]:
    if target.kind == "units":
        total = sum(n_units(b, what) for b in blocks_of(model))
        return lambda plan, removed: 1 - sum(map(len, removed)) / total
    if target.kind == "latency":
        fn = latency_fn or measure_latency
        base = fn(model)
        return lambda plan, removed: fn(apply_plan(model, plan)) / base
    measure = count_params if target.kind == "params" else (lambda m: flops_per_token(m, context))
    base = measure(model)
    return lambda plan, removed: measure(meta_model(model, pruned_config(model, plan))) / base


def prune(model: nn.Module, method: str, what: str, target: Target | str, calibration: Tensor | None = None, *,
          tolerance: float = 0.01, latency_fn: Callable[[nn.Module], float] | None = None, context: int = 256,
          progress: Progress | None = None, scores: list[Tensor] | None = None) -> PruneResult:
    """Remove ``what`` (heads, neurons, blocks) of ``model`` ranked by ``method`` until ``target`` is met
    within ``tolerance``; returns a new model (``model`` is untouched, also on error). ``scores``: this
    method's ``importance.scores`` of ``model`` computed before (several targets, one scoring)."""
    target = parse_target(target) if isinstance(target, str) else check_target(target)
    importance.check_method(model, method, what, calibration)
    progress = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    sc = scores if scores is not None else importance.scores(model, method, what, calibration)
    progress(f"scored {sum(len(s) for s in sc)} {what} with {method} in {time.perf_counter() - t0:.1f}s")
    if method == "amp":
        family = _amp(model, sc, calibration, progress)
    elif method == "optin":
        family = _global(sc, _unit_costs(model, what), keep_one=True)
    elif what == "blocks":
        family = _global(sc, [torch.ones(1) for _ in sc], keep_one=False)
    else:
        family = _uniform(sc)
    metric = _metric(model, target, what, latency_fn, context)
    try:
        best = _search(model, family, metric, target, what, tolerance, progress)
    finally:
        getattr(family, "restore", lambda: None)()
    plan, achieved = best
    progress(f"plan keeps {target.kind}={achieved:.4f} (target {target.value}); cutting")
    return PruneResult(apply_plan(model, plan), plan, target, achieved)


def _search(model, family, metric, target: Target, what: str, tolerance: float, progress: Progress):
    """Bisection over t for metric(plan(t)) ~ target; the closest plan seen, or a BudgetError."""
    seen: dict[str, tuple[PrunePlan, float]] = {}

    def at(t: float) -> float:
        removed = family(t)
        key = repr(removed)
        if key not in seen:
            plan = _plan(what, removed, model)
            seen[key] = (plan, 1.0 if plan.empty else metric(plan, removed))
        return seen[key][1]

    floor = at(1.0)
    if floor > target.value + tolerance:
        raise BudgetError("target", f"{target.kind}={target.value}", f"at least {floor:.3f}: removing every "
                          f"{what[:-1]} that can go (one per layer stays) keeps {target.kind}={floor:.3f}")
    lo, hi = 0.0, 1.0
    steps = 8 if target.kind == "latency" else 40
    for _ in range(steps):
        mid = (lo + hi) / 2
        if at(mid) > target.value:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-7:
            break
    plan, achieved = min(seen.values(), key=lambda pa: abs(pa[1] - target.value))
    if abs(achieved - target.value) > tolerance or plan.empty:
        near = sorted({round(v, 3) for _, v in seen.values()}, key=lambda v: abs(v - target.value))[:3]
        raise BudgetError("target", f"{target.kind}={target.value}", f"a fraction these {what} can reach within "
                          f"{tolerance}: the nearest plans keep {target.kind}={near}; pick one of those (or "
                          f"--target units=... for whole {what})")
    return plan, achieved
