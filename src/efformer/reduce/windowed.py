"""Token merging inside the windows of Swin-style models: tokens match only within their own window.

Papers: "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023) for the bipartite matching;
"Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (Liu et al., 2021) for the
windows. The ToMe maintainers' suggestion for windowed attention is to merge the same number of
tokens in every window, so the windows stay a regular batch; this module does that at ToMe's place
in each block (after the window attention, before the MLP), with the windows that attention just
used, shifted ones included: the matching follows the mixer's own layout (cyclic shift, padding to
window multiples) and never pairs tokens of different wrap-round regions of a shifted window (they
are not neighbours in the image and did not attend to each other).

The next Swin block uses the other window layout (plain after shifted), and patch merging needs the
full grid, so each block's merge is undone after its MLP (the reducer's ``per_block`` stacks): the
MLP, most of a Swin block's FLOPs at small windows, runs on the merged tokens and the grid every
attention and merge sees is whole. ``r`` is the count removed per window at each block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from efformer.errors import CapabilityError
from efformer.mixers.vision_grid import grid_coords
from efformer.reduce.hook import Assignment, ReduceError, TokenView
from efformer.reduce.methods import NEG, Method, ToMe, normalized


def has_windows(mixer) -> bool:
    """Whether a mixer attends inside a regular (shifted) window layout this module can follow (Swin)."""
    return mixer.name == "swin"


def window_slots(mixer, h: int, w: int, device=None) -> tuple[Tensor, Tensor]:
    """The mixer's windows on an h x w grid: (token index (W, t), -1 for the padding slots; wrap-round
    region (W, t)), slots in each window in row-major order, exactly as its fast form partitions them."""
    wh, ww, sh, sw, hp, wp = mixer.layout(h, w)
    rr, cc = grid_coords(hp, wp, device)
    o_r, o_c = (rr + sh) % hp, (cc + sw) % wp  # rolled by -shift: slot (i, j) holds token (i + s) mod side

    def windows(t: Tensor) -> Tensor:
        return t.reshape(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    o_r, o_c = windows(o_r), windows(o_c)
    index = torch.where((o_r < h) & (o_c < w), o_r * w + o_c, -1)
    return index, (o_r < sh).long() * 2 + (o_c < sw).long()


def window_caps(index: Tensor, region: Tensor) -> Tensor:
    """How many tokens each window (W,) may merge away: half (rounded down) of each of its regions' real
    tokens, ToMe's bipartite bound inside every group of tokens that attend to each other."""
    g = _group_onehot(index, region).sum(1)  # (W, regions): real tokens per region
    return (g // 2).sum(-1)


def window_cap(index: Tensor, region: Tensor) -> int:
    """r every full window (no padding slot) can lose; the smallest over all windows if none is full."""
    caps = window_caps(index, region)
    full = (index >= 0).all(-1)
    return int(caps[full].min() if bool(full.any()) else caps.min())


def _group_onehot(index: Tensor, region: Tensor) -> Tensor:
    return torch.nn.functional.one_hot(region, 4) * (index >= 0)[..., None]  # (W, t, 4), padding: none


def _halves(index: Tensor, region: Tensor) -> Tensor:
    """valid (W, t, t): inside each region of a window the real tokens alternate A, B, A, ... in slot order,
    and an A slot may pair with any B slot of its region."""
    onehot = _group_onehot(index, region)
    rank = (onehot.cumsum(1) * onehot).sum(-1) - 1  # position of each real token inside its region
    real = index >= 0
    is_a, is_b = real & (rank % 2 == 0), real & (rank % 2 == 1)
    same = region[:, :, None] == region[:, None, :]
    return is_a[:, :, None] & is_b[:, None, :] & same


def window_assignment(metric: Tensor, index: Tensor, region: Tensor, r: int) -> Assignment:
    """ToMe inside every window: metric (b, n, c); in each region of each window the A tokens find their most
    similar B token, and the r best-matched A tokens of each window merge (an edge window whose padding
    leaves it a smaller cap (:func:`window_caps`) loses only that many)."""
    b, n, _ = metric.shape
    m = normalized(metric)
    mw = m[:, index.clamp(min=0)]  # (b, W, t, c)
    scores = (mw @ mw.transpose(-1, -2)).masked_fill(~_halves(index, region), NEG)
    best, partner = scores.max(-1)  # (b, W, t): -inf for slots that are not A or have no partner
    top = best.argsort(-1, descending=True)[..., :r]
    caps = window_caps(index, region).to(top.device)  # an edge window never loses more than half a region
    ok = (best.gather(2, top) > NEG) & (torch.arange(top.shape[2], device=top.device) < caps[:, None])
    idx = index.expand(b, -1, -1)
    src = torch.where(ok, idx.gather(2, top), n)  # picks without a partner go to a dummy column
    dst_tok = torch.where(ok, idx.gather(2, partner.gather(2, top)), n)
    dst = torch.arange(n + 1, device=metric.device).expand(b, n + 1).clone()
    return Assignment(dst.scatter(1, src.reshape(b, -1), dst_tok.reshape(b, -1))[:, :n])


class WindowedToMe(Method):
    """ToMe inside the windows of Swin blocks (r per window), plain ToMe in any other block."""

    name = "tome"

    def __init__(self, **options):
        super().__init__(**options)
        self.plain = ToMe()

    def assign(self, view: TokenView, r: int) -> Assignment:
        """Windowed matching in a block whose mixer has windows (on the context's grid), else ToMe's."""
        mixer = view.blocks[view.j].mixer
        if not has_windows(mixer):
            return self.plain.assign(view, r)
        if view.ctx.grid is None:
            raise CapabilityError("windowed merging needs the token grid, which only image models pass")
        h, w = view.ctx.grid
        index, region = window_slots(mixer, h, w, view.tok.x.device)
        most = window_cap(index, region)
        if r > most:
            wh, ww, sh, sw, _, _ = mixer.layout(h, w)
            shifted = f", shifted by ({sh}, {sw})" if sh or sw else ""
            raise ReduceError("schedule.r", r, f"block {view.j}'s {wh}x{ww} windows{shifted} on the "
                              f"{h}x{w} grid can each merge away at most {most} tokens (half of each wrap-round "
                              f"region's tokens); more would empty a window's half: lower r to <= {most}")
        return window_assignment(view.metric(), index, region, r)

