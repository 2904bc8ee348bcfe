"""Reformer LSH attention: shared-QK attention restricted to hash buckets of sorted, chunked tokens.

Paper: "Reformer: The Efficient Transformer" (Kitaev, Kaiser, Levskaya, 2020).

Per hashing round r, every token's shared query/key vector is hashed by a random rotation R_r
(``h(x) = argmax([xR; -xR])``); tokens are sorted by (bucket, position) and the sorted sequence is
cut into chunks of ``chunk_size``. Token i may attend to token j in round r iff they share a bucket
and j's chunk is i's chunk or the one before it (the set P_i^r of the paper). Keys are the
length-normalised queries; attending to oneself costs a 1e5 penalty, so a token attends to itself
only when nothing else is in its set. Rounds are combined with the paper's log-sum-exp weights and
the log N_ij duplicate correction (N_ij = number of rounds in which j is in P_i^r), which makes the
result a softmax over the union of all rounds' sets.

Causal mode chunks each bucket on its own (chunk = rank within the bucket // chunk_size) instead of
cutting the global sorted order: global chunk boundaries move when a *future* token lands in a lower
bucket, which would leak the future into the past. Bidirectional mode keeps the paper's global cut.
Padded tokens go to an extra last bucket, so they never change a real token's bucket, rank or chunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from efformer.errors import ConfigError
from efformer.mixers.base import Capabilities, Mixer, MixerOptions, causal_keep
from efformer.registry import register_mixer

# Score penalty for attending to oneself (the paper's 10^5): large enough that exp() underflows to 0
# whenever any other key is allowed, small enough to stay finite when the token is alone.
SELF_PENALTY = 1e5


class ReformerOptions(MixerOptions):
    """Options of Reformer LSH attention."""

    n_buckets: int = Field(
        16, ge=1,
        description="hash buckets per round: even (argmax over [xR; -xR]) or 1 (no hashing)",
    )
    n_hashes: int = Field(2, ge=1, description="hashing rounds, combined by their log-sum-exp weights")
    chunk_size: int = Field(64, ge=1, description="sorted chunk length; a chunk attends to itself and one chunk back")


@register_mixer("reformer")
class ReformerAttention(Mixer):
    """Reformer LSH attention: shared QK, angular hashing, sorted chunks with one chunk of look-back."""

    # The plain N x N form is faster than sorting and chunking up to ~256 tokens on CPU (measured).
    reference_below = 256

    capabilities = Capabilities(
        family="hashing",
        paper="Reformer: The Efficient Transformer",
        causal=True,
        bidirectional=True,
        padding_mask=True,
        decode=False,  # bucket sorting needs the whole sequence; models recompute instead
        exact=False,
        time="O(n_hashes N (log N + chunk d + n_hashes chunk))",
        memory="O(n_hashes^2 N chunk) fast, O(n_hashes N^2) reference",
        forms=("reference", "fast"),
    )
    Options = ReformerOptions
    test_options = {"n_buckets": 4, "n_hashes": 2, "chunk_size": 2}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        nb = self.opts.n_buckets
        if nb != 1 and nb % 2:
            raise ConfigError("reformer.n_buckets", nb, "must be even (hashing is argmax over [xR; -xR]) or 1")
        self.qk_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        # Rotations are shared by both forms and saved with the model; redraw_rotations() resamples them.
        self.register_buffer("rotations", torch.randn(self.opts.n_hashes, self.head_dim, max(nb // 2, 1)))

    @torch.no_grad()
    def init_roles(self) -> dict[str, list[Tensor]]:
        """The value projection and the output projection."""
        return {"value": [self.v_proj.weight], "output": [self.out_proj.weight]}

    def redraw_rotations(self) -> None:
        """Draw new random rotations (n_hashes, head_dim, n_buckets/2) from the global torch seed."""
        self.rotations.copy_(torch.randn_like(self.rotations))

    def buckets(self, qk: Tensor, keep: Tensor | None = None) -> Tensor:
        """Bucket ids (batch, heads, n_hashes, seq) of shared-QK vectors (batch, heads, seq, head_dim).

        Padded tokens (``keep`` False) get the extra bucket ``n_buckets``, sorted after all real ones.
        """
        b, h, n, _ = qk.shape
        if self.opts.n_buckets == 1:
            ids = torch.zeros(b, h, self.opts.n_hashes, n, dtype=torch.long, device=qk.device)
        else:
            rotated = torch.einsum("bhnd,rdk->bhrnk", qk.detach(), self.rotations.to(qk.dtype))
            ids = torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)
        if keep is not None:
            ids = ids.masked_fill(~keep[:, None, None, :], self.opts.n_buckets)
        return ids

    # ---- shared parts ---------------------------------------------------------------------
    def _project(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Shared qk, normalised keys, values (b, h, n, d) and bucket ids (b, h, R, n)."""
        qk = self.split_heads(self.qk_proj(x))
        v = self.split_heads(self.v_proj(x))
        # Keys are unit-length queries scaled by 1/sqrt(d): q.k then measures angle times |q|.
        k = F.normalize(qk, dim=-1) / math.sqrt(self.head_dim)
        return qk, k, v, self.buckets(qk, mask)

    def _combine(self, o: Tensor, lse: Tensor) -> Tensor:
        """Rounds (b, h, R, n, d) weighted by softmax over rounds of their log-sum-exps (b, h, R, n)."""
        w = lse.softmax(dim=2)
        return self.out_proj(self.merge_heads((w[..., None] * o).sum(dim=2)))

    # ---- forms ----------------------------------------------------------------------------
    def forward_reference(self, x, *, mask, state, pos):
        """Per round an explicit N x N pattern from bucket ranks, masked softmax, then the lse combination."""
        qk, k, v, ids = self._project(x, mask)
        n, m = x.shape[1], self.opts.chunk_size
        same = ids[..., :, None] == ids[..., None, :]  # (b, h, R, n_i, n_j)
        before = torch.arange(n, device=x.device)
        before = before[None, :] < before[:, None]  # j earlier than i
        rank = (same & before).sum(-1)  # place of i among its bucket, in position order
        if not self.causal:  # place in the global (bucket, position) order
            rank = rank + (ids[..., None, :] < ids[..., :, None]).sum(-1)
        chunk = rank // m
        dc = chunk[..., :, None] - chunk[..., None, :]
        in_set = same & ((dc == 0) | (dc == 1))  # P_i^r: same bucket, own chunk or one back
        n_rounds = in_set.sum(dim=2, keepdim=True).clamp(min=1)  # N_ij (duplicate count over rounds)
        scores = (qk @ k.transpose(-1, -2))[:, :, None]  # (b, h, 1, n, n)
        # In the model's dtype (the counts and the identity would otherwise promote bf16 scores to fp32).
        eye = torch.eye(n, device=x.device, dtype=scores.dtype)
        logits = scores - n_rounds.to(scores.dtype).log() - SELF_PENALTY * eye
        allowed = in_set & causal_keep(n, n, x.device) if self.causal else in_set
        logits = logits.masked_fill(~allowed, float("-inf"))
        lse = logits.logsumexp(dim=-1)  # (b, h, R, n)
        p = F.dropout((logits - lse[..., None]).exp(), self.dropout, self.training)
        return self._combine(p @ v[:, :, None], lse), state

    def forward_fast(self, x, *, mask, state, pos):
        """Sort by (bucket, position), attend chunk-wise with one chunk back: O(N chunk) memory."""
        qk, k, v, ids = self._project(x, mask)
        b, h, R, n = ids.shape
        m, d, dev = self.opts.chunk_size, self.head_dim, x.device
        nb = self.opts.n_buckets + 1  # + the padding bucket
        ar = torch.arange(n, device=dev)
        order = (ids * n + ar).argsort(dim=-1)  # token at each sorted place (keys are unique)
        sorted_ids = ids.gather(-1, order)
        counts = torch.zeros(b, h, R, nb, dtype=torch.long, device=dev).scatter_add_(-1, ids, torch.ones_like(ids))
        start = counts.cumsum(-1) - counts
        rank = ar - start.gather(-1, sorted_ids)  # rank of each sorted token within its bucket
        if self.causal:  # each bucket starts on a chunk boundary (see the module docstring)
            room = (counts + m - 1) // m * m
            offset = room.cumsum(-1) - room
            length = n + min(nb, n) * (m - 1)
        else:
            offset, length = start, n
        length = -(-length // m) * m
        slot = offset.gather(-1, sorted_ids) + rank  # (b, h, R, n) slot of each sorted token
        # tok[slot] = token index, or n (a zero sentinel row) for an empty slot.
        tok = torch.full((b, h, R, length), n, dtype=torch.long, device=dev).scatter_(-1, slot, order)
        slot_of = torch.empty_like(order).scatter_(-1, order, slot)  # (b, h, R, n)
        chunk_of = slot_of // m  # only compared between tokens of one bucket, where it is rank-exact

        def take(t: Tensor, fill: float | int) -> Tensor:
            """Per-token rows (b, h, n, ...) laid out in slots -> (b, h, R, C, m, ...)."""
            t = torch.cat([t, t.new_full((b, h, 1, *t.shape[3:]), fill)], dim=2)
            t = t[:, :, None].expand(b, h, R, *t.shape[2:])
            idx = tok.view(b, h, R, length, *([1] * (t.dim() - 4))).expand(b, h, R, length, *t.shape[4:])
            return t.gather(3, idx).view(b, h, R, length // m, m, *t.shape[4:])

        def look_back(t: Tensor, fill: float | int) -> Tensor:
            """Keys of a chunk: the previous chunk (a sentinel chunk before the first) then its own."""
            prev = torch.cat([torch.full_like(t[:, :, :, :1], fill), t[:, :, :, :-1]], dim=3)
            return torch.cat([prev, t], dim=4)

        c = length // m
        q_tok = tok.view(b, h, R, c, m)
        q_all = take(ids.transpose(2, 3), -1)  # every round's bucket per slot: (b, h, R, C, m, R)
        q_chunks = take(chunk_of.transpose(2, 3), -1)
        q_ids = q_all.diagonal(dim1=2, dim2=-1).movedim(-1, 2)  # this round's bucket: (b, h, R, C, m)
        k_tok, k_ids, k_all, k_chunks = (look_back(t, -2) for t in (q_tok, q_ids, q_all, q_chunks))
        qs, ks, vs = take(qk, 0.0), look_back(take(k, 0.0), 0.0), look_back(take(v, 0.0), 0.0)

        dc = q_chunks[..., :, None, :] - k_chunks[..., None, :, :]
        n_rounds = ((q_all[..., :, None, :] == k_all[..., None, :, :]) & ((dc == 0) | (dc == 1))).sum(-1)
        logits = qs @ ks.transpose(-1, -2) - n_rounds.clamp(min=1).log()
        logits = logits - SELF_PENALTY * (q_tok[..., :, None] == k_tok[..., None, :])
        allowed = q_ids[..., :, None] == k_ids[..., None, :]  # same bucket (an empty slot never matches a real one)
        if self.causal:
            allowed = allowed & (k_tok[..., None, :] <= q_tok[..., :, None])
        allowed = allowed | (q_tok == n)[..., None]  # empty query slots: finite junk, never read back
        logits = logits.masked_fill(~allowed, float("-inf"))
        lse = logits.logsumexp(dim=-1)
        p = F.dropout((logits - lse[..., None]).exp(), self.dropout, self.training)
        o = (p @ vs).view(b, h, R, length, d)
        o = o.gather(3, slot_of[..., None].expand(b, h, R, n, d))
        lse = lse.view(b, h, R, length).gather(3, slot_of)
        return self._combine(o, lse), state
