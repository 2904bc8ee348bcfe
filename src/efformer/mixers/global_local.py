"""Global-local attention: ETC (global tokens + local long-token windows with relative positions) and FIT
(groups of tokens with local attention, interleaved with latent tokens that carry information between groups).

Papers: "ETC: Encoding Long and Structured Inputs in Transformers" (Ainslie et al., 2020); "FIT:
Far-reaching Interleaved Transformers" (Chen and Li, 2023).

ETC. The layer sees g global tokens and the N long tokens. Global tokens attend to, and are seen by,
every token; a long token sees long tokens within ``radius``. Scores carry learned relative-position
vectors (Shaw et al.): s_ij = q_i . (k_j + a_{l(i,j)}) / sqrt(d), with l the clipped distance j - i in
[-k, k] between two long or two global tokens, and one label each for global->long and long->global.
The global input is the first g tokens of x (``global_tokens="prefix"``, the caller's) or g learned
embeddings prepended inside the layer (``"learned"``; their outputs are dropped, so they act as a
learned memory). ETC's structured-input masks (hard global-to-segment links) and CPC pre-training
are not part of the mixer. Bidirectional only, as in the paper.

FIT. Tokens are cut into groups of ``group_size``; each group has ``n_latents`` latent tokens,
learned and shared by all groups. One layer runs the paper's interleaving once:
  1. latents read their group (cross-attention over [own latents; own tokens]), residually;
  2. all latents attend to each other (the global layer), residually;
  3. every token attends to [its group's tokens; its group's latents] (local attention + reading back).
Causal FIT attends causally inside groups and across latents, and a group reads the latents of the
group *before* it (whose read never saw later tokens). Steps 1-2 use their own projections (``lq``,
``l_out``, ``g_qkv``, ``g_out``); step 3 uses the softmax layout (q/kv/out projections), so FIT with
no latents is exactly block-local attention with the same weights.

Reference forms are dense attention over the whole sequence with the pattern as a mask; the fast
forms gather windows (ETC) or reshape into groups (FIT).
"""

from __future__ import annotations

import math
from typing import Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.mixers.base import Capabilities, pad_to_multiple
from efformer.mixers.softmax import SoftmaxAttention, SoftmaxOptions
from efformer.registry import register_mixer


def _masked_softmax_attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, extra: Tensor | None = None) -> Tensor:
    """softmax((q k^T + extra) / sqrt d, masked to ``allowed``) v; every row must allow at least one key."""
    s = q @ k.transpose(-1, -2)
    if extra is not None:
        s = s + extra
    s = (s / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))
    return s.softmax(-1) @ v


def _grouped_sdpa(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """SDPA on (b, h, groups, n, d) tensors with a bool mask (b|1, 1, groups, n, m): groups folded into the batch
    (4-D calls are what SDPA's fused CPU kernel, and the flop counter, handle)."""
    b, h, g = q.shape[:3]

    def fold(t: Tensor) -> Tensor:
        return t.transpose(1, 2).flatten(0, 1)

    mask = fold(allowed.expand(b, 1, *allowed.shape[2:]))
    o = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), attn_mask=mask)
    return o.unflatten(0, (b, g)).transpose(1, 2)


# ---- ETC ---------------------------------------------------------------------------------
class ETCOptions(SoftmaxOptions):
    """Options of ETC global-local attention."""

    radius: int = pydantic.Field(64, ge=0, description="r: a long token sees the long tokens j with |i - j| <= r")
    n_global: int = pydantic.Field(8, ge=1, description="g: global tokens, seen by and seeing every token")
    global_tokens: Literal["learned", "prefix"] = pydantic.Field(
        "learned", description="learned: g learned embeddings prepended in the layer; prefix: the first g inputs"
    )
    max_distance: int = pydantic.Field(16, ge=1, description="k: relative distances are clipped to [-k, k]")


