"""Kernel (linear) attention: the softmax kernel is replaced by a feature map, A_ij = phi(q_i) . phi(k_j),
so attention ``sum_j A_ij v_j / sum_j A_ij`` becomes phi(Q) (phi(K)^T V), linear in the sequence length.

Papers: "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention" (elu+1
features), "Rethinking Attention with Performers" (FAVOR+: positive orthogonal random features that
estimate the softmax kernel), "cosFormer: Rethinking Softmax in Attention" (ReLU features with a
cos re-weighting of the distance i - j).

Forms (each mixer has all three, in both directions):
- reference: the explicit N x N matrix A, causally masked, normalised by its row sums;
- chunked: bidirectional phi(Q) (phi(K)^T V) by associativity; causal by chunks, with prefix sums
  of phi(k) v^T between chunks and a small masked (chunk x chunk) block inside each chunk;
- recurrent: a scan over tokens of the running sums S = sum_j phi(k_j) v_j^T and z = sum_j phi(k_j),
  which are also the decode state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.errors import ShapeError
from efformer.kernels.chunk_gla import chunk_gla_recompute
from efformer.mixers.base import Capabilities, Mixer, MixerOptions, MixerState, causal_keep
from efformer.nn.positional import PositionalContext
from efformer.registry import register_mixer


@dataclass
class KernelState(MixerState):
    """Running sums: s = sum phi(k) v^T (batch, heads, m, head_dim), z = sum phi(k) (batch, heads, m)."""

    s: Tensor
    z: Tensor


@dataclass
class PerformerState(KernelState):
    """Running sums stored divided by exp(log_scale) (batch, heads), the largest key log-feature so far."""

    log_scale: Tensor


class KernelOptions(MixerOptions):
    """Options shared by kernel attention mixers."""

    chunk: int = pydantic.Field(64, gt=0, description="block length of the causal chunked form")


class PerformerOptions(KernelOptions):
    """Options of FAVOR+."""

    n_features: int = pydantic.Field(256, gt=0, description="random features m per head (paper: m ~ d log d)")
    redraw_every: int = pydantic.Field(
        0, ge=0,
        description="in training, redraw the features every this many calls; 0 = never",
    )


def _chunked_causal(fq: Tensor, fk: Tensor, v: Tensor, s: Tensor, z: Tensor, chunk: int):
    """Causal sums by chunks: (num (b,h,n,d), den (b,h,n), final s, final z); no N x N matrix.

    The sums are gated linear attention with gate 1, and the normaliser is one more value column of
    ones (z is the state's last column), so this is one call of the lean chunked form: its backward
    keeps only phi(q), phi(k), v and a few states, recomputing each group of chunks.
    """
    ones = v.new_ones(*v.shape[:-1], 1)
    g = v.new_zeros(*v.shape[:-1], 1)  # log-gate 0: no decay
    state = torch.cat([s, z[..., None]], -1)
    o, state = chunk_gla_recompute(fq, fk, torch.cat([v, ones], -1), g, state, chunk_size=chunk, sub_chunk=chunk)
    state = state.to(s.dtype)
    return o[..., :-1], o[..., -1], state[..., :-1], state[..., -1]


class KernelAttention(Mixer):
    """Base of kernel attention: subclasses define the feature maps phi(q), phi(k) (batch, heads, seq, m)."""

    eps: ClassVar[float] = 1e-6  # floor of the normaliser: a row with no visible key gives 0, not NaN
    n_features: int  # m, the feature dimension per head (a property of each subclass)

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        # Same names and shapes as SoftmaxAttention (no bias), so weights can be copied across.
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """Value rows of the fused k|v projection, and the output projection."""
        return {"value": [self.kv_proj.weight[self.d_model :]], "output": [self.out_proj.weight]}

    def features(
        self, q: Tensor, k: Tensor, mask: Tensor | None, state, pos: PositionalContext
    ) -> tuple[Tensor, Tensor]:
        """phi(q), phi(k) (batch, heads, seq, m) from q, k (batch, heads, seq, head_dim); phi(k) = 0 at pads."""
        raise NotImplementedError

    def scores(self, q, k, fq, fk, mask, pos) -> Tensor:
        """The explicit matrix A (batch, heads, n, n) of the reference form: phi(q_i) . phi(k_j)."""
        return fq @ fk.transpose(-1, -2)

    def init_state(self, batch, device, dtype) -> KernelState:
        """Zero running sums."""
        h, m, d = self.n_heads, self.n_features, self.head_dim
        return KernelState(
            s=torch.zeros(batch, h, m, d, device=device, dtype=dtype),
            z=torch.zeros(batch, h, m, device=device, dtype=dtype),
        )

    # ---- shared parts of every form -------------------------------------------------------
    def _project(self, x, mask, state, pos):
        """q, k (raw), v, phi(q), phi(k) (b, h, n, .) and the carried-in sums s (b, h, m, d), z (b, h, m)."""
        b, h = x.shape[0], self.n_heads
        q = self.split_heads(self.q_proj(x))
        k, v = self.split_heads(self.kv_proj(x), 2 * h).chunk(2, dim=1)
        fq, fk = self.features(q, k, mask, state, pos)
        if mask is not None:  # phi(k) is already zero there; zero v too so that huge pad values cannot make inf*0
            v = v * mask[:, None, :, None].to(v.dtype)
        if state is None:
            s, z = v.new_zeros(b, h, fk.shape[-1], self.head_dim), v.new_zeros(b, h, fk.shape[-1])
        else:
            s, z = state.s, state.z
        return q, k, v, fq, fk, s, z

    def mix_values(self, o: Tensor, v: Tensor, state) -> Tensor:
        """The attention output o (b, h, n, d) plus whatever term a mechanism adds from the values v
        (b, h, n, d) of the same tokens (SLAB's depthwise convolution); plain kernel attention adds none."""
        return o

    def _finish(self, num: Tensor, den: Tensor, state, s: Tensor, z: Tensor, v: Tensor):
        eps = max(self.eps, torch.finfo(den.dtype).tiny)
        o = self.mix_values(num / den.clamp_min(eps)[..., None], v, state)
        if state is not None:
            state.s, state.z = s, z
        return self.out_proj(self.merge_heads(o)), state

    # ---- forms ----------------------------------------------------------------------------
    def forward_reference(self, x, *, mask, state, pos):
        """Explicit A (b, h, n, n), causal mask, row normalisation; a carried-in state adds phi(q) s, phi(q) z."""
        q, k, v, fq, fk, s, z = self._project(x, mask, state, pos)
        a = self.scores(q, k, fq, fk, mask, pos)
        if self.causal:
            a = a.masked_fill(~causal_keep(a.shape[-2], a.shape[-1], x.device), 0.0)
        num = a @ v + fq @ s
        den = a.sum(-1) + (fq @ z[..., None]).squeeze(-1)
        return self._finish(num, den, state, s + fk.transpose(-1, -2) @ v, z + fk.sum(2), v)

    def forward_chunked(self, x, *, mask, state, pos):
        """Linear time: phi(Q) (phi(K)^T V) when bidirectional; chunkwise prefix sums when causal."""
        q, k, v, fq, fk, s, z = self._project(x, mask, state, pos)
        if self.causal:
            num, den, s, z = _chunked_causal(fq, fk, v, s, z, self.opts.chunk)
            return self._finish(num, den, state, s, z, v)
        s, z = s + fk.transpose(-1, -2) @ v, z + fk.sum(2)
        return self._finish(fq @ s, (fq @ z[..., None]).squeeze(-1), state, s, z, v)

    def forward_recurrent(self, x, *, mask, state, pos):
        """Token-by-token scan of the running sums (read out after each token when causal, at the end if not)."""
        q, k, v, fq, fk, s, z = self._project(x, mask, state, pos)
        nums, dens = [], []
        for t in range(x.shape[1]):
            s = s + fk[:, :, t, :, None] * v[:, :, t, None, :]
            z = z + fk[:, :, t]
            if self.causal:
                nums.append((fq[:, :, t, None, :] @ s).squeeze(-2))
                dens.append((fq[:, :, t] * z).sum(-1))
        if self.causal:
            return self._finish(torch.stack(nums, 2), torch.stack(dens, 2), state, s, z, v)
        return self._finish(fq @ s, (fq @ z[..., None]).squeeze(-1), state, s, z, v)


_FORMS = ("reference", "chunked", "recurrent")


@register_mixer("linear")
class LinearAttention(KernelAttention):
    """Linear Transformer: phi(x) = elu(x) + 1, O(N d^2) time, an O(d^2) state per head."""

    capabilities = Capabilities(
        family="kernel",
        paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
        causal=True,
        bidirectional=True,
        padding_mask=True,
        decode=True,
        exact=False,
        time="O(N d^2)",
        memory="O(N d + N d^2 / chunk) chunked, O(d^2) decode state",
        forms=_FORMS,
    )
    Options = KernelOptions
    test_options = {"chunk": 4}

    @property
    def n_features(self) -> int:
        """m = head_dim."""
        return self.head_dim

    def features(self, q, k, mask, state, pos):
        """elu + 1 on q and k; phi(k) is zeroed at pads (elu(0) + 1 = 1, so zeroing k is not enough)."""
        fq, fk = F.elu(q) + 1, F.elu(k) + 1
        if mask is not None:
            fk = fk * mask[:, None, :, None].to(fk.dtype)
        return fq, fk


def orthogonal_features(m: int, d: int) -> Tensor:
    """(m, d) Gaussian directions in orthogonal blocks of d rows, rows rescaled to chi(d) lengths."""
    blocks = []
    for _ in range(math.ceil(m / d)):
        qm, r = torch.linalg.qr(torch.randn(d, d))
        blocks.append((qm * torch.sign(torch.diagonal(r))).T)  # sign fix makes the rotation Haar-uniform
    # Orthogonal rows keep the estimator unbiased only if each row still has a Gaussian's length.
    return torch.cat(blocks)[:m] * torch.randn(m, d).norm(dim=1, keepdim=True)


@register_mixer("performer")
class Performer(KernelAttention):
    """Performer (FAVOR+): positive orthogonal random features whose dot products estimate exp(q.k/sqrt(d)).

    The features are a buffer drawn at construction (seeded by the global torch seed), so every form
    sees the same draw; :meth:`redraw_features` draws anew, and ``redraw_every`` does it in training.
    """

    capabilities = Capabilities(
        family="kernel",
        paper="Rethinking Attention with Performers",
        causal=True,
        bidirectional=True,
        padding_mask=True,
        decode=True,
        exact=False,
        time="O(N m d)",
        memory="O(N m + N m d / chunk) chunked, O(m d) decode state",
        forms=_FORMS,
        rotary=True,  # FAVOR+ estimates exp(q.k) for any q, k: rotated ones give RoPE softmax attention
    )
    Options = PerformerOptions
    test_options = {"chunk": 4, "n_features": 16}
    # The shared key stabiliser is one constant per call and cancels exactly in the ratio; 0 floor keeps that exact.
    eps = 0.0

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        self.register_buffer("projection", orthogonal_features(self.opts.n_features, self.head_dim))
        self._train_calls = 0

    @property
    def n_features(self) -> int:
        """m = n_features."""
        return self.opts.n_features

    @torch.no_grad()
    def redraw_features(self) -> None:
        """Draw a fresh orthogonal random projection (m, head_dim) in place, from the global torch seed."""
        self.projection.copy_(orthogonal_features(self.opts.n_features, self.head_dim))

    def forward(self, x, *, mask=None, state=None, positions=None):
        """As :meth:`Mixer.forward`, redrawing the features every ``redraw_every`` training calls (never mid-decode)."""
        every = self.opts.redraw_every
        if self.training and every and state is None:
            if self._train_calls and self._train_calls % every == 0:
                self.redraw_features()
            self._train_calls += 1
        return super().forward(x, mask=mask, state=state, positions=positions)

    def init_state(self, batch, device, dtype) -> PerformerState:
        """Zero running sums at log-scale -inf (no key seen yet)."""
        st = super().init_state(batch, device, dtype)
        return PerformerState(s=st.s, z=st.z, log_scale=torch.full((batch, self.n_heads), -math.inf, device=device))

    def _log_features(self, x: Tensor) -> Tensor:
        """log of the positive feature map: w_r . x - |x|^2 / 2, for x = q or k scaled by head_dim^(-1/4)."""
        x = x * self.head_dim**-0.25
        return x @ self.projection.to(x.dtype).T - x.square().sum(-1, keepdim=True) / 2

    def features(self, q, k, mask, state, pos):
        """exp of the log-features, stabilised: per query by its own max, for keys by one max per (batch, head).

        Both stabilisers (and the estimator's 1/sqrt(m)) cancel in the normalised ratio. The key one
        is shared by every key of a call and by the state, which is rescaled when it grows.
        """
        # Rotate by absolute position before the features, so decoding stays exact.
        q, k = pos.rotate_queries(q), pos.rotate_keys(k)
        aq, ak = self._log_features(q), self._log_features(k)
        fq = torch.exp(aq - aq.detach().amax(-1, keepdim=True))
        if mask is not None:
            ak = ak.masked_fill(~mask[:, None, :, None], -math.inf)
        c = ak.detach().amax(dim=(2, 3))  # (b, h); -inf where no real key
        if state is not None:
            c = torch.maximum(c, state.log_scale.to(c.dtype))
        c_safe = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        if state is not None:
            factor = torch.exp(state.log_scale.to(c.dtype) - c_safe)
            state.s, state.z = state.s * factor[..., None, None], state.z * factor[..., None]
            state.log_scale = c
        return fq, torch.exp(ak - c_safe[..., None, None])


@register_mixer("cosformer")
class Cosformer(KernelAttention):
    """cosFormer: A_ij = relu(q_i) . relu(k_j) cos(pi/2 (i-j)/M), linear as cos(a-b) = cos a cos b + sin a sin b."""

    capabilities = Capabilities(
        family="kernel",
        paper="cosFormer: Rethinking Softmax in Attention",
        causal=True,
        bidirectional=True,
        padding_mask=True,
        decode=True,
        exact=False,
        time="O(N d^2)",
        memory="O(N d + N d^2 / chunk) chunked, O(d^2) decode state",
        forms=_FORMS,
    )
    Options = KernelOptions
    test_options = {"chunk": 4}
    test_max_len = 64

    @property
    def n_features(self) -> int:
        """m = 2 head_dim (a cos half and a sin half)."""
        return 2 * self.head_dim

    def _angles(self, positions: Tensor, dtype) -> Tensor:
        """pi/2 * position / M as (batch, 1, seq, 1); refuses positions >= M (the weights would turn negative)."""
        m = self.max_len
        if int(positions.max()) >= m:
            raise ShapeError(
                f"cosformer: position {int(positions.max())} >= max_len={m}; raise the model's max_len "
                "(the M of cos(pi/2 (i-j)/M)) to at least the longest sequence"
            )
        return (positions.to(torch.float32) * (math.pi / (2 * m)))[:, None, :, None].to(dtype)

    def features(self, q, k, mask, state, pos):
        """[relu(x) cos(theta_i), relu(x) sin(theta_i)] for x = q, k; theta_i = pi/2 * i / M."""
        theta = self._angles(pos.positions, q.dtype)
        cos, sin = theta.cos(), theta.sin()
        rq, rk = F.relu(q), F.relu(k)
        if mask is not None:
            rk = rk * mask[:, None, :, None].to(rk.dtype)
        return torch.cat([rq * cos, rq * sin], -1), torch.cat([rk * cos, rk * sin], -1)

    def scores(self, q, k, fq, fk, mask, pos):
        """The definition written out: relu(q_i) . relu(k_j) * cos(pi/2 (i - j) / M)."""
        rk = F.relu(k)
        if mask is not None:
            rk = rk * mask[:, None, :, None].to(rk.dtype)
        theta = self._angles(pos.positions, q.dtype)[..., 0]  # (b, 1, n)
        return (F.relu(q) @ rk.transpose(-1, -2)) * torch.cos(theta[..., :, None] - theta[..., None, :])
