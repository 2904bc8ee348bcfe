"""Speculative decoding with a draft model: the draft proposes k tokens, the target checks them in
one forward pass, and a rejection rule keeps the output distributed exactly as the target's.

From "Fast Inference from Transformers via Speculative Decoding" (Leviathan et al., 2023) and
"Accelerating Large Language Model Decoding with Speculative Sampling" (Chen et al., 2023): a
drafted token x ~ q is kept with probability min(1, p(x) / q(x)); at the first rejection the token
is drawn from norm(max(0, p - q)); when all k are kept a bonus token is drawn from the target.
Greedy decoding keeps a drafted token iff it is the target's argmax, so the output is the target's
greedy output. The draft may be any efformer LM over the same vocabulary (e.g. a small recurrent one).
Rejected tokens are undone by truncating plain KV caches, or by restoring a snapshot and feeding the
kept tokens again for any other state (recurrent, SSM, window).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from efformer.errors import ConfigError
from efformer.mixers.softmax import KVState
from efformer.models.cache import Cache
from efformer.models.lm import CausalLM


@dataclass
class SpeculativeStats:
    """Counts of one run: drafted and accepted tokens, target forward passes."""

    drafted: int = 0
    accepted: int = 0
    target_calls: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens the target kept."""
        return self.accepted / self.drafted if self.drafted else 0.0


def probabilities(logits: Tensor, temperature: float, top_k: int | None = None) -> Tensor:
    """Sampling distribution (..., vocab) of logits at ``temperature`` > 0, optionally top-k filtered."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return F.softmax(logits, -1)


def accept_drafts(p: Tensor, q: Tensor, drafts: Tensor, generator=None) -> tuple[int, int]:
    """The rejection rule over k drafted tokens (k,) with target p (k + 1, vocab) and draft q (k, vocab)
    distributions: (number kept m, the next token: residual sample at m < k, else a bonus from p[k])."""
    k = drafts.shape[0]
    idx = torch.arange(k, device=p.device)
    ratio = p[idx, drafts] / q[idx, drafts].clamp_min(torch.finfo(q.dtype).tiny)
    u = torch.rand(k, generator=generator, device=p.device)
    rejected = (u >= ratio).nonzero()
    m = int(rejected[0]) if rejected.numel() else k
    if m == k:
        dist = p[k]
    else:
        dist = (p[m] - q[m]).clamp_min(0)
        dist = dist / dist.sum() if float(dist.sum()) > 0 else p[m]  # p == q there: any draw from p is exact
    return m, int(torch.multinomial(dist, 1, generator=generator))


def _snapshot(cache: Cache) -> Cache | None:
    """A copy to roll back to, or None when every layer is a plain KV cache (truncated instead)."""
    if all(type(s) is KVState for s in cache.states):
        return None
    return copy.deepcopy(cache)


def _rollback(model: CausalLM, cache: Cache, snap: Cache | None, extra: int, refeed: list[int]) -> Cache:
    """``cache`` without its last ``extra`` tokens; ``refeed`` are the kept tokens fed since ``snap``."""
    if extra == 0:
        return cache
    if snap is None:
        for s in cache.states:
            s.length -= extra
            s.seen -= extra
        cache.next_position = cache.next_position - extra
        return cache
    model(torch.tensor([refeed], device=cache.next_position.device), cache=snap)
    return snap


@torch.no_grad()
def speculative_generate(target: CausalLM, draft: CausalLM, prompt: list[int], max_new_tokens: int, *,
                         k: int = 4, temperature: float = 0.0, top_k: int | None = None,
                         generator: torch.Generator | None = None) -> tuple[list[int], SpeculativeStats]:
    """New tokens (at most ``max_new_tokens``) for one prompt, and the run's acceptance counts."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError("k", k, "a positive integer (tokens drafted per target call)")
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise ConfigError("draft", draft.cfg.vocab_size, f"a draft over the target's vocabulary "
                          f"({target.cfg.vocab_size} tokens)")
    if not target.backbone.can_decode or not draft.backbone.can_decode:
        raise ConfigError("draft", "no decode state", "target and draft mixers must all have decode states")
    target.eval(), draft.eval()
    device = target.backbone.embed.weight.device
    stats = SpeculativeStats()
    greedy = temperature == 0
    tc, dc = target.new_cache(1), draft.new_cache(1)
    ids = torch.tensor([prompt], device=device)
    if len(prompt) > 1:  # the caches hold all but the last token, which the first call feeds
        target(ids[:, :-1], cache=tc)
        draft(ids[:, :-1], cache=dc)
    out: list[int] = []
    pending = prompt[-1]
    while len(out) < max_new_tokens:
        kk = min(k, max_new_tokens - len(out))
        # the draft proposes kk tokens, one decode step each
        d_snap = _snapshot(dc)
        drafts, qs, tok = [], [], pending
        for _ in range(kk):
            logits = draft(torch.tensor([[tok]], device=device), cache=dc)[0, -1]
            if greedy:
                tok = int(logits.argmax())
            else:
                q = probabilities(logits, temperature, top_k)
                tok = int(torch.multinomial(q, 1, generator=generator))
                qs.append(q)
            drafts.append(tok)
        # the target scores pending + drafts in one pass: kk + 1 next-token distributions
        t_snap = _snapshot(tc)
        logits = target(torch.tensor([[pending, *drafts]], device=device), cache=tc)[0]
        stats.target_calls += 1
        if greedy:
            best = logits.argmax(-1).tolist()
            m = next((i for i in range(kk) if drafts[i] != best[i]), kk)
            nxt = best[m]
        else:
            m, nxt = accept_drafts(probabilities(logits, temperature, top_k), torch.stack(qs),
                                   torch.tensor(drafts, device=device), generator)
        stats.drafted += kk
        stats.accepted += m
        kept = drafts[:m]
        out += kept + [nxt]
        # target consumed pending + kk drafts; it must hold pending + kept
        tc = _rollback(target, tc, t_snap, kk - m, [pending, *kept])
        # draft consumed pending + drafts[:-1]; it must hold pending + kept
        if m == kk:
            draft(torch.tensor([[drafts[-1]]], device=device), cache=dc)
        else:
            dc = _rollback(draft, dc, d_snap, kk - 1 - m, [pending, *kept])
        pending = nxt
    return out[:max_new_tokens], stats