@register_mixer("etc")
class ETCAttention(SoftmaxAttention):
    """ETC: global tokens attend everywhere, long tokens within a radius, scores with relative-position vectors."""

    capabilities = Capabilities(
        family="sparse",
        paper="ETC: Encoding Long and Structured Inputs in Transformers",
        causal=False,
        bidirectional=True,
        padding_mask=True,
        decode=False,
        exact=False,
        time="O((N + g) (g + r) d)",
        memory="O((N + g) (g + r)) fast, O((N + g)^2) reference",
        forms=("reference", "fast"),
    )
    Options = ETCOptions
    test_options = {"radius": 2, "n_global": 2, "max_distance": 3, "n_kv_heads": 2}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        k = self.opts.max_distance
        # Shaw-style relative vectors per head: 2k + 1 clipped distances, then global->long, long->global.
        self.relative = nn.Parameter(torch.zeros(n_heads, 2 * k + 3, self.head_dim))
        if self.opts.global_tokens == "learned":
            self.global_embed = nn.Parameter(0.02 * torch.randn(self.opts.n_global, d_model))

    def labels(self, i: Tensor, j: Tensor, g: int) -> Tensor:
        """Relative-position label of (query i, key j) in the [global; long] index space (g global tokens)."""
        k = self.opts.max_distance
        rel = (j - i).clamp(-k, k) + k
        rel = torch.where((i < g) & (j >= g), 2 * k + 1, rel)
        return torch.where((i >= g) & (j < g), 2 * k + 2, rel)

    def allowed(self, i: Tensor, j: Tensor, g: int) -> Tensor:
        """The ETC pattern: global rows, global columns, and the long-to-long radius."""
        return (i < g) | (j < g) | ((i - j).abs() <= self.opts.radius)

    def _inputs(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, int, int]:
        """The [global; long] sequence (b, T, d_model), its keep-mask (b, T), g, and where the outputs start."""
        b, n, _ = x.shape
        keep = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=x.device)
        if self.opts.global_tokens == "prefix":
            return x, keep, min(self.opts.n_global, n), 0
        g = self.opts.n_global
        xs = torch.cat([self.global_embed.to(x.dtype).expand(b, -1, -1), x], 1)
        return xs, torch.cat([keep.new_ones(b, g), keep], 1), g, g

    def forward_reference(self, x, *, mask, state, pos):
        """Dense (T x T) scores plus q . a_label written per pair, masked to the pattern."""
        xs, keep, g, start = self._inputs(x, mask)
        q, k, v = self.qkv_heads(xs, pos)  # no rotary scheme reaches ETC, so pos rotates nothing
        t = xs.shape[1]
        i = torch.arange(t, device=x.device)[:, None]
        j = torch.arange(t, device=x.device)[None]
        rel = torch.einsum("bhid,hijd->bhij", q, self.relative[:, self.labels(i, j, g)].to(q.dtype))
        allowed = self.allowed(i, j, g) & (keep[:, None, :] | ~keep[:, :, None])  # real queries skip padded keys
        o = _masked_softmax_attend(q, k, v, allowed[:, None], rel)
        return self._finish(o[:, :, start:]), state

    def forward_fast(self, x, *, mask, state, pos):
        """Global rows dense; long rows over the global columns and a gathered window of 2r + 1 long keys."""
        xs, keep, g, start = self._inputs(x, mask)
        q, k, v = self.qkv_heads(xs, pos)  # no rotary scheme reaches ETC, so pos rotates nothing
        b, h, t, d = q.shape
        kd, dev = self.opts.max_distance, x.device
        qa = torch.einsum("bhtd,hld->bhtl", q, self.relative.to(q.dtype))  # q . a_l for every label
        ninf = float("-inf")
        outs = []
        if g:  # global rows: every key
            i = torch.arange(g, device=dev)[:, None]
            j = torch.arange(t, device=dev)[None]
            rel = qa[:, :, :g].gather(-1, self.labels(i, j, g).expand(b, h, g, t))
            ok = keep[:, None, :] | ~keep[:, :g, None]
            outs.append(_masked_softmax_attend(q[:, :, :g], k, v, ok[:, None], rel))
        if t > g:  # long rows: the global columns, then the window
            ql = q[:, :, g:]
            i = torch.arange(g, t, device=dev)[:, None]
            off = torch.arange(-self.opts.radius, self.opts.radius + 1, device=dev)
            j = i + off
            inside = (j >= g) & (j < t)
            j = j.clamp(g, t - 1)
            q_keep = keep[:, g:, None]
            ok_w = inside & (keep[:, j] | ~q_keep)  # (b, n, 2r + 1)
            s_w = torch.einsum("bhnd,bhnwd->bhnw", ql, k[:, :, j]) + qa[:, :, g:, off.clamp(-kd, kd) + kd]
            scores, values = [(s_w / math.sqrt(d)).masked_fill(~ok_w[:, None], ninf)], [v[:, :, j]]
            if g:
                s_g = (ql @ k[:, :, :g].transpose(-1, -2) + qa[:, :, g:, 2 * kd + 2, None]) / math.sqrt(d)
                ok_g = keep[:, None, :g] | ~q_keep
                scores.insert(0, s_g.masked_fill(~ok_g[:, None], ninf))
                values.insert(0, v[:, :, None, :g].expand(b, h, t - g, g, d))
            p = torch.cat(scores, -1).softmax(-1)
            outs.append(torch.einsum("bhnw,bhnwd->bhnd", p, torch.cat(values, 3)))
        return self._finish(torch.cat(outs, 2)[:, :, start:]), state


