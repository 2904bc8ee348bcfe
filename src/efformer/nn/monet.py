"""The Monet feed-forward block of "Monet: Mixture of Monosemantic Experts for Transformers" (Park et al.,
ICLR 2025): N^2 experts composed from two groups of N pieces each, product-key style.

Two routers (one per group, each with H heads) give every token sparse weights g1 (h, i) and g2 (h, j)
over the N pieces of its group; expert (i, j) gets the weight sum_h g1[h, i] g2[h, j], so N^2 experts
are mixed while only 2N pieces are stored. An expert is a two-layer MLP ``V sigma(U x + a) + b``:

- horizontal decomposition (HD): the bottom layer comes from group 1 and the top layer from group 2,
  E_ij(x) = V_j sigma(U_i x + a_i) + b_j;
- vertical decomposition (VD): both layers are split into halves, the hidden units' first half and
  the output's first half from group 1, the second halves from group 2:
  U_ij = [U1_i; U2_j], a_ij = [a1_i; a2_j], V_ij = [[V11_i, V12_i], [V21_j, V22_j]], b_ij = [b1_i; b2_j].

``form="fast"`` never builds an expert: each piece's hidden activations are computed once per token,
and the routing weights are contracted into them group by group (the sums over i and j factor
because each group's weights sum to one per head). ``form="reference"`` materialises every expert
(i, j) and mixes their outputs by the weights.

Routing (``routing="batchnorm"``, the paper's): a head's logits are batch-normalised (statistics over
the real tokens and pieces of the batch in training, running estimates in evaluation), and a piece is
kept when its normalised logit is at least Phi^-1(1 - top_k / N), so about ``top_k`` pieces per head
and group survive without a sort (the token's best piece always does); the kept logits are
softmax-normalised. ``routing="topk"`` keeps exactly the top ``top_k`` (deterministic, batch-free).

Auxiliary losses (weights as options): ``monet_uniformity``, per head and group the KL divergence from
uniform of the batch-mean routing distribution (the paper's uniformity loss up to its constant
log N; computed on the un-pruned softmax so every piece's logit gets a gradient), and
``monet_ambiguity``, the mean of 1 - max piece weight per head and group (small when each token
commits to one piece). The public release routes once per ``moe_groups`` layers and shares it; here
every layer routes itself.
"""

from __future__ import annotations

import statistics
from typing import Literal

import pydantic
import torch
from torch import Tensor, nn

from efformer.errors import ConfigError
from efformer.nn.ffn import _ACTS
from efformer.options import StrictModel, validate_options
from efformer.registry import FFNS


class MonetOptions(StrictModel):
    """Options of the ``monet`` feed-forward block (``ffn_options`` of the model config)."""

    n_pieces: int = pydantic.Field(8, ge=1, description="Pieces per group (N); the layer mixes N^2 experts.")
    expert_dim: int | None = pydantic.Field(
        None, ge=1, description="Hidden width of one expert (m); None: 1.5 * dense GLU width / N, so the "
        "parameters match a swiglu of the same ffn_mult.")
    n_heads: int = pydantic.Field(4, ge=1, description="Routing heads (H); each picks pieces in both groups.")
    top_k: int = pydantic.Field(2, ge=1, description="Pieces kept per head and group (expected count with "
                                "batchnorm routing, exact with topk); <= n_pieces.")
    decompose: Literal["horizontal", "vertical"] = pydantic.Field(
        "vertical", description="HD: bottom layer from group 1, top from group 2; VD: both layers halved.")
    routing: Literal["batchnorm", "topk"] = pydantic.Field(
        "batchnorm", description="batchnorm: the paper's threshold on batch-normalised logits; topk: exact.")
    activation: Literal["relu2", "silu", "gelu", "relu"] = pydantic.Field("relu2", description="Expert activation.")
    uniformity_loss_weight: float = pydantic.Field(1e-3, ge=0, description="Weight of monet_uniformity.")
    ambiguity_loss_weight: float = pydantic.Field(1e-3, ge=0, description="Weight of monet_ambiguity.")
    bn_momentum: float = pydantic.Field(0.1, gt=0, le=1, description="Momentum of the routing statistics.")
    form: Literal["auto", "fast", "reference"] = pydantic.Field(
        "auto", description="fast: decomposed contraction (auto); reference: every expert materialised.")

    @pydantic.model_validator(mode="after")
    def _check(self) -> MonetOptions:
        if self.top_k > self.n_pieces:
            raise ValueError(f"top_k={self.top_k} is larger than n_pieces={self.n_pieces}; lower top_k or add pieces")
        return self


