"""The arena leaderboard: a markdown table and an LRA-style bubble plot, made from the store alone.

A `quick` leaderboard is never shown as comparable to the paper: the paper's Table 1 numbers sit in
a separate table, labelled as such.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from efformer.arena.runner import summary_rows
from efformer.arena.tasks import PAPER_TABLE1, TASK_NAMES
from efformer.results import ResultsStore

# efformer mixer -> the row name in the LRA paper's Table 1
PAPER_NAMES = {
    "softmax": "Transformer", "local": "Local Attention", "sparse_transformer": "Sparse Trans.",
    "longformer": "Longformer", "linformer": "Linformer", "reformer": "Reformer", "sinkhorn": "Sinkhorn Trans.",
    "synthesizer_dense": "Synthesizer", "bigbird": "BigBird", "linear": "Linear Trans.", "performer": "Performer",
}


def aggregate(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """(tasks present, per mixer: mean accuracy per task, average, params, steps/s, peak memory, seeds)."""
    tasks = [t for t in TASK_NAMES if any(r["task"] == t for r in rows)]
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    cost: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        acc[r["mixer"]][r["task"]].append(r["accuracy"])
        for k in ("params", "steps_per_s", "peak_mem_mb"):
            if r.get(k) is not None:
                cost[r["mixer"]][k].append(r[k])
    table = {}
    for mixer, per_task in acc.items():
        means = {t: sum(v) / len(v) for t, v in per_task.items()}
        complete = all(t in means for t in tasks)
        table[mixer] = {
            "tasks": means,
            "avg": sum(means.values()) / len(means) if complete else None,
            "params": max(cost[mixer]["params"]) if cost[mixer]["params"] else None,
            "steps_per_s": _mean(cost[mixer]["steps_per_s"]),
            "peak_mem_mb": max(cost[mixer]["peak_mem_mb"]) if cost[mixer]["peak_mem_mb"] else None,
            "seeds": max(len(v) for v in per_task.values()),
        }
    return tasks, table


def _mean(v: list[float]) -> float | None:
    return sum(v) / len(v) if v else None


def render(store: ResultsStore, preset: str, out_dir: str | Path) -> Path:
    """Write leaderboard.md and leaderboard.png for ``preset`` into ``out_dir``; returns the .md path."""
    rows = summary_rows(store, preset)
    tasks, table = aggregate(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# efformer arena leaderboard — preset `{preset}`", ""]
    if preset != "paper":
        lines += [f"Preset `{preset}` uses reduced lengths and sizes (see `efformer.arena.tasks`); its numbers are "
                  "**not comparable** to the LRA paper's.", ""]
    if not rows:
        lines += ["No finished arena cells for this preset yet: run `efformer arena`.", ""]
    else:
        lines += ["Test accuracy (%), mean over seeds; avg over the tasks shown; steps/s averaged over tasks; "
                  "peak memory is the largest over tasks (RSS growth during training on CPU).", ""]
        head = ["mixer", *tasks, "avg", "params", "steps/s", "peak MB", "seeds", "preset"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        order = sorted(table, key=lambda m: -(table[m]["avg"] if table[m]["avg"] is not None else -1))
        for m in order:
            t = table[m]
            cells = [f"{100 * t['tasks'][k]:.1f}" if k in t["tasks"] else "—" for k in tasks]
            avg = "—" if t["avg"] is None else f"{100 * t['avg']:.1f}"
            lines.append("| " + " | ".join([m, *cells, avg, _fmt(t["params"], "{:,.0f}"),
                                            _fmt(t["steps_per_s"], "{:.2f}"), _fmt(t["peak_mem_mb"], "{:.0f}"),
                                            str(t["seeds"]), preset]) + " |")
        lines += ["", f"![bubble plot]({plot(table, preset, out / 'leaderboard.png').name})", ""]
        lines += _paper_table(table, tasks, preset)
    path = out / "leaderboard.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _fmt(v, spec: str) -> str:
    return "—" if v is None else spec.format(v)


def _paper_table(table: dict, tasks: list[str], preset: str) -> list[str]:
    shown = [m for m in table if m in PAPER_NAMES]
    if not shown:
        return []
    lines = ["## Beside the LRA paper (Table 1, test accuracy %)", "",
             f"Ours = preset `{preset}`" + ("" if preset == "paper" else ", not comparable to the paper's setup") + ".",
             "", "| mixer | paper name | " + " | ".join(f"{t} ours / paper" for t in tasks) + " | paper avg |",
             "|" + "---|" * (len(tasks) + 3)]
    for m in sorted(shown):
        paper = PAPER_TABLE1[PAPER_NAMES[m]]
        cells = []
        for t in tasks:
            ours = f"{100 * table[m]['tasks'][t]:.1f}" if t in table[m]["tasks"] else "—"
            p = paper.get(t)
            cells.append(f"{ours} / {'FAIL' if p is None else f'{p:.2f}'}")
        lines.append(f"| {m} | {PAPER_NAMES[m]} | " + " | ".join(cells) + f" | {paper['avg']:.2f} |")
    return lines + [""]


def plot(table: dict[str, dict[str, Any]], preset: str, path: str | Path) -> Path:
    """LRA-style bubble plot: x = training steps/s, y = average accuracy, bubble area = peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(m, t) for m, t in table.items() if t["avg"] is not None and t["steps_per_s"]]
    fig, ax = plt.subplots(figsize=(9, 6))
    if pts:
        mem = [t["peak_mem_mb"] or 1.0 for _, t in pts]
        top = max(mem)
        for (m, t), mm in zip(pts, mem, strict=True):
            ax.scatter(t["steps_per_s"], 100 * t["avg"], s=80 + 1500 * mm / top, alpha=0.45)
            ax.annotate(m, (t["steps_per_s"], 100 * t["avg"]), fontsize=8, ha="center", va="center")
        ax.set_xscale("log")
    ax.set_xlabel("training speed (steps/s, log scale)")
    ax.set_ylabel("average test accuracy (%)")
    ax.set_title(f"efformer arena ({preset}): speed vs accuracy, bubble area = peak memory")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