# ---- FIT ---------------------------------------------------------------------------------
class FITOptions(SoftmaxOptions):
    """Options of FIT's interleaved local/global attention."""

    group_size: int = pydantic.Field(64, ge=1, description="tokens per group (local attention inside a group)")
    n_latents: int = pydantic.Field(
        4, ge=0, description="latent tokens per group, carrying information between groups (0: block-local only)"
    )


@register_mixer("fit")
class FITAttention(SoftmaxAttention):
    """FIT: latents read their group, attend globally to each other, and are read back by their group's tokens."""

    capabilities = Capabilities(
        family="sparse",
        paper="FIT: Far-reaching Interleaved Transformers",
        causal=True,
        bidirectional=True,
        padding_mask=True,
        decode=False,  # a group's latents are read from the whole group; models recompute
        exact=False,
        time="O(N (G + L) d + (N L / G)^2 d)",
        memory="O(N (G + L) + (N L / G)^2) fast, O(N^2) reference",
        forms=("reference", "fast"),
    )
    Options = FITOptions
    test_options = {"group_size": 4, "n_latents": 2, "n_kv_heads": 2}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        if self.opts.n_latents:
            self.latents = nn.Parameter(0.02 * torch.randn(self.opts.n_latents, d_model))
            self.lq = nn.Linear(d_model, d_model, bias=False)  # latent queries of the read
            self.l_out = nn.Linear(d_model, d_model, bias=False)
            self.g_qkv = nn.Linear(d_model, 3 * d_model, bias=False)  # the global layer over all latents
            self.g_out = nn.Linear(d_model, d_model, bias=False)

    def _kv(self, t: Tensor, projected: bool = False) -> tuple[Tensor, Tensor]:
        """Keys and values (b, h, ..., d) of any (b, ..., d_model) through the shared kv projection (or of its
        output, if ``projected``)."""
        t = t if projected else self.kv_proj(t)
        k, v = t.unflatten(-1, (2 * self.n_kv_heads, self.head_dim)).movedim(-2, 1).chunk(2, dim=1)
        g = self.n_heads // self.n_kv_heads
        return (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)) if g > 1 else (k, v)

    def _q(self, t: Tensor) -> Tensor:
        """(b, ..., h * d) projected queries -> (b, h, ..., d)."""
        return t.unflatten(-1, (self.n_heads, self.head_dim)).movedim(-2, 1)

    def _merge(self, o: Tensor) -> Tensor:
        return o.movedim(1, -2).flatten(-2)

    def _global(self, z: Tensor, ng: int) -> Tensor:
        """Step 2 on the latents (b, ng * L, d_model): attention over all latents (causal: earlier groups' too)."""
        q, k, v = self.g_qkv(z).unflatten(-1, (3 * self.n_heads, self.head_dim)).movedim(-2, 1).chunk(3, dim=1)
        mask = None
        if self.causal:
            lg = torch.arange(ng * self.opts.n_latents, device=z.device) // self.opts.n_latents
            mask = lg[None, :] <= lg[:, None]
        return z + self.g_out(self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))

    def forward_reference(self, x, *, mask, state, pos):
        """Every step as dense attention over the whole sequence, the group structure as masks."""
        b, n, _ = x.shape
        G, L = self.opts.group_size, self.opts.n_latents
        ng, dev = -(-n // G), x.device
        keep = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=dev)
        grp = torch.arange(n, device=dev) // G
        i, j = torch.arange(n, device=dev)[:, None], torch.arange(n, device=dev)[None]
        tok_ok = (grp[:, None] == grp[None]) & (keep[:, None, :] | (i == j))  # (b, n, n)
        if self.causal:
            tok_ok = tok_ok & (j <= i)
        q = self._q(self.q_proj(x))
        kx, vx = self._kv(x)
        if not L:
            return self._finish(_masked_softmax_attend(q, kx, vx, tok_ok[:, None])), state
        lg = torch.arange(ng * L, device=dev) // L
        z = self.latents.to(x.dtype).repeat(ng, 1).expand(b, -1, -1)  # (b, ng L, d_model)
        kz, vz = self._kv(z)
        read_ok = torch.cat([(lg[:, None] == lg[None]).expand(b, -1, -1),
                             (lg[:, None] == grp[None]) & keep[:, None, :]], -1)  # (b, ng L, ng L + n)
        read = _masked_softmax_attend(self._q(self.lq(z)), torch.cat([kz, kx], 2), torch.cat([vz, vx], 2),
                                      read_ok[:, None])
        z = self._global(z + self.l_out(self._merge(read)), ng)
        kz, vz = self._kv(z)
        lat_ok = lg[None] == (grp[:, None] - 1 if self.causal else grp[:, None])  # (n, ng L)
        ok = torch.cat([tok_ok, lat_ok.expand(b, -1, -1)], -1)
        o = _masked_softmax_attend(q, torch.cat([kx, kz], 2), torch.cat([vx, vz], 2), ok[:, None])
        return self._finish(o), state

    def forward_fast(self, x, *, mask, state, pos):
        """Groups as a batch dimension: (b, h, groups, G [+ L], d) attention per group; latents globally."""
        b, n, dm = x.shape
        G, L = min(self.opts.group_size, n), self.opts.n_latents  # a group beyond n is the one group of n
        dev = x.device
        keep = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=dev)
        xg = pad_to_multiple(x, G)[0].unflatten(1, (-1, G))  # (b, ng, G, d_model)
        kg = pad_to_multiple(keep, G, value=False)[0].unflatten(1, (-1, G))  # (b, ng, G)
        ng = xg.shape[1]
        eye = torch.eye(G, dtype=torch.bool, device=dev)
        tok_ok = kg[:, None, :, None, :] | eye  # (b, 1, ng, G, G): a padded query still sees itself
        if self.causal:
            tok_ok = tok_ok & torch.ones(G, G, dtype=torch.bool, device=dev).tril()
        q = self._q(self.q_proj(xg))  # (b, h, ng, G, d)
        kx, vx = self._kv(xg)
        if not L:
            o = _grouped_sdpa(q, kx, vx, tok_ok)
        else:
            # Every group starts from the same latents: project them once, then broadcast over groups.
            lat = self.latents.to(x.dtype)  # (L, d_model), projected as is (no view of a parameter)
            kz, vz = (t.expand(b, -1, ng, -1, -1) for t in self._kv(self.kv_proj(lat)[None, None], projected=True))
            lq = self._q(self.lq(lat)[None, None]).expand(b, -1, ng, -1, -1)
            read_ok = torch.cat([torch.ones_like(kg[:, :, :1]).expand(b, ng, L), kg], -1)[:, None, :, None]
            read = _grouped_sdpa(lq, torch.cat([kz, kx], 3), torch.cat([vz, vx], 3), read_ok)
            z = self._global((lat + self.l_out(self._merge(read))).flatten(1, 2), ng).unflatten(1, (ng, L))
            kz, vz = self._kv(z)
            lat_ok = torch.ones(ng, 1, L, dtype=torch.bool, device=dev)
            if self.causal:  # group s reads the latents of group s - 1
                kz, vz = (torch.cat([torch.zeros_like(t[:, :, :1]), t[:, :, :-1]], 2) for t in (kz, vz))
                lat_ok[0] = False
            ok = torch.cat([tok_ok, lat_ok.expand(b, 1, ng, G, L)], -1)
            o = _grouped_sdpa(q, torch.cat([kx, kz], 3), torch.cat([vx, vz], 3), ok)
        return self._finish(o.flatten(2, 3)[:, :, :n]), state
