"""The bench: complete and plausible rows, recorded failures, analysis and advice from rows alone."""

from __future__ import annotations

import math

import pytest

from efformer.bench.advise import advise, parse_memory
from efformer.bench.analysis import crossover, estimate, exponents, fit_exponent, fit_power_law, report
from efformer.bench.cells import Cell, run_cell
from efformer.bench.runner import measure_in_worker
from efformer.cli import main
from efformer.errors import ConfigError, UnknownNameError
from efformer.registry import MIXERS
from efformer.results import ResultsStore


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_softmax_flops_match_the_formula(mode):
    b, h, n, d = 2, 4, 96, 64
    row = run_cell(Cell("softmax", mode, n, batch=b, d_model=h * d, n_heads=h, repeat=1), peak_gflops=100.0)
    assert row["status"] == "ok" and row["time_ms"] > 0
    attn = 4 * b * h * n * n * d
    proj = 2 * b * n * (h * d) * (4 * h * d)  # q, k, v and out projections
    # backward: projections twice (input and weight grads); attention 2.5x (scores recomputed, 4 grad matmuls)
    expected = attn + proj if mode == "fwd" else 3 * proj + 3.5 * attn
    assert math.isclose(row["flops"], expected, rel_tol=0.01)
    assert row["gflops"] == pytest.approx(row["flops"] / row["time_ms"] / 1e6)
    assert row["peak_fraction"] == pytest.approx(row["gflops"] / 100.0)


def test_rows_are_complete_and_unsupported_cells_say_why():
    row = run_cell(Cell("softmax", "decode", 32, repeat=1))
    for key in ("mixer", "mode", "seq_len", "batch", "d_model", "n_heads", "dtype", "device", "causal", "status",
                "time_ms", "flops"):
        assert row[key] is not None, key
    assert row["causal"] == 1 and row["flops"] > 0
    bidir_only = [m for m in MIXERS.names() if not MIXERS.get(m).capabilities.causal]
    if bidir_only:
        r = run_cell(Cell(bidir_only[0], "decode", 32))
        assert r["status"] == "unsupported" and "bidirectional only" in r["error"]


def test_quadratic_memory_grows_faster_than_linear_in_fresh_workers():
    # The reference form materialises (batch, heads, N, N) scores; the fused SDPA form keeps O(N).
    # Differences between two lengths cancel the per-process constant (allocator, thread pools).
    heads, (n0, n1) = 8, (1024, 4096)
    growth = {}
    for form in ("reference", "fast"):
        mem = [measure_in_worker(Cell("softmax", "fwdbwd", n, d_model=64, n_heads=heads, options={"form": form},
                                      repeat=1))["peak_mem_mb"] for n in (n0, n1)]
        growth[form] = mem[1] - mem[0]
    one_score_matrix_mb = heads * (n1**2 - n0**2) * 4 / 2**20
    assert growth["reference"] > one_score_matrix_mb
    assert growth["fast"] < growth["reference"] / 10


def test_timeouts_and_out_of_memory_are_recorded_not_raised():
    row = measure_in_worker(Cell("softmax", "fwd", 64, repeat=1), timeout_s=0.01)
    assert row["status"] == "timeout" and row["mixer"] == "softmax"
    row = measure_in_worker(Cell("softmax", "fwdbwd", 4096, d_model=256, n_heads=8, options={"form": "reference"}),
                            mem_cap_gb=1.5)
    assert row["status"] == "oom", row


def test_bad_cells_are_refused_clearly():
    with pytest.raises(ConfigError, match="mode"):
        Cell("softmax", "train", 8)
    with pytest.raises(UnknownNameError, match="did you mean 'softmax'"):
        Cell("sofmax", "fwd", 8)
    with pytest.raises(ConfigError, match="--memory"):
        parse_memory("lots")
    assert parse_memory("8GB") == 8192 and parse_memory("512MB") == 512


def _rows(mixer, k, scale, mem_k=1.0, mode="fwdbwd"):
    return [dict(mixer=mixer, mode=mode, seq_len=n, status="ok", time_ms=scale * n**k, peak_mem_mb=0.01 * n**mem_k,
                 device="cpu:test", batch=1, matmul_peak_gflops=100.0) for n in (256, 512, 1024, 2048)]


