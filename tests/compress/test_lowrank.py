"""Low-rank factorization: Eckart-Young, exact limits, the activation-weighted optimum, DSFormer's N:M factor,
the model-level swap (save/load/generate), and bad input refused with the model untouched."""

from __future__ import annotations

import json

import pytest
import torch

import efformer
from efformer.compress import FactorizeConfig, LowRankLinear, factorize, quantize
from efformer.compress.api import RTNConfig
from efformer.compress.lowrank import (
    DenseSparseLinear,
    asvd_factors,
    dsformer_factors,
    nm_compress,
    nm_expand,
    svd_factors,
    whitening,
)
from efformer.errors import EfformerError


def tiny(**kw):
    torch.manual_seed(0)
    return efformer.create_model("lm-tiny", d_model=64, n_layers=2, ffn_mult=3.0, **kw)


def calib(n=4, seq=32):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(1))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("shape", [(13, 29), (29, 13), (1, 7), (16, 16)])
def test_truncated_svd_error_is_the_tail_energy(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    for k in sorted({1, min(shape) // 2 or 1, min(shape)}):
        b, a = svd_factors(w, k)
        assert b.shape == (shape[0], k) and a.shape == (k, shape[1])
        err = float(((w - b @ a) ** 2).sum())
        assert err == pytest.approx(float((s[k:] ** 2).sum()), abs=1e-9, rel=1e-9)


def test_a_rank_k_matrix_factors_exactly():
    w = torch.randn(17, 3) @ torch.randn(3, 23)
    b, a = svd_factors(w, 3)
    torch.testing.assert_close(b @ a, w, atol=1e-5, rtol=1e-5)
    lin = torch.nn.Linear(23, 17)
    lin.weight.data.copy_(w)
    low = LowRankLinear(23, 17, 3, bias=True)
    low.first.weight.data.copy_(a)
    low.second.weight.data.copy_(b)
    low.second.bias.data.copy_(lin.bias)
    x = torch.randn(5, 23)
    torch.testing.assert_close(low(x), lin(x), atol=1e-5, rtol=1e-5)


def test_asvd_minimises_the_activation_weighted_error():
    torch.manual_seed(3)
    w = torch.randn(24, 40, dtype=torch.float64)
    x = torch.randn(500, 40, dtype=torch.float64) * torch.logspace(-2, 1, 40, dtype=torch.float64)  # anisotropic
    chol = whitening(x.T @ x, damp=1e-8)
    for k in (2, 8, 16):
        b_s, a_s = svd_factors(w, k)
        b_a, a_a = asvd_factors(w, chol, k)
        err_svd = float(((w - b_s @ a_s) @ x.T).norm())
        err_asvd = float(((w - b_a @ a_a) @ x.T).norm())
        assert err_asvd < 0.9 * err_svd
        # and it is the optimum: the tail of the whitened spectrum (up to the tiny dampening)
        tail = float((torch.linalg.svdvals(w @ chol)[k:] ** 2).sum()) ** 0.5
        assert err_asvd == pytest.approx(tail, rel=1e-5)


def test_nm_compress_round_trips_and_keeps_n_per_group():
    s = torch.randn(12, 9)
    values, index = nm_compress(s, 2, 4)
    assert values.shape == (6, 9) and index.dtype == torch.uint8
    dense = nm_expand(values, index, 2, 4)
    assert ((dense != 0).reshape(3, 4, 9).sum(1) == 2).all()
    kept = dense != 0
    torch.testing.assert_close(dense[kept], s[kept])  # the kept entries are the originals
    assert (s.abs().reshape(3, 4, 9).topk(2, dim=1).values.sum(1) ==
            dense.abs().reshape(3, 4, 9).sum(1)).all()  # ... and they are the two largest of each group


def test_dsformer_factor_is_2_4_sparse_and_improves_with_its_budget():
    torch.manual_seed(0)
    w = torch.randn(24, 40)
    errs = []
    for k in (8, 16, 24):
        d, s = dsformer_factors(w, k)
        assert d.shape == (24, k) and s.shape == (k, 40)
        assert ((s != 0).reshape(k // 4, 4, 40).sum(1) == 2).all()
        errs.append(float((w - d @ s).norm()))
    assert errs[0] > errs[1] > errs[2]
    d1, s1 = dsformer_factors(w, 16, iters=1)
    assert float((w - d @ s).norm()) <= float((w - d1 @ s1).norm()) + 1e-6  # alternating rounds do not hurt
    mod = DenseSparseLinear(40, 24, 16, 2, 4, bias=False)
    mod.values.data, mod.index.data = nm_compress(s1, 2, 4)
    mod.dense.weight.data.copy_(d1)
    x = torch.randn(3, 40)
    torch.testing.assert_close(mod(x), x @ (d1 @ s1).T, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in mod.parameters()) == 24 * 16 + 40 * 16 // 2  # really smaller


@pytest.mark.parametrize("method", ["svd", "asvd", "dsformer"])
def test_factorize_model_meets_the_budget_saves_loads_and_generates(method, tmp_path):
    model = tiny()
    lin_before = {n: m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and "head" not in n}
    ids = calib(2, 16)
    ref = model(ids)
    factorize(model, FactorizeConfig(method=method, params=0.5), calibration=calib() if method == "asvd" else None)
    assert set(model.factorization["modules"]) == set(lin_before)
    kept = sum(p.numel() for n, p in model.named_parameters() if n.startswith("backbone.blocks"))
    norms = sum(p.numel() for n, p in model.named_parameters() if n.startswith("backbone.blocks") and p.dim() == 1)
    assert 0.45 < (kept - norms) / sum(lin_before.values()) <= 0.5
    out = model(ids)
    assert out.shape == ref.shape and not torch.equal(out, ref)
    efformer.save(model, tmp_path / "m")
    section = json.loads((tmp_path / "m" / "config.json").read_text())["factorization"]
    assert section["method"] == method and section["modules"]
    back = efformer.load(tmp_path / "m")
    torch.testing.assert_close(back(ids), out)
    gen = back.generate(ids[:1, :4], max_new_tokens=5)
    assert gen.shape == (1, 9)


@pytest.mark.parametrize("method", ["svd", "dsformer"])
def test_output_error_falls_as_the_budget_grows(method):
    ids = calib(2, 16)
    ref = tiny()(ids).detach()
    errs = []
    for params in (0.2, 0.5, 0.8):
        model = factorize(tiny(), FactorizeConfig(method=method, params=params))
        errs.append(float((model(ids) - ref).detach().norm()))
    assert errs[0] > errs[1] > errs[2]


def test_energy_one_keeps_exact_and_ranks_grow_with_energy():
    model = tiny()
    f = lambda n, m: n.endswith("q_proj")  # noqa: E731
    low, high = tiny(), tiny()
    factorize(low, FactorizeConfig(energy=0.3), filter=f)
    factorize(high, FactorizeConfig(energy=0.6), filter=f)
    for name, spec in low.factorization["modules"].items():
        assert spec["rank"] < high.factorization["modules"][name]["rank"]
    with pytest.raises(EfformerError, match="no selected linear gets smaller"):  # full energy saves nothing
        factorize(model, FactorizeConfig(energy=1.0))


def test_full_rank_factorization_of_a_low_rank_linear_is_exact():
    model = tiny()
    q = model.backbone.blocks[0].mixer.q_proj
    with torch.no_grad():
        q.weight.copy_(torch.randn(64, 5) @ torch.randn(5, 64) / 8)
    ids = calib(2, 16)
    ref = model(ids)
    factorize(model, FactorizeConfig(rank=5), filter=lambda n, m: n == "backbone.blocks.0.mixer.q_proj")
    torch.testing.assert_close(model(ids), ref, atol=1e-5, rtol=1e-4)


def test_factorized_then_quantized_model_loads(tmp_path):
    model = tiny()
    factorize(model, FactorizeConfig(rank=16))
    quantize(model, RTNConfig(bits=8, group_size=-1))
    ids = calib(1, 8)
    out = model(ids)
    efformer.save(model, tmp_path / "fq")
    torch.testing.assert_close(efformer.load(tmp_path / "fq")(ids), out)


def test_factorize_an_imported_hf_model_is_exact_on_low_rank_weights(tmp_path):
    hm = pytest.importorskip("tests.interop.hf_models")
    hf = hm.llama()
    with torch.no_grad():  # rank-4 query projections: a rank-4 factorization must then change nothing
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.copy_(torch.randn(32, 4) @ torch.randn(4, 32) / 4)
    hm.save(hf, tmp_path / "hf")
    ids = torch.randint(1, hm.VOCAB, (2, 7))
    for method, calibration in (("svd", None), ("asvd", torch.randint(1, hm.VOCAB, (4, 16)))):
        work = efformer.interop.from_hf(tmp_path / "hf")
        factorize(work, FactorizeConfig(method=method, rank=4), calibration=calibration,
                  filter=lambda n, m: n.endswith("q_proj"))
        assert len(work.factorization["modules"]) == 2
        torch.testing.assert_close(work(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw,calibration,message", [
    (dict(rank=0), None, "rank"),
    (dict(rank=65), None, "must be in [1, 64]"),
    (dict(energy=0.0), None, "energy"),
    (dict(energy=1.5), None, "energy"),
    (dict(params=0.0), None, "params"),
    (dict(params=1.0), None, "params"),
    (dict(params=1e-4), None, "removing it entirely"),
    (dict(), None, "exactly one of rank, energy or params"),
    (dict(rank=4, energy=0.5), None, "exactly one"),
    (dict(method="asvd", rank=4), None, "asvd needs calibration"),
    (dict(method="asvd", rank=4), torch.zeros(2, 8), "LongTensor"),
    (dict(method="dsformer", rank=6), None, "multiple of m=4"),
    (dict(method="qr", rank=4), None, "method"),
])
def test_bad_input_is_refused_and_the_model_is_untouched(kw, calibration, message):
    model = tiny()
    before = snapshot(model)
    with pytest.raises(EfformerError, match=message.replace("[", r"\[").replace("]", r"\]")):
        factorize(model, FactorizeConfig(**kw), calibration=calibration)
    assert not hasattr(model, "factorization")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_refuses_a_second_factorization_and_an_empty_filter():
    model = tiny()
    with pytest.raises(EfformerError, match="filter"):
        factorize(model, FactorizeConfig(rank=4), filter=lambda n, m: False)
    factorize(model, FactorizeConfig(rank=4))
    with pytest.raises(EfformerError, match="already has factorization"):
        factorize(model, FactorizeConfig(rank=2))
