"""ETC and FIT: the definitions written out independently, exact limits (full attention, block-local
attention), information crossing groups only through latents, bad options."""

from __future__ import annotations

import math

import pytest
import torch

from efformer.errors import ConfigError
from efformer.nn.positional import PositionalContext
from efformer.registry import MIXERS
from tests.helpers import make_mixer, rel_err, with_form

DIRECTIONS = pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])


def _twin(m, name="softmax", **options):
    """A softmax-layout mixer (softmax, local) with m's q/kv/out weights and direction."""
    tw = MIXERS.get(name)(m.d_model, m.n_heads, causal=m.causal, options={"n_kv_heads": m.n_kv_heads, **options})
    missing, _ = tw.load_state_dict(m.state_dict(), strict=False)
    assert not missing
    return tw.eval()


def _keep(n: int, causal: bool = False) -> torch.Tensor:
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, slice(0, n // 3) if causal else slice(n - n // 3, None)] = False
    return keep


# ---- ETC -----------------------------------------------------------------------------------
def _etc_by_hand(m, x, keep):
    """ETC written per (query, key) pair: the pattern, Shaw-style relative vectors, softmax; long outputs."""
    g, r, kd = m.opts.n_global, m.opts.radius, m.opts.max_distance
    if m.opts.global_tokens == "learned":
        x = torch.cat([m.global_embed.expand(x.shape[0], -1, -1), x], 1)
        keep = torch.cat([torch.ones(x.shape[0], g, dtype=torch.bool), keep], 1)
    q, k, v = m.qkv_heads(x, PositionalContext(torch.arange(x.shape[1])[None]))
    b, h, t, d = q.shape
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                scores, values = [], []
                for j in range(t):
                    if not (i < g or j < g or abs(i - j) <= r) or (keep[bi, i] and not keep[bi, j]):
                        continue
                    if i < g <= j:
                        label = 2 * kd + 1
                    elif j < g <= i:
                        label = 2 * kd + 2
                    else:
                        label = max(-kd, min(kd, j - i)) + kd
                    a = m.relative[hi, label]
                    scores.append(q[bi, hi, i] @ (k[bi, hi, j] + a) / math.sqrt(d))
                    values.append(v[bi, hi, j])
                p = torch.stack(scores).softmax(0)
                out[bi, hi, i] = (p[:, None] * torch.stack(values)).sum(0)
    y = m._finish(out)
    return y[:, g:] if m.opts.global_tokens == "learned" else y


@pytest.mark.parametrize("mode", ["prefix", "learned"])
def test_etc_is_its_definition_written_per_pair(mode):
    m = make_mixer("etc", False, radius=2, n_global=2, max_distance=2, global_tokens=mode)
    with torch.no_grad():
        m.relative.normal_()
    n = 9
    x = torch.randn(2, n, m.d_model)
    keep = _keep(n)
    with torch.no_grad():
        want = _etc_by_hand(m, x, keep) * keep[..., None]
        for form in ("reference", "fast"):
            got, _ = with_form(m, form)(x, mask=keep)
            assert rel_err(want, got) < 1e-5, form


@pytest.mark.parametrize("mode", ["prefix", "learned"])
def test_etc_with_a_covering_radius_is_full_attention_over_global_and_long(mode):
    n, g = 11, 3
    m = make_mixer("etc", False, radius=n + g, n_global=g, global_tokens=mode)  # relative vectors start at 0
    sm = _twin(m)
    x = torch.randn(2, n, m.d_model)
    keep = _keep(n)
    for mask in (None, keep):
        if mode == "prefix":
            want, _ = sm(x, mask=mask)
        else:
            full = torch.cat([m.global_embed.expand(2, -1, -1), x], 1)
            full_mask = None if mask is None else torch.cat([torch.ones(2, g, dtype=torch.bool), mask], 1)
            want = sm(full, mask=full_mask)[0][:, g:]
        for form in ("reference", "fast"):
            got, _ = with_form(m, form)(x, mask=mask)
            assert rel_err(want, got) < 1e-5, (form, mask is not None)


def test_etc_far_long_tokens_are_invisible_but_global_rows_see_everything():
    """Within one layer a long token sees long tokens within the radius and the global tokens' inputs only;
    the global rows see everything (their outputs carry it to the next layer)."""
    m = make_mixer("etc", False, radius=1, n_global=1, global_tokens="prefix")
    x = torch.randn(1, 12, m.d_model)
    x2 = x.clone()
    x2[:, -1] += 3.0
    changed = ~torch.isclose(m(x)[0], m(x2)[0], atol=1e-6).all(-1)[0]
    assert changed.tolist() == [True] + [False] * 9 + [True, True]


# ---- FIT -----------------------------------------------------------------------------------
def _fit_by_hand(m, x):
    """FIT's three steps written per group with plain loops (no padding), for an independent check."""
    G, L = m.opts.group_size, m.opts.n_latents
    b, n, _ = x.shape
    ng = -(-n // G)
    groups = [x[:, s * G : (s + 1) * G] for s in range(ng)]
    z = [m.latents.expand(b, -1, -1) for _ in range(ng)]

    def attend(q_in, kv_in, kv_proj, q_proj, causal_tok=None):
        q = m.split_heads(q_proj(q_in))
        k, v = m.split_heads(kv_proj(kv_in), 2 * m.n_kv_heads).chunk(2, dim=1)
        k, v = (t.repeat_interleave(m.n_heads // m.n_kv_heads, 1) for t in (k, v))
        s = q @ k.transpose(-1, -2) / math.sqrt(m.head_dim)
        if causal_tok is not None:
            s = s.masked_fill(~causal_tok, float("-inf"))
        return m.merge_heads(s.softmax(-1) @ v)

    z = [zg + m.l_out(attend(zg, torch.cat([zg, xg], 1), m.kv_proj, m.lq)) for zg, xg in zip(z, groups, strict=True)]
    flat = torch.cat(z, 1)
    qkv = m.split_heads(m.g_qkv(flat), 3 * m.n_heads)
    q, k, v = qkv.chunk(3, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(m.head_dim)
    if m.causal:
        lg = torch.arange(ng * L) // L
        s = s.masked_fill(lg[None, :] > lg[:, None], float("-inf"))
    flat = flat + m.g_out(m.merge_heads(s.softmax(-1) @ v))
    z = list(flat.split(L, 1))
    ys = []
    for s_, xg in enumerate(groups):
        lat = z[s_ - 1] if m.causal else z[s_]
        n_g = xg.shape[1]
        kv_in = torch.cat([xg, lat], 1) if (s_ > 0 or not m.causal) else xg
        allowed = None
        if m.causal:
            allowed = torch.ones(n_g, kv_in.shape[1], dtype=torch.bool)
            allowed[:, :n_g] = torch.ones(n_g, n_g, dtype=torch.bool).tril()
        ys.append(attend(xg, kv_in, m.kv_proj, m.q_proj, allowed))
    return m.out_proj(torch.cat(ys, 1))


@DIRECTIONS
def test_fit_is_its_three_steps_written_per_group(causal):
    m = make_mixer("fit", causal, group_size=4, n_latents=2)
    x = torch.randn(2, 13, m.d_model)
    with torch.no_grad():
        want = _fit_by_hand(m, x)
        for form in ("reference", "fast"):
            got, _ = with_form(m, form)(x)
            assert rel_err(want, got) < 1e-5, form


@DIRECTIONS
@pytest.mark.parametrize("group", [1, 4, 11, 16])
def test_fit_without_latents_is_block_local_attention(causal, group):
    """No latents: step 3 alone, i.e. local attention with block = group (softmax when the group covers N)."""
    n = 11
    m = make_mixer("fit", causal, group_size=group, n_latents=0)
    twin = _twin(m, "local", block_size=group) if group < n else _twin(m)
    x = torch.randn(2, n, m.d_model)
    keep = _keep(n, causal)
    for mask in (None, keep):
        want, _ = twin(x, mask=mask)
        for form in ("reference", "fast"):
            got, _ = with_form(m, form)(x, mask=mask)
            assert rel_err(want, got) < 1e-5, (form, mask is not None)


def test_fit_groups_exchange_information_only_through_latents():
    x = torch.randn(1, 12, 32)
    x2 = x.clone()
    x2[:, 8:] += 2.0  # change the last group only
    for latents, crosses in ((2, True), (0, False)):
        m = make_mixer("fit", False, group_size=4, n_latents=latents)
        y1, y2 = m(x)[0], m(x2)[0]
        assert torch.allclose(y1[:, :4], y2[:, :4], atol=1e-6) != crosses, latents


# ---- options -------------------------------------------------------------------------------
@pytest.mark.parametrize("name,options,field", [
    ("etc", {"radius": -1}, "radius"),
    ("etc", {"n_global": 0}, "n_global"),
    ("etc", {"max_distance": 0}, "max_distance"),
    ("etc", {"global_tokens": "given"}, "global_tokens"),
    ("fit", {"group_size": 0}, "group_size"),
    ("fit", {"n_latents": -1}, "n_latents"),
])
def test_bad_options_name_the_field(name, options, field):
    with pytest.raises(ConfigError, match=rf"{name}\.{field}="):
        MIXERS.get(name)(32, 4, causal=False, options=options)
