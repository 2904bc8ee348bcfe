"""Aaren: softmax attention of a learned query over every prefix, computed as an RNN or a prefix scan.

Paper: "Attention as an RNN" (Feng, Tung, Hajimirsadeghi, Ahmed, Bengio & Mori, 2024).

Each head has one learned query q. The output at step t is softmax attention of q over the keys
and values of steps 1..t: ``o_t = sum_i exp(s_i) v_i / sum_i exp(s_i)`` with ``s_i = q.k_i / sqrt(d)``.
It is held as a running triple (m, u, w) = (max score, sum exp(s - m), sum exp(s - m) v), and
triples combine associatively:
``(ma, ua, wa) + (mb, ub, wb) = (m, ua e^(ma-m) + ub e^(mb-m), wa e^(ma-m) + wb e^(mb-m))``, m = max(ma, mb).

Forms: "reference" is the explicit masked softmax of q over each prefix (O(N^2)); "fast" is a
Hillis-Steele parallel prefix scan of the triples (log2 N vector steps, O(N log N) work, never an
N x N matrix); "recurrent" folds one token at a time into the decode state (m, u, w).

Padding: a padded step is the empty triple (m = -inf, u = 0, w = 0), the identity of the
combination, so it leaves the state unchanged and its content never reaches real outputs. A prefix
with no real step (left padding) has output 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from efformer.mixers.base import Mixer, MixerState, causal_recurrent
from efformer.registry import register_mixer


@dataclass
class PrefixSoftmaxState(MixerState):
    """Running softmax triple per head: max score m (b, h), denominator u (b, h), numerator w (b, h, d)."""

    m: Tensor
    u: Tensor
    w: Tensor


def combine(ma: Tensor, ua: Tensor, wa: Tensor, mb: Tensor, ub: Tensor, wb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Associative combination of two (m, u, w) triples (m, u: (...); w: (..., d)); empty = (-inf, 0, 0)."""
    m = torch.maximum(ma, mb)
    # When both sides are empty m is -inf; shifting by 0 there keeps exp(-inf - shift) = 0 and NaN-free.
    shift = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    sa, sb = torch.exp(ma - shift), torch.exp(mb - shift)
    return m, ua * sa + ub * sb, wa * sa[..., None] + wb * sb[..., None]


def read_out(u: Tensor, w: Tensor) -> Tensor:
    """The attention output w / u (..., d); 0 where the prefix is empty (u = 0)."""
    return w / torch.where(u > 0, u, torch.ones_like(u))[..., None]