@FFNS.register("monet")
class Monet(nn.Module):
    """Monet FFN: (b, n, d) -> (b, n, d) mixing n_pieces^2 experts; ``aux_losses`` and ``stats`` of the last call."""

    Options = MonetOptions
    takes_mask = True  # padding is left out of the routing statistics and the losses

    def __init__(self, d_model: int, mult: float = 4.0, dropout: float = 0.0, *, options=None, causal: bool = False):
        super().__init__()
        self.opts = o = validate_options(MonetOptions, options, "ffn_options")
        n = o.n_pieces
        m = o.expert_dim or max(2, round(1.5 * round(2 * mult * d_model / 3) / n))
        if o.decompose == "vertical" and (m < 2 or d_model < 2):
            raise ConfigError("ffn_options.expert_dim", m, "vertical decomposition halves the expert's hidden "
                              "width and d_model, so both must be >= 2")
        self.d_model, self.m = d_model, m
        self.router = nn.Linear(d_model, 2 * o.n_heads * n, bias=False)  # group 1 | group 2, head-major
        self.register_buffer("running_mean", torch.zeros(2, o.n_heads))
        self.register_buffer("running_var", torch.ones(2, o.n_heads))
        if o.decompose == "horizontal":
            self.u = nn.Linear(d_model, n * m)  # bias: a_i
            self.v = nn.Parameter(torch.empty(n, m, d_model).uniform_(-(n * m) ** -0.5, (n * m) ** -0.5))
            self.b = nn.Parameter(torch.zeros(n, d_model))
        else:
            # first halves (hidden m1, output d1) belong to group 1, second halves to group 2
            self.m1, self.d1 = m - m // 2, d_model - d_model // 2
            m2, d2 = m // 2, d_model // 2
            self.u1, self.u2 = nn.Linear(d_model, n * self.m1), nn.Linear(d_model, n * m2)
            bound = (n * m) ** -0.5
            self.v11 = nn.Parameter(torch.empty(n, self.m1, self.d1).uniform_(-bound, bound))  # of piece i
            self.v12 = nn.Parameter(torch.empty(n, m2, self.d1).uniform_(-bound, bound))  # of piece i
            self.v21 = nn.Parameter(torch.empty(n, self.m1, d2).uniform_(-bound, bound))  # of piece j
            self.v22 = nn.Parameter(torch.empty(n, m2, d2).uniform_(-bound, bound))  # of piece j
            self.b1, self.b2 = nn.Parameter(torch.zeros(n, self.d1)), nn.Parameter(torch.zeros(n, d2))
        self.act = _ACTS[o.activation]
        self.drop = nn.Dropout(dropout)
        self.aux_losses: dict[str, Tensor] = {}
        self.stats: dict[str, Tensor] = {}

    # ---- routing -------------------------------------------------------------------------------
    def route(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Piece weights of both groups for flat tokens x (t, d): g1, g2 (t, H, N), each head summing to one."""
        o = self.opts
        t = x.shape[0]
        z = self.router(x).float().view(t, 2, o.n_heads, o.n_pieces)
        if o.routing == "topk":
            keep = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, z.topk(o.top_k, -1).indices, True)
        else:
            keep = self._batchnorm_keep(z.detach(), valid)
        g = z.masked_fill(~keep, float("-inf")).softmax(-1)
        real = valid.nonzero().squeeze(1)
        if len(real):
            mean_p = z[real].softmax(-1).mean(0)  # (2, H, N): batch-mean of the un-pruned distribution
            unif = (-mean_p.clamp_min(1e-9).log().mean(-1) - torch.log(torch.tensor(float(o.n_pieces)))).mean()
            amb = (1 - g[real].amax(-1)).mean()
        else:
            unif = amb = z.new_zeros(())
        self.aux_losses = {"monet_uniformity": o.uniformity_loss_weight * unif,
                           "monet_ambiguity": o.ambiguity_loss_weight * amb}
        kept = keep[real].sum(-1).float()
        self.stats = {"pieces_per_head": kept.mean((0, 2)) if len(real) else kept.new_zeros(2)}  # (group 1, group 2)
        return g[:, 0].to(x.dtype), g[:, 1].to(x.dtype)

    def _batchnorm_keep(self, z: Tensor, valid: Tensor) -> Tensor:
        """Keep-mask (t, 2, H, N): normalised logit >= Phi^-1(1 - top_k / N), or the token's best piece."""
        o = self.opts
        real = z[valid]  # (r, 2, H, N)
        if self.training and real.shape[0] * o.n_pieces > 1:
            mean = real.mean((0, 3))
            var = real.var((0, 3), unbiased=False)
            count = real.shape[0] * o.n_pieces
            with torch.no_grad():
                self.running_mean.lerp_(mean, o.bn_momentum)
                self.running_var.lerp_(var * count / (count - 1), o.bn_momentum)
        else:
            mean, var = self.running_mean, self.running_var
        zn = (z - mean[None, :, :, None]) / (var[None, :, :, None] + 1e-5).sqrt()
        frac = 1 - o.top_k / o.n_pieces
        sigma = statistics.NormalDist().inv_cdf(frac) if frac > 0 else float("-inf")
        return zn >= zn.amax(-1, keepdim=True).clamp(max=sigma)

    # ---- experts -------------------------------------------------------------------------------
    def expert_params(self, i: int, j: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Expert (i, j) materialised: U (m, d), a (m,), V (m, d), b (d,); E_ij(x) = sigma(x U^T + a) V + b."""
        n, m = self.opts.n_pieces, self.m
        if self.opts.decompose == "horizontal":
            return self.u.weight[i * m : (i + 1) * m], self.u.bias[i * m : (i + 1) * m], self.v[j], self.b[j]
        m1, m2 = self.m1, m - self.m1
        u1, u2 = self.u1.weight.view(n, m1, -1), self.u2.weight.view(n, m2, -1)
        a1, a2 = self.u1.bias.view(n, m1), self.u2.bias.view(n, m2)
        v = torch.cat([torch.cat([self.v11[i], self.v21[j]], 1), torch.cat([self.v12[i], self.v22[j]], 1)], 0)
        return torch.cat([u1[i], u2[j]]), torch.cat([a1[i], a2[j]]), v, torch.cat([self.b1[i], self.b2[j]])

    def _reference(self, x: Tensor, g1: Tensor, g2: Tensor) -> Tensor:
        """Every expert (i, j) built and run on every token, mixed by sum_h g1[h, i] g2[h, j]."""
        w = torch.einsum("thi,thj->tij", g1, g2)
        out = x.new_zeros(x.shape)
        for i in range(self.opts.n_pieces):
            for j in range(self.opts.n_pieces):
                u, a, v, b = self.expert_params(i, j)
                out = out + w[:, i, j, None] * (self.drop(self.act(x @ u.t() + a)) @ v + b)
        return out

    def _fast(self, x: Tensor, g1: Tensor, g2: Tensor) -> Tensor:
        """Decomposed form: pieces' activations once per token, weights contracted group by group."""
        t, n = x.shape[0], self.opts.n_pieces
        if self.opts.decompose == "horizontal":
            z = self.drop(self.act(self.u(x))).view(t, n, self.m)
            s = torch.einsum("thi,tim->thm", g1, z)  # bottom layers mixed by group 1, per head
            c = torch.einsum("thj,thm->tjm", g2, s)  # ... then routed to top layers by group 2
            return c.reshape(t, -1) @ self.v.reshape(-1, self.d_model) + g2.sum(1) @ self.b
        z1 = self.drop(self.act(self.u1(x))).view(t, n, self.m1)
        z2 = self.drop(self.act(self.u2(x))).view(t, n, self.m - self.m1)
        w1, w2 = g1.sum(1), g2.sum(1)  # (t, N): a piece's total weight over heads (the other group sums to 1)
        s1 = torch.einsum("thi,tim->thm", g1, z1)
        s2 = torch.einsum("thj,tjm->thm", g2, z2)
        top = (w1[..., None] * z1).reshape(t, -1) @ self.v11.reshape(-1, self.d1) \
            + torch.einsum("thi,thm->tim", g1, s2).reshape(t, -1) @ self.v12.reshape(-1, self.d1) + w1 @ self.b1
        bottom = (w2[..., None] * z2).reshape(t, -1) @ self.v22.reshape(-1, self.d_model - self.d1) \
            + torch.einsum("thj,thm->tjm", g2, s1).reshape(t, -1) @ self.v21.reshape(-1, self.d_model - self.d1) \
            + w2 @ self.b2
        return torch.cat([top, bottom], -1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(b, n, d) -> (b, n, d); ``mask`` (b, n) keeps real tokens (padding gets a zero output)."""
        b, n, d = x.shape
        flat = x.reshape(b * n, d)
        valid = mask.reshape(-1) if mask is not None else torch.ones(b * n, dtype=torch.bool, device=x.device)
        g1, g2 = self.route(flat, valid)
        y = self._reference(flat, g1, g2) if self.opts.form == "reference" else self._fast(flat, g1, g2)
        return y.masked_fill(~valid[:, None], 0.0).reshape(b, n, d)

