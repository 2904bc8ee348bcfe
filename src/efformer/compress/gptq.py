"""GPTQ: layer-wise weight quantization with second-order error feedback.

Paper: "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(Frantar, Ashkboos, Hoefler, Alistarh; ICLR 2023). For a linear with inputs X (tokens, in), GPTQ
minimises ||(W - Q) X^T||^2 column by column: quantize column i, then spread its error over the
columns not yet quantized through the upper Cholesky factor U of H^-1, H = 2/n X^T X. Columns are
handled in blocks of B with one GEMM per block for the columns after it ("lazy batch updates");
act-order visits columns by decreasing diag(H); groups take their scales from the error-updated
weights when the group starts (dynamic) or from the original weights up front (static).
``gptq_reference`` is the plain per-column form (no blocks) the fast form is tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from efformer.compress.formats import IntFormat, int_qparams, int_qparams_clipped, quantize_column
from efformer.compress.rtn import QuantizedWeight
from efformer.errors import EfformerError

DAMP_RETRIES = (1, 10, 100, 1000)  # multiples of percdamp tried when Cholesky fails


class NumericalError(EfformerError, ArithmeticError):
    """A factorization failed even after the automatic retries (e.g. a Hessian with NaN entries)."""


def inverse_hessian_factor(h: Tensor, percdamp: float) -> tuple[Tensor, float]:
    """(upper Cholesky factor U of (H + damp I)^-1, the damping used); damping grows x10 on each failure."""
    h = h.double()
    mean_diag = h.diagonal().mean().item()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for k in DAMP_RETRIES:
        damp = percdamp * k * mean_diag
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0 and torch.isfinite(u).all():
                return u.float(), damp
    raise NumericalError(f"the Hessian (size {h.shape[0]}) is not positive definite even with damping "
                         f"{percdamp * DAMP_RETRIES[-1]} x its mean diagonal; it holds non-finite values or "
                         "the calibration inputs are broken: check the calibration data")


def _prepare(w: Tensor, h: Tensor, act_order: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Float copies of W and H with dead input columns zeroed, and the act-order permutation."""
    w, h = w.detach().float().clone(), h.detach().double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    return w, h, perm


def _finish(codes: Tensor, scales: list[Tensor], zeros: list[Tensor], col_group: Tensor, perm: Tensor | None,
            fmt: IntFormat) -> QuantizedWeight:
    """Undo act-order and pack per-column codes with their groups' scales."""
    scale, zero = torch.stack(scales, 1), torch.stack(zeros, 1)
    g_idx = col_group
    if perm is not None:
        inv = torch.argsort(perm)
        codes, g_idx = codes[:, inv], col_group[inv]
    trivial = fmt.granularity != "group" or torch.equal(g_idx, torch.arange(len(g_idx)) // fmt.group_size)
    return QuantizedWeight(codes, scale, zero, fmt, None if trivial else g_idx)


@torch.no_grad()
def gptq_quantize(w: Tensor, h: Tensor, fmt: IntFormat, *, act_order: bool = False, static_groups: bool = False,
                  percdamp: float = 0.01, block_size: int = 128, mse_clip: bool = False) -> QuantizedWeight:
    """GPTQ of a weight (out, in) given the Hessian H (in, in) of its inputs, in ``fmt`` (per channel or group);
    ``mse_clip`` picks each grid by the clipping search of ``int_qparams_clipped`` instead of min/max."""
    qparams = int_qparams_clipped if mse_clip else int_qparams
    w, h, perm = _prepare(w, h, act_order)
    u, _ = inverse_hessian_factor(h, percdamp)
    out_f, n = w.shape
    g = fmt.group_size if fmt.granularity == "group" else n
    # static groups: every group's grid from the original weight, up front
    static = qparams(w if perm is None else w[:, torch.argsort(perm)], fmt) if static_groups else None
    orig_col = perm if perm is not None else torch.arange(n)
    row_fmt = fmt.with_grain("channel")
    codes = torch.zeros(out_f, n, dtype=torch.int32)
    scales, zeros, col_group = [], [], torch.zeros(n, dtype=torch.long)
    scale = zero = None
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1, err1, u1 = w[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1), u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                grp = int(orig_col[col]) // g
                scale, zero = static[0][:, grp], static[1][:, grp]
                if not scales:
                    scales, zeros = list(static[0].unbind(1)), list(static[1].unbind(1))
            elif col % g == 0:  # a new group: its grid from the weights as updated so far
                span = torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :g]
                s, z = qparams(span, row_fmt)
                scale, zero = s[:, 0], z[:, 0]
                scales.append(scale)
                zeros.append(zero)
                grp = len(scales) - 1
            col_group[col] = grp
            q_codes, q = quantize_column(w1[:, i], scale, zero, fmt)
            codes[:, col] = q_codes
            err = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return _finish(codes, scales, zeros, col_group, perm, fmt)


@torch.no_grad()
def gptq_reference(w: Tensor, h: Tensor, fmt: IntFormat, *, act_order: bool = False, static_groups: bool = False,
                   percdamp: float = 0.01, mse_clip: bool = False) -> QuantizedWeight:
    """GPTQ one column at a time with immediate rank-1 updates (the fast form with a block of one column)."""
    return gptq_quantize(w, h, fmt, act_order=act_order, static_groups=static_groups, percdamp=percdamp,
                         block_size=1, mse_clip=mse_clip)


def layer_error(w: Tensor, q: Tensor, x: Tensor) -> float:
    """GPTQ's objective ||(W - Q) X^T||^2 for inputs x (tokens, in)."""
    return ((w.double() - q.double()) @ x.double().T).square().sum().item()