def prefix_scan(m: Tensor, u: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inclusive Hillis-Steele scan of triples along dim 2: m, u (b, h, n); w (b, h, n, d)."""
    n, step = m.shape[2], 1
    while step < n:
        # Combine each element with the one `step` places earlier (the empty triple before the start).
        pm = torch.cat([m.new_full((*m.shape[:2], step), float("-inf")), m[:, :, :-step]], dim=2)
        pu = torch.cat([u.new_zeros((*u.shape[:2], step)), u[:, :, :-step]], dim=2)
        pw = torch.cat([w.new_zeros((*w.shape[:2], step, w.shape[3])), w[:, :, :-step]], dim=2)
        m, u, w = combine(pm, pu, pw, m, u, w)
        step *= 2
    return m, u, w


@register_mixer("aaren")
class Aaren(Mixer):
    """Aaren: per-head learned-query softmax attention over each prefix, as a prefix scan or an RNN; O(N log N)."""

    capabilities = causal_recurrent(
        paper="Attention as an RNN",
        time="O(N log N d) scan, O(N d) recurrent",
        memory="O(N d log N) scan (training), O(d) decode state",
        forms=("reference", "fast", "recurrent"),
    )

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        self.query = nn.Parameter(torch.randn(n_heads, self.head_dim))  # the learned query of each head
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """Value rows of the fused k|v projection, and the output projection."""
        return {"value": [self.kv_proj.weight[self.d_model :]], "output": [self.out_proj.weight]}

    def init_state(self, batch, device, dtype) -> PrefixSoftmaxState:
        """The empty triple (m = -inf, u = 0, w = 0) per head."""
        h, d = self.n_heads, self.head_dim
        return PrefixSoftmaxState(
            m=torch.full((batch, h), float("-inf"), device=device, dtype=dtype),
            u=torch.zeros(batch, h, device=device, dtype=dtype),
            w=torch.zeros(batch, h, d, device=device, dtype=dtype),
        )

    def _scores(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Scores s (b, h, n) (-inf at pads), values v (b, h, n, d) (0 at pads), and u = 1 or 0 (b, h, n)."""
        k, v = self.split_heads(self.kv_proj(x), 2 * self.n_heads).chunk(2, dim=1)
        s = torch.einsum("bhnd,hd->bhn", k, self.query) / math.sqrt(self.head_dim)
        u = torch.ones_like(s)
        if mask is not None:
            keep = mask[:, None, :]
            s, u = s.masked_fill(~keep, float("-inf")), u * keep
            v = torch.where(keep[..., None], v, torch.zeros_like(v))
        return s, v, u

    def _finish(self, o: Tensor) -> Tensor:
        return self.out_proj(self.merge_heads(o))

    def forward_reference(self, x, *, mask, state, pos):
        """Explicit softmax of the query over each prefix; a carried state is one extra summarised key."""
        s_new, v_new, u1 = self._scores(x, mask)
        s, v, (b, h, n) = s_new, v_new, s_new.shape
        allowed = torch.ones(n, n, dtype=torch.bool, device=x.device).tril() & (u1[:, :, None, :] > 0)
        if state is not None:
            # The triple (m, u, w) acts as one key with score m + log u and value w / u (absent when u = 0).
            u0 = torch.where(state.u > 0, state.u, torch.ones_like(state.u))
            s = torch.cat([(state.m + torch.log(u0))[..., None], s], dim=2)
            v = torch.cat([(state.w / u0[..., None])[:, :, None], v], dim=2)
            allowed = torch.cat([(state.u > 0)[:, :, None, None].expand(b, h, n, 1), allowed], dim=3)
        nonempty = allowed.any(-1, keepdim=True)
        logits = torch.where(allowed, s[:, :, None, :], float("-inf"))
        # A row with nothing to attend to (a left-padded prefix) gets uniform dummy weights, then 0.
        logits = torch.where(nonempty, logits, torch.zeros_like(logits))
        o = (logits.softmax(-1) * nonempty) @ v
        if state is not None:
            # This call's keys summarised explicitly, then folded into the carried triple.
            m = s_new.amax(-1)
            e = torch.exp(s_new - torch.where(torch.isinf(m), torch.zeros_like(m), m)[..., None]) * u1
            state.m, state.u, state.w = combine(state.m, state.u, state.w, m, e.sum(-1), (e[..., None] * v_new).sum(2))
        return self._finish(o), state

    def forward_fast(self, x, *, mask, state, pos):
        """Parallel prefix scan of (m, u, w) triples, continued from the decode state if given."""
        s, v, u = self._scores(x, mask)
        m, u, w = prefix_scan(s, u, v * u[..., None])
        if state is not None:
            m, u, w = combine(state.m[..., None], state.u[..., None], state.w[:, :, None], m, u, w)
            state.m, state.u, state.w = m[:, :, -1], u[:, :, -1], w[:, :, -1]
        return self._finish(read_out(u, w)), state

    def forward_recurrent(self, x, *, mask, state, pos):
        """Fold one token at a time into the running triple (the RNN view)."""
        s, v, u = self._scores(x, mask)
        st = state if state is not None else self.init_state(x.shape[0], x.device, x.dtype)
        m0, u0, w0 = st.m, st.u, st.w
        outs = []
        for t in range(x.shape[1]):
            m0, u0, w0 = combine(m0, u0, w0, s[:, :, t], u[:, :, t], v[:, :, t])
            outs.append(read_out(u0, w0))
        if state is not None:
            state.m, state.u, state.w = m0, u0, w0
        return self._finish(torch.stack(outs, 2)), state