def test_exponents_crossovers_and_extrapolation():
    rows = _rows("softmax", 2.0, 1e-4, 2.0) + _rows("linear", 1.0, 0.05)
    ex = exponents(rows, "fwdbwd")
    assert ex["softmax"]["time"].exponent == pytest.approx(2.0) and ex["linear"]["time"].exponent == pytest.approx(1.0)
    assert ex["softmax"]["memory"].exponent == pytest.approx(2.0) and ex["softmax"]["time"].r2 == pytest.approx(1.0)
    # 1e-4 n^2 = 0.05 n at n = 500: between the measured 256 and 512
    soft = [(r["seq_len"], r["time_ms"]) for r in rows if r["mixer"] == "softmax"]
    lin = [(r["seq_len"], r["time_ms"]) for r in rows if r["mixer"] == "linear"]
    assert crossover(soft, lin) == pytest.approx(500, rel=1e-6)
    assert crossover(lin, soft) == 256  # softmax is faster from the first measured length
    assert estimate(soft, 8192)[0] == pytest.approx(1e-4 * 8192**2) and estimate(soft, 8192)[1]
    assert fit_exponent([1], [1]) is None


def test_fits_on_two_lengths_are_refused_and_noisy_fits_flagged():
    # two noisy points always fit exactly: the reruns of the issue gave 5.43, then 0.00
    two = fit_power_law([512, 1024], [1.0, 43.0])
    assert two.exponent is None and not two.ok and two.label() == "n/a: needs ≥ 3 lengths"
    assert fit_exponent([512, 1024], [1.0, 43.0]) is None and estimate([(512, 1.0), (1024, 43.0)], 4096) is None
    zigzag = fit_power_law([256, 512, 1024, 2048], [5.0, 1.0, 6.0, 1.5])  # no trend: R² ~ 0
    assert zigzag.exponent is not None and zigzag.r2 < 0.9 and not zigzag.ok
    assert "poor fit" in zigzag.label() and "poor fit" in zigzag.problem
    assert estimate([(256, 5.0), (512, 1.0), (1024, 6.0), (2048, 1.5)], 8192) is None
    clean = fit_power_law([256, 512, 1024], [1.0, 4.1, 15.9])  # ~N^2 with 3% noise
    assert clean.ok and clean.r2 > 0.99 and clean.label() == f"{clean.exponent:.2f}"
    assert fit_power_law([256, 512, 1024], [3.0, 3.0, 3.0]).label() == "0.00"  # flat is an exact fit


def test_report_marks_insufficient_and_poor_fits(tmp_path):
    rows = _rows("softmax", 2.0, 1e-4, 2.0)
    noisy = [dict(r, mixer="linear", time_ms=t) for r, t in zip(rows, (5.0, 1.0, 6.0, 1.5), strict=True)]
    two = [dict(r, mixer="performer") for r in rows[:2]]
    text = report(rows + noisy + two, tmp_path / "rep").read_text()
    line = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "| 2.00 | 2.00 |" in line["softmax"]
    assert "poor fit, R²" in line["linear"]
    assert "n/a: needs ≥ 3 lengths" in line["performer"]


