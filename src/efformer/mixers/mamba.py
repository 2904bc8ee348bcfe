"""Selective state-space mixers: Mamba (S6) and Mamba-2 (SSD).

Papers: "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (Gu & Dao, 2023) and
"Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State
Space Duality" (Dao & Gu, 2024).

Both run a causal depthwise convolution, then an input-dependent (selective) linear recurrence
``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t + D x_t`` (A by zero-order hold, B by
the Euler rule ``dt B``, as in the papers' code), gated by the other half of the input projection.

Forms: "reference" runs the recurrence one step at a time; "chunked" computes each chunk as masked
matrix products of cumulative log-decays (segment sums) and carries the state from chunk to chunk;
"recurrent" is the one-token decode step (a rolling convolution window) applied token by token.
Mamba's "fast" form, its CPU training form, is the segmented scan of ``nn/selective_scan.py``: one
fused update per step inside a cache-sized segment, a state checkpoint per segment, and a backward
that rebuilds each segment and runs the adjoint recurrence.

Padding: a padded step has ``dt = 0`` (so ``exp(dt A) = 1`` and ``dt B x = 0``) and a zero
convolution input, so a LEFT-padded row computes exactly what the unpadded row computes and padded
content never reaches real outputs; a hole inside a row is seen by the convolution as a zero input.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from efformer.errors import ConfigError
from efformer.mixers.base import (
    RESET_LOG_DECAY,
    Mixer,
    MixerOptions,
    MixerState,
    bare_linear,
    causal_recurrent,
    segment_starts,
    seq_rows,
)
from efformer.nn.recurrent import ShortConv, causal_taps, inverse_softplus_dt, log_decay_rates
from efformer.nn.selective_scan import SEGMENT, selective_scan
from efformer.registry import register_mixer


@dataclass
class SSMState(MixerState):
    """Decode state: the last ``d_conv - 1`` convolution inputs (batch, channels, d_conv-1) and the SSM state.

    ``ssm`` is (batch, d_inner, d_state) for Mamba and (batch, heads, head_dim, d_state) for Mamba-2.
    """

    conv: Tensor
    ssm: Tensor


# ---- pieces shared by both mixers ----------------------------------------------------------------
def segment_decay(log_a: Tensor) -> tuple[Tensor, Tensor]:
    """Decays of a chunk from per-step log-decays log_a (batch, c, ...) <= 0.

    Returns ``decay`` (batch, t, s, ...) = exp(sum of log_a over steps s+1..t) for s <= t, else 0,
    and the inclusive cumulative sum (batch, c, ...). Masking before ``exp`` keeps the (positive)
    upper triangle from overflowing and its gradient zero.
    """
    cum = log_a.cumsum(1)
    c = log_a.shape[1]
    lower = torch.ones(c, c, dtype=torch.bool, device=log_a.device).tril()
    lower = lower.view(c, c, *([1] * (log_a.dim() - 2)))
    return (cum[:, :, None] - cum[:, None, :]).masked_fill(~lower, float("-inf")).exp(), cum


# ---- the two scans of each mixer -----------------------------------------------------------------
def _reset_log(reset: Tensor | None, like: Tensor) -> Tensor | float:
    """Extra log-decay (b, c, 1...) that forgets the state at packed segment starts ``reset`` (b, c), or 0."""
    if reset is None:
        return 0.0
    return (reset.to(like.dtype) * RESET_LOG_DECAY).view(*reset.shape, *([1] * (like.dim() - 2)))


def s6_scan_reference(u, delta, A, B, C, h, reset=None):
    """Sequential S6 scan: u, delta (b, l, d); A (d, n); B, C (b, l, n); h (b, d, n) -> y (b, l, d), h.

    ``reset`` (b, l) bool, for packed rows: the state is zeroed before each True step."""
    ys = []
    for t in range(u.shape[1]):
        if reset is not None:
            h = h * (~reset[:, t]).to(h.dtype)[:, None, None]
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    return torch.stack(ys, 1), h


def s6_scan_chunked(u, delta, A, B, C, h, chunk: int, reset=None):
    """Chunked S6 scan (same shapes): masked segment-sum decays inside a chunk, state passing across;
    ``reset`` steps get the log-decay RESET_LOG_DECAY, which forgets the state to below fp32 rounding."""
    ys = []
    resets = reset.split(chunk, 1) if reset is not None else [None] * -(-u.shape[1] // chunk)
    # Split the time axis once: slicing it per chunk would make backward zero-fill a full-size
    # gradient buffer per chunk (N^2 / C work).
    for dc, uc, bc, cc, rc in zip(*(x.split(chunk, 1) for x in (delta, u, B, C)), resets, strict=True):
        log_a = dc[..., None] * A
        decay, cum = segment_decay(log_a + _reset_log(rc, log_a))  # (b, t, s, d, n), (b, c, d, n)
        bx = (dc * uc)[..., None] * bc[:, :, None]  # (b, c, d, n): what each step writes
        y = torch.einsum("btsdn,bsdn,btn->btd", decay, bx, cc)
        ys.append(y + torch.einsum("btdn,bdn,btn->btd", cum.exp(), h, cc))
        h = cum[:, -1].exp() * h + ((cum[:, -1:] - cum).exp() * bx).sum(1)
    return torch.cat(ys, 1), h


def ssd_scan_reference(x, dt, A, B, C, h, reset=None):
    """Sequential SSD scan: x (b, l, H, P); dt (b, l, H); A (H); B, C (b, l, H, N); h (b, H, P, N);
    ``reset`` (b, l) as in :func:`s6_scan_reference`."""
    ys = []
    for t in range(x.shape[1]):
        if reset is not None:
            h = h * (~reset[:, t]).to(h.dtype)[:, None, None, None]
        write = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None]  # (b, H, P, N)
        h = torch.exp(dt[:, t] * A)[..., None, None] * h + write
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    return torch.stack(ys, 1), h


def ssd_scan_chunked(x, dt, A, B, C, h, chunk: int, reset=None):
    """Chunked SSD (same shapes): quadratic masked (C B^T) * decay inside a chunk, state passing across;
    ``reset`` as in :func:`s6_scan_chunked`."""
    ys = []
    resets = reset.split(chunk, 1) if reset is not None else [None] * -(-x.shape[1] // chunk)
    # Split the time axis once (see s6_scan_chunked).
    for xc, dtc, bc, cc, rc in zip(*(t.split(chunk, 1) for t in (x, dt, B, C)), resets, strict=True):
        xdt = xc * dtc[..., None]
        log_a = dtc * A
        decay, cum = segment_decay(log_a + _reset_log(rc, log_a))  # (b, t, s, H), (b, c, H)
        scores = torch.einsum("bthn,bshn->btsh", cc, bc) * decay
        y = torch.einsum("btsh,bshp->bthp", scores, xdt)
        ys.append(y + torch.einsum("bthn,bhpn->bthp", cc, h) * cum.exp()[..., None])
        to_end = (cum[:, -1:] - cum).exp()  # (b, c, H): decay from each step to the chunk end
        h = cum[:, -1].exp()[..., None, None] * h + torch.einsum("bshn,bsh,bshp->bhpn", bc, to_end, xdt)
    return torch.cat(ys, 1), h


def ssd_inputs(xbc, dt, keep, dt_bias, heads: int, groups: int, d_state: int):
    """Mamba-2's scan inputs from the activated conv output xbc (b, l, d_inner + 2 G N) and raw dt (b, l, H):
    x (b, l, H, P), dt (b, l, H) (0 at padded steps, ``keep`` (b, l, 1) or None), B, C (b, l, H, N)."""
    gn = groups * d_state
    xs, B, C = xbc.split([xbc.shape[-1] - 2 * gn, gn, gn], dim=-1)
    dt = F.softplus(dt + dt_bias)
    if keep is not None:
        dt = dt * keep  # dt = 0: the state passes a padded step unchanged
    xs = rearrange(xs, "b l (h p) -> b l h p", h=heads)
    # Each group's B and C are shared by heads / groups consecutive heads.
    B, C = (rearrange(t, "b l (g n) -> b l g n", g=groups) for t in (B, C))
    return xs, dt, B.repeat_interleave(heads // groups, dim=2), C.repeat_interleave(heads // groups, dim=2)


def ssd_output(y, xs, z, D, norm_weight, groups: int, eps: float):
    """(y + D x) gated by silu(z) (b, l, d_inner), RMS-normed per B/C group (norm after gate), times the weight."""
    y = rearrange(y + xs * D[:, None], "b l h p -> b l (h p)")
    g = rearrange(y * F.silu(z), "b l (g e) -> b l g e", g=groups)
    g = g * torch.rsqrt(g.square().mean(-1, keepdim=True) + eps)
    return rearrange(g, "b l g e -> b l (g e)") * norm_weight


def _mamba2_group(cfg, xs, keep, seg, reset, pad, h, w_in, conv_w, conv_b, dt_bias, A_log, D, norm_w):
    """One group of a Mamba-2 layer from its input rows xs (b, w-1+n-pad, d_model), the conv's w-1 rows of
    history first, ``pad`` of them before the sequence start: (normed output (b, n, d_inner), state leaving)."""
    d_inner, channels, heads, groups, d_state, chunk, eps = cfg
    own = conv_w.shape[-1] - 1 - pad  # rows of history in xs; the group's own rows follow
    z, xbc, dt = F.linear(xs, w_in).split([d_inner, channels, heads], dim=-1)
    if keep is not None:
        xbc = xbc * keep  # padded steps feed zeros to the convolution
    xbc = F.pad(xbc, (0, 0, pad, 0))
    seg = F.pad(seg, (pad, 0), value=-2) if seg is not None else None
    xbc = F.silu(causal_taps(xbc, conv_w, conv_b, seg))
    keep = keep[:, own:] if keep is not None else None
    x_, dt_, B, C = ssd_inputs(xbc, dt[:, own:], keep, dt_bias, heads, groups, d_state)
    y, h = ssd_scan_chunked(x_, dt_, -torch.exp(A_log), B, C, h, chunk, reset)
    return ssd_output(y, x_, z[:, own:], D, norm_w, groups, eps), h


class Mamba2Recompute(torch.autograd.Function):
    """A Mamba-2 layer from x (b, n, d_model) to its normed output (b, n, d_inner), from a zero state, that
    keeps only x, its masks and the state entering each group of chunks.

    Inputs: cfg (d_inner, conv channels, heads, groups, d_state, chunk, eps), tokens per group, x,
    keep (b, n, 1) or None, segment ids (b, n) or None, resets (b, n) or None, then the parameters
    (in_proj weight, conv weight and bias, dt_bias, A_log, D, norm weight). Backward re-runs each
    group (projection, conv, scan, gated norm) under autograd in reverse order, with the state
    gradient from the group after as the cotangent of its final state, so the layer never holds the
    whole sequence's (b, n, 2 d_inner + 2 G N + H) projections, conv outputs and scan intermediates.
    """

    @staticmethod
    def forward(ctx, cfg, span, x, keep, seg, reset, *params):
        n, hist = x.shape[1], params[1].shape[-1] - 1
        d_inner, heads = cfg[0], cfg[2]
        starts = range(0, n, span)
        out = x.new_empty(*x.shape[:2], d_inner)
        h = x.new_zeros(x.shape[0], heads, d_inner // heads, cfg[4])
        entry = x.new_empty(len(starts), *h.shape)
        for i, lo in enumerate(starts):
            hi, a = min(lo + span, n), max(lo - hist, 0)
            entry[i] = h
            rows = seq_rows(keep, a, hi), seq_rows(seg, a, hi), seq_rows(reset, lo, hi), a - (lo - hist)
            out[:, lo:hi], h = _mamba2_group(cfg, x[:, a:hi], *rows, h, *params)
        ctx.save_for_backward(x, keep, seg, reset, entry, *params)
        ctx.cfg, ctx.span = cfg, span
        return out

    @staticmethod
    def backward(ctx, dout):
        x, keep, seg, reset, entry, *params = ctx.saved_tensors
        n, hist, span = x.shape[1], params[1].shape[-1] - 1, ctx.span
        dx = torch.zeros_like(x)  # zeros: neighbouring groups' rows overlap
        dparams = [torch.zeros_like(p) for p in params]
        dh = torch.zeros_like(entry[0])
        for i, lo in reversed(list(enumerate(range(0, n, span)))):
            hi, a = min(lo + span, n), max(lo - hist, 0)
            xs, h0 = x[:, a:hi].detach().requires_grad_(), entry[i].detach().requires_grad_(i > 0)
            leaves = [p.detach().requires_grad_() for p in params]
            rows = seq_rows(keep, a, hi), seq_rows(seg, a, hi), seq_rows(reset, lo, hi), a - (lo - hist)
            with torch.enable_grad():
                out, h = _mamba2_group(ctx.cfg, xs, *rows, h0, *leaves)
            wrt = [xs, *leaves, h0] if i > 0 else [xs, *leaves]  # the first group starts from constant zeros
            got = torch.autograd.grad([out, h], wrt, [dout[:, lo:hi], dh])
            dx[:, a:hi] += got[0]
            for buf, g in zip(dparams, got[1 : 1 + len(params)], strict=True):
                buf += g
            dh = got[-1] if i > 0 else dh
        return None, None, dx, None, None, None, *dparams


CHUNKS_PER_GROUP = 16  # Mamba-2's chunks re-run together in the recomputing backward


class SelectiveOptions(MixerOptions):
    """Options shared by Mamba and Mamba-2."""

    expand: int = Field(2, ge=1, description="d_inner = expand * d_model")
    d_state: int = Field(16, ge=1, description="N: state size per channel (Mamba) or per head (Mamba-2)")
    d_conv: int = Field(4, ge=1, description="width of the causal depthwise convolution")
    # "chunked" form: tokens per chunk; work grows with chunk^2, so small chunks are fastest on CPU
    # (measured fwd+bwd at N=1024: chunk 4 is 1.5 s, 16 is 10 s, sequential 5 s)
    chunk_size: int = Field(4, ge=1, description="\"chunked\" form: tokens per chunk")
    dt_min: float = Field(0.001, gt=0, description="initial step sizes are log-uniform in [dt_min, dt_max]")
    dt_max: float = Field(0.1, gt=0, description="upper end of the initial step sizes")


class _Selective(Mixer):
    """Driver shared by Mamba and Mamba-2: conv, selective scan, state bookkeeping, gating."""

    conv_channels: int
    ssm_shape: tuple[int, ...]

    def _check_dt(self) -> None:
        if self.opts.dt_min > self.opts.dt_max:
            raise ConfigError(f"{self.name}.dt_min", self.opts.dt_min, f"must not exceed dt_max={self.opts.dt_max}")

    def init_state(self, batch, device, dtype) -> SSMState:
        """Zero convolution window and zero SSM state."""
        return SSMState(
            conv=torch.zeros(batch, self.conv_channels, self.opts.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch, *self.ssm_shape, device=device, dtype=dtype),
        )

    def _forward(self, x, mask, state, scan, step: bool = False, segments: Tensor | None = None):
        keep = None if mask is None else mask[..., None].to(x.dtype)
        st = state if state is not None else self.init_state(x.shape[0], x.device, x.dtype)
        conv_in, gate, extra = self._project(x)
        if keep is not None:
            conv_in = conv_in * keep  # padded steps feed zeros to the convolution
        if step:  # one token through the rolling window (the decode path)
            conv_out, window = self.conv1d.step(conv_in[:, 0], st.conv)
            conv_out = conv_out[:, None]
        else:
            conv_out, window = self.conv1d(conv_in, st.conv, segments)
        inputs = self._ssm_inputs(F.silu(conv_out), extra, keep)
        reset = segment_starts(segments) if segments is not None else None
        y, h = scan(*inputs, st.ssm, reset=reset)
        if state is not None:
            state.conv, state.ssm = window, h
        return self._output(y, inputs, gate), state

    def forward_reference(self, x, *, mask, state, pos):
        """The recurrence one step at a time (the definition)."""
        return self._forward(x, mask, state, self._scan_reference, segments=pos.segments)

    def forward_chunked(self, x, *, mask, state, pos):
        """Chunk-parallel scan: matrix products inside chunks of ``chunk_size``, state passed between."""
        return self._forward(x, mask, state, self._scan_chunked, segments=pos.segments)

    def forward_recurrent(self, x, *, mask, state, pos):
        """Token-by-token decode: a rolling convolution window and one state update per token."""
        st = state if state is not None else self.init_state(x.shape[0], x.device, x.dtype)
        starts = segment_starts(pos.segments) if pos.segments is not None else None
        ys = []
        for t in range(x.shape[1]):
            if starts is not None:  # packed rows: a segment starts from a fresh window and state
                fresh = (~starts[:, t]).to(x.dtype)
                st.conv, st.ssm = st.conv * fresh[:, None, None], st.ssm * fresh.view(-1, *[1] * (st.ssm.dim() - 1))
            m = None if mask is None else mask[:, t : t + 1]
            ys.append(self._forward(x[:, t : t + 1], m, st, self._scan_reference, step=True)[0])
        return torch.cat(ys, 1), state


@register_mixer("mamba")
class Mamba(_Selective):
    """Mamba (S6): gated selective SSM, per-channel diagonal A and input-dependent dt, B, C; O(N) time."""


    capabilities = causal_recurrent(
        paper="Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
        family="ssm",
        time="O(N d_inner d_state); chunked O(N c d_inner d_state) for chunk c",
        memory="O(N d_inner + N / K d_inner d_state) fast, for checkpoint_every K; O(d_inner d_state) decode state",
        forms=("reference", "fast", "chunked", "recurrent"),
        packing=True,  # the state is forgotten at segment starts; the short conv is segment-masked
    )

    class Options(SelectiveOptions):
        """Options of Mamba (S6)."""

        dt_rank: int | None = Field(None, ge=1, description="rank of the dt projection; None = ceil(d_model / 16)")
        checkpoint_every: int | None = Field(
            SEGMENT, ge=1, description="fast form: steps per scan segment; the state is kept once per segment and "
            "the rest rebuilt in backward (nn/selective_scan.py: O(N/K d n) memory); None = one segment")

    test_options = {"d_state": 4, "chunk_size": 4, "dt_rank": 2}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)  # n_heads is accepted but unused: S6 has no heads
        self._check_dt()
        o = self.opts
        d_inner, n = o.expand * d_model, o.d_state
        self.d_inner, self.dt_rank = d_inner, o.dt_rank or math.ceil(d_model / 16)
        self.conv_channels, self.ssm_shape = d_inner, (d_inner, n)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = ShortConv(d_inner, o.d_conv)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        with torch.no_grad():
            self.dt_proj.bias.copy_(inverse_softplus_dt(d_inner, o.dt_min, o.dt_max))
        # S4D-real initialisation: A[:, n] = -(n + 1) for every channel.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """The x-branch rows of the input projection (the stream the scan carries), and the output projection."""
        return {"value": [self.in_proj.weight[: self.d_inner]], "output": [self.out_proj.weight]}

    def _project(self, x):
        u, z = self.in_proj(x).chunk(2, dim=-1)
        return u, z, None

    def _ssm_inputs(self, u, extra, keep):
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.opts.d_state, self.opts.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        if keep is not None:
            delta = delta * keep  # dt = 0: the state passes a padded step unchanged
        return u, delta, B, C

    def _scan_reference(self, u, delta, B, C, h, reset=None):
        return s6_scan_reference(u, delta, -torch.exp(self.A_log), B, C, h, reset)

    def forward_fast(self, x, *, mask, state, pos):
        """The segmented scan with a recomputing hand-written backward (``nn/selective_scan.py``)."""
        return self._forward(x, mask, state, self._scan_fast, segments=pos.segments)

    def _scan_fast(self, u, delta, B, C, h, reset=None):
        segment = self.opts.checkpoint_every or max(1, u.shape[1])
        return selective_scan(u, delta, -torch.exp(self.A_log), B, C, h, reset, segment)

    def _scan_chunked(self, u, delta, B, C, h, reset=None):
        return s6_scan_chunked(u, delta, -torch.exp(self.A_log), B, C, h, self.opts.chunk_size, reset)

    def _output(self, y, inputs, z):
        return self.out_proj((y + inputs[0] * self.D) * F.silu(z))


@register_mixer("mamba2")
class Mamba2(_Selective):
    """Mamba-2 (SSD): scalar-times-identity A per head, shared B/C groups, gated RMSNorm; O(N) time."""

    # The same family and flags as Mamba: only the paper and the costs differ.
    capabilities = dataclasses.replace(
        Mamba.capabilities,
        paper="Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space "
        "Duality",
        time="O(N c d_inner + N d_inner d_state) chunked for chunk c",
        memory="O(N (c heads + d_inner d_state / c)) chunked, O(d_inner d_state) decode state",
        forms=("reference", "chunked", "recurrent"),
    )

    class Options(SelectiveOptions):
        """Options of Mamba-2 (SSD)."""

        d_state: int = Field(64, ge=1, description="N: state size per head")
        chunk_size: int = Field(64, ge=1, description="\"chunked\" form: tokens per chunk")
        head_dim: int | None = Field(None, ge=1, description="P; None = d_inner // n_heads")
        n_groups: int = Field(1, ge=1, description="B/C groups shared by heads (1 = one B, C for all heads)")
        norm_eps: float = Field(1e-5, gt=0, description="epsilon of the gated RMSNorm")

    test_options = {"d_state": 4, "chunk_size": 4}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        self._check_dt()
        o = self.opts
        d_inner = o.expand * d_model
        p = o.head_dim or d_inner // n_heads
        if d_inner % p:
            raise ConfigError("mamba2.head_dim", o.head_dim, f"must divide d_inner = expand * d_model = {d_inner}")
        heads = d_inner // p
        if heads % o.n_groups:
            raise ConfigError("mamba2.n_groups", o.n_groups, f"must divide the number of SSM heads ({heads})")
        self.d_inner, self.ssd_heads, self.ssd_head_dim = d_inner, heads, p
        gn = o.n_groups * o.d_state
        self.conv_channels, self.ssm_shape = d_inner + 2 * gn, (heads, p, o.d_state)
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * gn + heads, bias=False)  # z, x, B, C, dt
        self.conv1d = ShortConv(self.conv_channels, o.d_conv)
        self.dt_bias = nn.Parameter(inverse_softplus_dt(heads, o.dt_min, o.dt_max))
        self.A_log = nn.Parameter(log_decay_rates(heads))
        self.D = nn.Parameter(torch.ones(heads))
        self.norm_weight = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """The x rows of the fused z|x|B|C|dt input projection, and the output projection."""
        return {"value": [self.in_proj.weight[self.d_inner : 2 * self.d_inner]], "output": [self.out_proj.weight]}

    def _project(self, x):
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_channels, self.ssd_heads], dim=-1)
        return xbc, z, dt

    def _ssm_inputs(self, xbc, dt, keep):
        o = self.opts
        return ssd_inputs(xbc, dt, keep, self.dt_bias, self.ssd_heads, o.n_groups, o.d_state)

    def _scan_reference(self, xs, dt, B, C, h, reset=None):
        return ssd_scan_reference(xs, dt, -torch.exp(self.A_log), B, C, h, reset)

    def _scan_chunked(self, xs, dt, B, C, h, reset=None):
        return ssd_scan_chunked(xs, dt, -torch.exp(self.A_log), B, C, h, self.opts.chunk_size, reset)

    def _output(self, y, inputs, z):
        o = self.opts
        return self.out_proj(ssd_output(y, inputs[0], z, self.D, self.norm_weight, o.n_groups, o.norm_eps))

    def forward_chunked(self, x, *, mask, state, pos):
        """Chunk-parallel scan; in training from a zero state, by :class:`Mamba2Recompute` (recomputing backward)."""
        # The lean path re-runs the input projection itself.
        if state is not None or not torch.is_grad_enabled() or not bare_linear(self.in_proj):
            return super().forward_chunked(x, mask=mask, state=state, pos=pos)
        o = self.opts
        keep = None if mask is None else mask[..., None].to(x.dtype)
        reset = segment_starts(pos.segments) if pos.segments is not None else None
        cfg = (self.d_inner, self.conv_channels, self.ssd_heads, o.n_groups, o.d_state, o.chunk_size, o.norm_eps)
        params = (self.in_proj.weight, self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log, self.D,
                  self.norm_weight)
        y = Mamba2Recompute.apply(cfg, o.chunk_size * CHUNKS_PER_GROUP, x, keep, pos.segments, reset, *params)
        return self.out_proj(y), state
