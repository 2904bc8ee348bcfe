"""Reports from the results store alone: run tables, run comparisons (config differences and final
metrics) and a markdown report with PNG plots (train loss and eval metrics against the step)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from efformer.errors import ConfigError
from efformer.results import ResultsStore


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    cells = [[_fmt(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/")


def series(store: ResultsStore, run_id: str, name: str) -> list[tuple[int, float]]:
    """(step, value) of one metric in step order; a step logged twice (a resumed run) keeps its last value."""
    latest: dict[int, tuple[float, float]] = {}
    for r in store.metrics(run_id, name):
        if r["step"] not in latest or r["time"] >= latest[r["step"]][0]:
            latest[r["step"]] = (r["time"], r["value"])
    return [(s, latest[s][1]) for s in sorted(latest)]


def metric_names(store: ResultsStore, run_id: str) -> list[str]:
    """Names of the metrics a run logged."""
    return [r["name"] for r in store.query("SELECT DISTINCT name FROM metrics WHERE run_id=? ORDER BY name", (run_id,))]


def get_run(store: ResultsStore, run_id: str) -> dict[str, Any]:
    """The run row of ``run_id`` (a unique prefix works too)."""
    rows = store.query("SELECT * FROM runs WHERE run_id LIKE ? ORDER BY started", (run_id + "%",))
    exact = [r for r in rows if r["run_id"] == run_id]
    if exact:
        return exact[0]
    if len(rows) != 1:
        known = ", ".join(r["run_id"] for r in store.runs()[:10])
        what = "matches several runs" if rows else "is not in the results store"
        raise ConfigError("run_id", run_id, f"{what}; known runs: {known or 'none'}")
    return rows[0]


def final_evals(store: ResultsStore, run_id: str) -> dict[str, float]:
    """The last logged value of each evaluation metric of a run."""
    out: dict[str, float] = {}
    for r in store.evals(run_id):  # oldest first, so later rows win
        out[f"{r['split']}_{r['metric']}"] = r["value"]
    return out


def runs_table(store: ResultsStore, kind: str | None = None) -> str:
    """A markdown table of runs: id, status, device, last step, final loss, main eval metrics."""
    rows = []
    for r in store.runs(kind):
        loss = series(store, r["run_id"], "loss")
        ev = final_evals(store, r["run_id"])
        rows.append([r["run_id"], r["kind"], r["status"], r["device"], loss[-1][0] if loss else None,
                     loss[-1][1] if loss else None, ev.get("eval_loss"), ev.get("eval_accuracy"),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started"]))])
    return markdown_table(["run", "kind", "status", "device", "step", "loss", "eval loss", "eval acc", "started"],
                          rows)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def show_run(store: ResultsStore, run_id: str) -> str:
    """A markdown description of one run: identity, config, final metrics."""
    r = get_run(store, run_id)
    lines = [f"# run {r['run_id']}", "", markdown_table(["field", "value"], [
        [k, r[k]] for k in ("kind", "name", "status", "code_version", "machine", "device")])]
    ev = final_evals(store, r["run_id"])
    metrics = {n: series(store, r["run_id"], n)[-1] for n in metric_names(store, r["run_id"])}
    lines += ["", "## final metrics", "", markdown_table(["metric", "step", "value"],
              [[n, s, v] for n, (s, v) in metrics.items()] + [[k, "-", v] for k, v in ev.items()])]
    config = _flatten(json.loads(r["config"]))
    lines += ["", "## config", "", markdown_table(["key", "value"], sorted(config.items()))]
    return "\n".join(lines)


def compare_runs(store: ResultsStore, run_ids: list[str]) -> str:
    """A markdown comparison: config keys that differ, then final train/eval metrics side by side."""
    runs = [get_run(store, rid) for rid in run_ids]
    configs = [_flatten(json.loads(r["config"])) for r in runs]
    keys = sorted({k for c in configs for k in c})
    differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    ids = [r["run_id"] for r in runs]
    parts = ["## config differences", "",
             markdown_table(["key", *ids], [[k, *[c.get(k) for c in configs]] for k in differ])
             if differ else "(identical configs)"]
    finals = [{**{n: series(store, i, n)[-1][1] for n in metric_names(store, i)}, **final_evals(store, i)}
              for i in ids]
    names = sorted({n for f in finals for n in f})
    parts += ["", "## final metrics", "", markdown_table(["metric", *ids], [[n, *[f.get(n) for f in finals]]
                                                                           for n in names])]
    return "\n".join(parts)


def _plot(store: ResultsStore, run_ids: list[str], name: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for rid in run_ids:
        pts = series(store, rid, name)
        if pts:
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="." if len(pts) < 30 else None, label=rid)
            drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(f"{name} vs step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    plt.close(fig)
    return drawn


def write_report(store: ResultsStore, out_dir: str | os.PathLike, run_ids: list[str] | None = None) -> Path:
    """Write ``report.md`` and PNG plots (loss and each eval metric vs step) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = [get_run(store, r)["run_id"] for r in run_ids] if run_ids else [r["run_id"] for r in store.runs()]
    lines = ["# efformer report", "", f"results: `{store.path}`, {len(ids)} runs", "", "## runs", "",
             runs_table(store) if not run_ids else compare_runs(store, ids)]
    names = sorted({n for rid in ids for n in metric_names(store, rid)} - {"tokens_per_s"})
    plots = []
    for name in ["loss"] + [n for n in names if n != "loss"]:
        if _plot(store, ids, name, out / f"{name}.png"):
            plots.append(name)
    if plots:
        lines += ["", "## curves", ""] + [f"![{n}]({n}.png)" for n in plots]
    report = out / "report.md"
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, report)
    return report