def test_report_and_plots_come_from_the_store_alone(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    store.add_bench_rows(_rows("softmax", 2.0, 1e-4, 2.0) + _rows("linear", 1.0, 0.05)
                         + [dict(mixer="linear", mode="fwdbwd", seq_len=4096, status="oom", device="cpu:test",
                                 batch=1, error="can't allocate")])
    path = report(store.bench_rows(), tmp_path / "rep")
    text = path.read_text()
    assert "| softmax |" in text and "| linear |" in text and "| 2.00 |" in text and "oom" in text
    assert (tmp_path / "rep" / "scaling_fwdbwd.png").stat().st_size > 5000
    assert "500" in text  # the crossover length


def test_advise_ranks_fitting_mixers_and_explains():
    rows = _rows("softmax", 2.0, 1e-4, 2.0) + _rows(
        next(m for m in MIXERS.names() if m != "softmax") if len(MIXERS.names()) > 1 else "softmax", 1.0, 0.05)
    ranked, left = advise(rows, 16384, memory_mb=parse_memory("8GB"))
    names = [a.mixer for a in ranked]
    if len(MIXERS.names()) > 1:
        assert names[0] != "softmax"
        soft = next((a for a in ranked if a.mixer == "softmax"), None)
        assert soft is None or "extrapolated" in soft.reason
    ranked_small, left_small = advise(rows, 16384, memory_mb=1.0)
    assert "softmax" not in [a.mixer for a in ranked_small]
    assert any(line.startswith("softmax: needs") for line in left_small)


def test_bench_and_advise_commands_end_to_end(tmp_path, capsys):
    db, rep = str(tmp_path / "r.db"), str(tmp_path / "rep")
    assert main(["bench", "--mixers", "softmax", "--lengths", "32", "64", "--modes", "fwdbwd", "--repeat", "1",
                 "--d-model", "32", "--store", db, "--report", rep, "--peers"]) == 0
    out = capsys.readouterr().out
    assert "2/2 cells ok" in out and "peer torch-sdpa: available" in out
    rows = ResultsStore(db).bench_rows()
    assert {r["mixer"] for r in rows} == {"softmax", "peer:torch-sdpa"}
    assert main(["advise", "--seq-len", "64", "--memory", "1GB", "--store", db]) == 0
    assert "1. softmax" in capsys.readouterr().out.replace("  ", " ")
    assert main(["advise", "--seq-len", "128", "--memory", "1GB", "--store", db]) == 0  # two lengths: no fit
    assert "softmax: not extrapolated: time fit needs ≥ 3 lengths" in capsys.readouterr().out


def test_mixers_sized_by_max_len_run_at_any_length_and_errors_keep_their_message(tmp_path):
    sized = [m for m in MIXERS.names() if "max_len" in MIXERS.get(m).Options.model_fields]
    for name in sized[:2]:
        row = run_cell(Cell(name, "fwd", 3000, d_model=32, n_heads=4, repeat=1))
        assert row["status"] == "ok", (name, row)
    store = ResultsStore(tmp_path / "r.db")
    store.add_bench_rows([dict(mixer="softmax", mode="fwd", seq_len=8, batch=1, device="cpu", status="error",
                               error="boom: the reason")])
    assert store.bench_rows()[0]["error"] == "boom: the reason"


def test_causal_advice_uses_only_causally_measured_rows():
    bidir = [dict(r, causal=0) for r in _rows("softmax", 2.0, 1e-4)]
    rows = bidir + [dict(r, causal=1) for r in _rows("softmax", 2.0, 1e-3)]
    ranked, _ = advise(rows, 1024, memory_mb=1e6, causal=True)
    assert ranked and ranked[0].time_ms == pytest.approx(1e-3 * 1024**2)  # causal rows, not the cheaper bidirectional
    ranked, left = advise([dict(r, causal=0) for r in rows], 1024, memory_mb=1e6, causal=True)
    assert not ranked and any("no causal fwdbwd rows" in line for line in left)


def _two_mixers():
    others = [m for m in MIXERS.names() if m != "softmax"]
    return others[0], others[1]


def test_advise_never_extrapolates_absurd_or_untrustworthy_fits():
    a, b = _two_mixers()
    falling = [dict(r, time_ms=100.0 * r["seq_len"] ** -0.86) for r in _rows("softmax", 2.0, 1e-4)]  # the issue's
    two_lengths = _rows(a, 1.0, 0.05)[:2]
    huge_mem = _rows(b, 1.0, 0.05, mem_k=3.5)
    ranked, left = advise(falling + two_lengths + huge_mem, 16384, memory_mb=1e9)
    assert not ranked
    reasons = {line.split(":")[0]: line for line in left}
    assert "not extrapolated" in reasons["softmax"] and "N^-0.86" in reasons["softmax"]
    assert "[0.5, 3]" in reasons["softmax"]
    assert "not extrapolated" in reasons[a] and "needs ≥ 3 lengths" in reasons[a]
    assert "not extrapolated" in reasons[b] and "memory ~ N^3.50" in reasons[b]
    # measured at the asked length: no extrapolation needed, so no fit is needed either
    ranked, _ = advise(two_lengths, 512, memory_mb=1e9)
    assert [x.mixer for x in ranked] == [a] and "measured at N=512" in ranked[0].reason and not ranked[0].extrapolated


def test_extrapolated_rows_say_how_far():
    a, _ = _two_mixers()
    ranked, _ = advise(_rows("softmax", 2.0, 1e-4, 2.0) + _rows(a, 1.0, 0.05), 8192, memory_mb=1e9)
    assert [x.mixer for x in ranked] == [a, "softmax"]  # 0.05 * 8192 = 410 ms < 1e-4 * 8192^2 = 6711 ms
    assert ranked[0].time_ms == pytest.approx(0.05 * 8192) and ranked[1].time_ms == pytest.approx(1e-4 * 8192**2)
    assert all(x.extrapolated and "×4 beyond the longest measured length 2048" in x.reason for x in ranked)
    ranked, _ = advise(_rows(a, 1.0, 0.05), 128, memory_mb=1e9)
    assert "×2 below the shortest measured length 256" in ranked[0].reason
    ranked, _ = advise(_rows(a, 1.0, 0.05), 768, memory_mb=1e9)
    assert "interpolated between the measured lengths 512 and 1024" in ranked[0].reason
