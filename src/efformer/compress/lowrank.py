"""Low-rank factorization of linears: truncated SVD, activation-aware (whitened) SVD, and DSFormer's dense x sparse.

- Truncated SVD (Eckart-Young): ``W (out, in) ~ B (out, k) @ A (k, in)`` with ``B = U_k sqrt(S_k)``,
  ``A = sqrt(S_k) V_k^T``; ``||W - BA||_F^2 = sum_{i>k} s_i^2``, the least possible at rank k.
- Activation-aware SVD ("SVD-LLM: Truncation-aware Singular Value Decomposition for LLM Compression",
  in the spirit of "ASVD: Activation-aware SVD"): minimise ``||(W - W_hat) X^T||_F`` over the calibration
  inputs X (tokens, in) instead of ``||W - W_hat||_F``. With ``H = X^T X + damp*mean(diag H)*I = L L^T``
  (Cholesky), ``||(W - W_hat) X^T||^2 = ||(W - W_hat) L||^2``, so truncating the SVD of ``W L`` and
  multiplying back by ``L^-1`` is optimal for the activation-weighted objective (up to the dampening).
- DSFormer ("DSFormer: Effective Compression of Text-Transformers by Dense-Sparse Weight Factorization"):
  ``W ~ D (out, k) @ S (k, in)`` with S semi-structured sparse. What we chose (the paper trains the factors
  with its Straight-Through Factorizer; we fit them post-training): every column of S is N:M sparse along k
  (2:4 by default: each input column mixes 2 of every 4 basis vectors), fitted by alternating least squares
  from the SVD: S's support = the N largest of each group of M in ``D^+ W``, S's values = least squares on
  that support (column by column), then ``D = W S^T (S S^T)^-1``. S is stored compressed (values and the
  index inside each group), so the module really holds ``out*k + in*k*N/M`` weights (+ small indices).

``factorize(model, config, calibration=None, filter=None)`` swaps the selected linears (the same
filter convention as ``quantize``) for :class:`LowRankLinear` / :class:`DenseSparseLinear` on a copy
and swaps the finished tree in at the end (a failure leaves the model untouched). The model carries
``model.factorization`` (method, config, each module's spec), which ``efformer.save`` writes into
``config.json`` and ``efformer.load`` uses to rebuild the smaller shapes before reading the weights.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pydantic
import torch
from torch import Tensor, nn

from efformer.compress.api import _block_groups, _set, _targets
from efformer.compress.calibration import HessianObserver, check_windows, observe
from efformer.compress.sections import swap_listed_linears
from efformer.errors import ConfigError, ShapeError
from efformer.models.io import CONFIG_SECTIONS
from efformer.options import StrictModel, config_error


class LowRankLinear(nn.Module):
    """``y = second(first(x))``: an (out, in) linear as (rank, in) then (out, rank) (+ the original bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out)."""
        return self.second(self.first(x))

    @property
    def weight_product(self) -> Tensor:
        """The dense (out, in) matrix this module applies."""
        return self.second.weight @ self.first.weight

    def spec(self) -> dict:
        """What ``efformer.load`` needs to rebuild this module."""
        return {"kind": "lowrank", "rank": self.rank, "bias": self.second.bias is not None}


def nm_expand(values: Tensor, index: Tensor, n: int, m: int) -> Tensor:
    """Dense (k, in) from N:M-compressed ``values``/``index`` (k*n/m, in); ``index`` is the row inside each group."""
    kn, cols = values.shape
    base = (torch.arange(kn, device=values.device) // n * m).unsqueeze(1)  # first row of each value's group
    dense = torch.zeros(kn // n * m, cols, dtype=values.dtype, device=values.device)
    return dense.scatter(0, base + index.long(), values)


def nm_compress(dense: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """(values, index) (k*n/m, in) of a (k, in) matrix that is N:M sparse along dim 0 (keeps each group's top n)."""
    k, cols = dense.shape
    grouped = dense.reshape(k // m, m, cols)
    idx = grouped.abs().topk(n, dim=1).indices.sort(dim=1).values  # (k/m, n, in), in row order
    vals = grouped.gather(1, idx)
    return vals.reshape(k // m * n, cols), idx.reshape(k // m * n, cols).to(torch.uint8)


class DenseSparseLinear(nn.Module):
    """DSFormer's ``y = D (S x) + b``: D dense (out, k), S (k, in) N:M sparse along k, stored compressed."""

    def __init__(self, in_features: int, out_features: int, inner: int, n: int, m: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.inner, self.n, self.m = in_features, out_features, inner, n, m
        self.values = nn.Parameter(torch.zeros(inner // m * n, in_features))
        self.register_buffer("index", torch.zeros(inner // m * n, in_features, dtype=torch.uint8))
        self.dense = nn.Linear(inner, out_features, bias=bias)

    @property
    def sparse(self) -> Tensor:
        """The (k, in) N:M-sparse factor S, expanded."""
        return nm_expand(self.values, self.index, self.n, self.m)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out)."""
        return self.dense(x @ self.sparse.T)

    @property
    def weight_product(self) -> Tensor:
        """The dense (out, in) matrix this module applies."""
        return self.dense.weight @ self.sparse

    def spec(self) -> dict:
        """What ``efformer.load`` needs to rebuild this module."""
        return {"kind": "dense_sparse", "inner": self.inner, "n": self.n, "m": self.m,
                "bias": self.dense.bias is not None}


# ---- the factorizations of one matrix ---------------------------------------------------------
def svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Truncated SVD: (B (out, k), A (k, in)) with ``B @ A`` the best rank-k approximation of ``weight``."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype)


def whitening(h: Tensor, damp: float) -> Tensor:
    """Lower Cholesky factor L (in, in) of ``h + damp*mean(diag h)*I`` (more dampening while not positive definite)."""
    h = h.double()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    scale = float(h.diagonal().mean()) if float(h.diagonal().mean()) > 0 else 1.0
    for extra in (1.0, 10.0, 100.0, 1e4):  # a rank-deficient H (few tokens, dead channels) needs more
        chol, info = torch.linalg.cholesky_ex(h + damp * extra * scale * eye)
        if int(info) == 0:
            return chol
    raise ShapeError("the calibration covariance is not positive definite even with heavy dampening; "
                     "give more calibration windows or raise damp")


def asvd_factors(weight: Tensor, chol: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Whitened SVD: (B, A) minimising ``||(W - BA) L||_F`` for ``L`` the Cholesky factor of the input covariance."""
    b, a_white = svd_factors(weight.double() @ chol, rank)
    a = torch.linalg.solve_triangular(chol, a_white, upper=False, left=False)  # a_white @ L^-1
    return b.to(weight.dtype), a.to(weight.dtype)


def _top_support(coef: Tensor, n: int, m: int) -> Tensor:
    """(k, in) bool: the n largest |coef| of every group of m rows, in every column (exactly n each)."""
    k, cols = coef.shape
    grouped = coef.abs().reshape(k // m, m, cols)
    return torch.zeros_like(grouped, dtype=torch.bool).scatter(1, grouped.topk(n, dim=1).indices, True).reshape(k, cols)


def _support_least_squares(gram: Tensor, rhs: Tensor, support: Tensor) -> Tensor:
    """S (k, in) on ``support`` minimising ||D S - W||_F column by column, from ``gram = D^T D``, ``rhs = D^T W``."""
    k, cols = support.shape
    rows = support.T.nonzero()[:, 1].reshape(cols, -1)  # (in, per): the basis vectors each column may use
    sub = gram[rows.unsqueeze(-1), rows.unsqueeze(-2)]  # (in, per, per)
    sol = torch.linalg.solve(sub, rhs.T.gather(1, rows).unsqueeze(-1)).squeeze(-1)  # (in, per)
    return torch.zeros(cols, k, dtype=gram.dtype).scatter(1, rows, sol).T


def dsformer_factors(weight: Tensor, inner: int, n: int = 2, m: int = 4, iters: int = 8) -> tuple[Tensor, Tensor]:
    """(D (out, k), S (k, in) N:M sparse along k) fitted by alternating least squares from the truncated SVD."""
    w = weight.double()
    rank = min(inner, *w.shape)
    b, a = svd_factors(w, rank)
    d = torch.zeros(w.shape[0], inner, dtype=w.dtype)
    d[:, :rank] = b
    coef = torch.zeros(inner, w.shape[1], dtype=w.dtype)
    coef[:rank] = a
    eye = torch.eye(inner, dtype=w.dtype)
    ridge = 1e-9 * float((w * w).sum()) / inner + 1e-30  # keeps unused basis vectors from a singular system
    s = coef
    for it in range(iters):
        gram = d.T @ d + ridge * eye
        if it:
            coef = torch.linalg.solve(gram, d.T @ w)  # the best dense coefficients for this D
        s = _support_least_squares(gram, d.T @ w, _top_support(coef, n, m))
        d = torch.linalg.solve(s @ s.T + ridge * eye, s @ w.T).T
    return d.to(weight.dtype), s.to(weight.dtype)


# ---- the model-level call -----------------------------------------------------------------------
class FactorizeConfig(StrictModel):
    """How to factorize: the method and exactly one of rank, energy or params (the budget)."""

    method: Literal["svd", "asvd", "dsformer"] = pydantic.Field("svd", description="svd, asvd or dsformer")
    rank: int | None = pydantic.Field(None, ge=1, description="the rank (dsformer: inner width) of every target")
    energy: float | None = pydantic.Field(None, gt=0, le=1, description="keep this fraction of sum s_i^2 per linear")
    params: float | None = pydantic.Field(None, gt=0, lt=1, description="keep this fraction of each target's weights")
    damp: float = pydantic.Field(0.01, gt=0, le=10, description="asvd: dampening, as a fraction of mean diag(X^T X)")
    n: int = pydantic.Field(2, ge=1, description="dsformer: kept entries per group of m")
    m: int = pydantic.Field(4, ge=2, description="dsformer: group length along the inner width")
    iters: int = pydantic.Field(8, ge=1, le=100, description="dsformer: alternating least-squares rounds")

    def __init__(self, **kw):
        try:
            super().__init__(**kw)
        except pydantic.ValidationError as e:
            raise config_error(e, "FactorizeConfig", FactorizeConfig) from None

    @pydantic.model_validator(mode="after")
    def _one_budget(self) -> FactorizeConfig:
        given = [k for k in ("rank", "energy", "params") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of rank, energy or params (got {', '.join(given) or 'none'})")
        if self.n >= self.m:
            raise ValueError(f"n={self.n} must be below m={self.m} (n of every m kept)")
        return self

    @property
    def budget(self) -> str:
        """The name of the budget field that is set."""
        return next(k for k in ("rank", "energy", "params") if getattr(self, k) is not None)


Progress = Callable[[str, int, int, float], None]


def _energy_rank(s: Tensor, energy: float) -> int:
    cum = (s.double() ** 2).cumsum(0)
    return int(torch.searchsorted(cum, energy * float(cum[-1]) * (1 - 1e-12)).item()) + 1


def choose_rank(cfg: FactorizeConfig, name: str, out_f: int, in_f: int, spectrum: Tensor | None = None) -> int:
    """The rank (dsformer: inner width, a multiple of m) ``cfg`` gives a (out_f, in_f) linear called ``name``."""
    width = min(out_f, in_f)
    sparse = cfg.method == "dsformer"
    if cfg.rank is not None:
        if cfg.rank > width:
            raise ConfigError("rank", cfg.rank, f"must be in [1, {width}] for {name} ({out_f} x {in_f}); lower it "
                              "or exclude that linear with a filter")
        k = cfg.rank
    elif cfg.energy is not None:
        k = _energy_rank(spectrum, cfg.energy)
        if sparse:  # round up: the energy is a floor
            k = min(width // cfg.m * cfg.m, -(-k // cfg.m) * cfg.m)
    else:
        per = out_f + in_f * cfg.n / cfg.m if sparse else out_f + in_f
        k = int(cfg.params * out_f * in_f / per)
    if sparse:
        k = k // cfg.m * cfg.m
    if k < 1:
        raise ConfigError(cfg.budget, getattr(cfg, cfg.budget), f"leaves {name} ({out_f} x {in_f}) with rank 0, "
                          f"removing it entirely{f' (dsformer needs a multiple of m={cfg.m})' if sparse else ''}; "
                          "raise it")
    return k


def factored_params(cfg: FactorizeConfig, out_f: int, in_f: int, k: int) -> int:
    """Weights of the factorized (out_f, in_f) linear at rank/inner width k (indices of S not counted)."""
    return out_f * k + (in_f * k * cfg.n // cfg.m if cfg.method == "dsformer" else in_f * k)


def _hessians(work: nn.Module, calibration: Tensor, names: list[str], targets: dict[str, nn.Linear],
              block: str) -> dict[str, Tensor]:
    stop = work.get_submodule(block) if block else None
    obs = observe(work, calibration, {n: targets[n] for n in names}, HessianObserver, stop_after=stop)
    return {n: obs[n].h if obs[n].h is not None else torch.zeros(targets[n].in_features, targets[n].in_features)
            for n in names}


def _replace(cfg: FactorizeConfig, name: str, lin: nn.Linear, h: Tensor | None) -> nn.Module | None:
    """The factorized module for ``lin``, or None when factoring it would not make it smaller."""
    w = lin.weight.detach().float()
    out_f, in_f = w.shape
    chol = whitening(h, cfg.damp) if cfg.method == "asvd" else None
    spectrum = None
    if cfg.energy is not None:
        spectrum = torch.linalg.svdvals(w.double() @ chol if chol is not None else w.double())
    k = choose_rank(cfg, name, out_f, in_f, spectrum)
    if factored_params(cfg, out_f, in_f, k) >= out_f * in_f:
        return None
    bias = lin.bias is not None
    if cfg.method == "dsformer":
        d, s = dsformer_factors(w, k, cfg.n, cfg.m, cfg.iters)
        new = DenseSparseLinear(in_f, out_f, k, cfg.n, cfg.m, bias)
        values, index = nm_compress(s, cfg.n, cfg.m)
        new.values.data.copy_(values)
        new.index.copy_(index)
        new.dense.weight.data.copy_(d)
        out_lin = new.dense
    else:
        b, a = svd_factors(w, k) if chol is None else asvd_factors(w, chol, k)
        new = LowRankLinear(in_f, out_f, k, bias)
        new.first.weight.data.copy_(a)
        new.second.weight.data.copy_(b)
        out_lin = new.second
    if bias:
        out_lin.bias.data.copy_(lin.bias.detach())
    return new.to(lin.weight.dtype)


def _check(model: nn.Module, cfg: object, targets: dict, calibration: Tensor | None) -> None:
    if not isinstance(cfg, FactorizeConfig):
        raise ConfigError("config", type(cfg).__name__, "a FactorizeConfig (efformer.compress.FactorizeConfig)")
    for attr in ("factorization", "quantization"):
        if getattr(model, attr, None):
            raise ConfigError("model", f"already has {attr}", "factorize a float, unfactorized model (load the "
                              "original again)")
    if not targets:
        raise ConfigError("filter", "no linear selected", "the filter must accept at least one nn.Linear of the model")
    for name, lin in targets.items():
        if cfg.method == "dsformer" and cfg.rank is not None and cfg.rank % cfg.m:
            raise ConfigError("rank", cfg.rank, f"dsformer's inner width must be a multiple of m={cfg.m}")
        if cfg.energy is None:  # rank and params budgets do not depend on the spectrum: check them all up front
            choose_rank(cfg, name, lin.out_features, lin.in_features)
    if cfg.method == "asvd":
        check_windows(calibration, "asvd")


def factorize(model: nn.Module, config: FactorizeConfig, calibration: Tensor | None = None,
              filter: Callable[[str, nn.Module], bool] | None = None, progress: Progress | None = None) -> nn.Module:
    """Replace ``model``'s selected linears by smaller factorized ones, in place; ``calibration`` (n, seq) token
    ids for asvd. Returns the model; on any error it is unchanged."""
    _check(model, config, _targets(model, filter), calibration)
    work = copy.deepcopy(model)
    targets = _targets(work, filter)
    progress = progress or (lambda *a: None)
    modules, dense, done = {}, [], 0
    with torch.no_grad():
        for block, names in _block_groups(list(targets)):
            hs = _hessians(work, calibration, names, targets, block) if config.method == "asvd" else {}
            for name in names:  # every linear of a block sees the inputs of the blocks factorized before it
                t0 = time.perf_counter()
                new = _replace(config, name, targets[name], hs.get(name))
                if new is None:
                    dense.append(name)
                else:
                    _set(work, name, new)
                    modules[name] = new.spec()
                progress(name, done, len(targets), time.perf_counter() - t0)
                done += 1
    if not modules:
        raise ConfigError(config.budget, getattr(config, config.budget), "no selected linear gets smaller at this "
                          "budget (factoring would not save weights); lower it")
    section = {"method": config.method, "config": config.model_dump(), "modules": modules, "dense": dense}
    model._modules, model._parameters, model._buffers = work._modules, work._parameters, work._buffers
    model.factorization = section
    return model


# ---- save / load: config.json's "factorization" section ----------------------------------------
_NEEDS = {"lowrank": ("rank", "bias"), "dense_sparse": ("inner", "n", "m", "bias")}


def _build(spec: dict, in_f: int, out_f: int) -> nn.Module:
    if spec["kind"] == "lowrank":
        return LowRankLinear(in_f, out_f, int(spec["rank"]), bool(spec["bias"]))
    n, m, k = int(spec["n"]), int(spec["m"]), int(spec["inner"])
    if not 1 <= n < m or k < 1 or k % m:
        raise ValueError(f"inner={k}, n={n}, m={m} is not an N:M layout")
    return DenseSparseLinear(in_f, out_f, k, n, m, bool(spec["bias"]))


def apply_factorization_section(model: nn.Module, section: object, path: Path) -> None:
    """Swap the linears a checkpoint's ``factorization`` section lists for empty factorized modules."""
    swap_listed_linears(model, section, path, "factorization", _NEEDS, _build)
    model.factorization = section


CONFIG_SECTIONS["factorization"] = apply_factorization_section
