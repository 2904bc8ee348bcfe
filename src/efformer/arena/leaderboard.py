"""The arena leaderboard: a markdown table and an LRA-style bubble plot, made from the store alone.

A `quick` leaderboard is never shown as comparable to the paper: the paper's Table 1 numbers sit in
a separate table, labelled as such.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from efformer.arena.runner import NOT_OFFERED, QUICK_GRID, sequence_mixers, summary_rows
from efformer.arena.tasks import PAPER_TABLE1, RECALL_NAMES, TASK_NAMES, TASKS
from efformer.results import ResultsStore

# efformer mixer -> the row name in the LRA paper's Table 1
PAPER_NAMES = {
    "softmax": "Transformer", "local": "Local Attention", "sparse_transformer": "Sparse Trans.",
    "longformer": "Longformer", "linformer": "Linformer", "reformer": "Reformer", "sinkhorn": "Sinkhorn Trans.",
    "synthesizer_dense": "Synthesizer", "bigbird": "BigBird", "linear": "Linear Trans.", "performer": "Performer",
}


def aggregate(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """(tasks present, per mixer: mean accuracy per task, average, params, steps/s, peak memory, seeds)."""
    tasks = [t for t in (*TASK_NAMES, *RECALL_NAMES) if any(r["task"] == t for r in rows)]
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


def chance_levels(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per task: the majority-class accuracy of its test split, as the cells measured and stored it."""
    per: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r.get("chance") is not None:
            per[r["task"]].append(r["chance"])
    return {t: sum(v) / len(v) for t, v in per.items()}


def _notes(preset: str, rows: list[dict[str, Any]], tasks: list[str]) -> list[str]:
    """What the preset's budget is and what its default grid leaves out, in the leaderboard's words."""
    lines = []
    budgets = [f"{t}: {TASKS[preset][t].optim['steps']} steps at batch {TASKS[preset][t].optim['batch_size']}"
               for t in tasks if preset in TASKS and t in TASKS[preset]]
    ran = sorted({r["steps"] for r in rows if r.get("steps")})
    if budgets:
        lines.append(f"- Budget per cell: {'; '.join(budgets)} (cells here ran {', '.join(map(str, ran))} steps).")
    if preset == "quick":
        others = [m for m in sequence_mixers() if m not in QUICK_GRID]
        present = sorted({r["mixer"] for r in rows} & set(others))
        lines.append(f"- The default quick grid runs a fixed set of {len(QUICK_GRID)} mixers (the LRA paper's and one "
                     "or more per later family; see `efformer.arena.runner.QUICK_GRID`), so `make demo` fits in about "
                     f"10 minutes on 2 cores; it leaves out {len(others)} others. Run them with `efformer arena "
                     "--mixers NAME ...` or `--mixers all`"
                     + (f"; rows here for {', '.join(present)} come from such runs." if present
                        else "; none of them has been run here."))
    for (p, t), why in NOT_OFFERED.items():
        if p == preset:
            lines.append(f"- `{t}` is not offered under `{preset}`: {why}.")
    lines.append("- *chance* is the majority-class accuracy of each task's test split, computed from the data.")
    return ["Notes:", "", *lines, ""]


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
        chance = chance_levels(rows)
        ch = [f"{100 * chance[k]:.1f}" if k in chance else "—" for k in tasks]
        ch_avg = f"{100 * sum(chance[k] for k in tasks) / len(tasks):.1f}" if all(k in chance for k in tasks) else "—"
        lines.append("| *chance (majority class)* | " + " | ".join([*ch, ch_avg, "", "", "", "", preset]) + " |")
        order = sorted(table, key=lambda m: -(table[m]["avg"] if table[m]["avg"] is not None else -1))
        for m in order:
            t = table[m]
            cells = [f"{100 * t['tasks'][k]:.1f}" if k in t["tasks"] else "—" for k in tasks]
            avg = "—" if t["avg"] is None else f"{100 * t['avg']:.1f}"
            lines.append("| " + " | ".join([m, *cells, avg, _fmt(t["params"], "{:,.0f}"),
                                            _fmt(t["steps_per_s"], "{:.2f}"), _fmt(t["peak_mem_mb"], "{:.0f}"),
                                            str(t["seeds"]), preset]) + " |")
        avg_chance = sum(chance[k] for k in tasks) / len(tasks) if all(k in chance for k in tasks) else None
        lines += _recall_baselines(rows)
        lines += ["", f"![bubble plot]({plot(table, preset, out / 'leaderboard.png', avg_chance).name})", ""]
        lines += _notes(preset, rows, tasks)
        lines += _paper_table(table, tasks, preset)
    path = out / "leaderboard.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _recall_baselines(rows: list[dict[str, Any]]) -> list[str]:
    """MQAR-style tasks: the accuracy reached without recall (all queries, first query) beside each mixer's."""
    got = [r for r in rows if r.get("baseline") is not None and r.get("first_query") is not None]
    if not got:
        return []
    lines = ["", "Recall tasks against the no-recall baseline (guessing among the context's unanswered values), "
             "test accuracy % over all queries / on each example's first query:", "",
             "| task | mixer | all queries | first query | no-recall all | no-recall first |", "|" + "---|" * 6]
    for r in sorted(got, key=lambda r: (r["task"], -r["accuracy"], r["mixer"], r["seed"])):
        cells = [r["accuracy"], r["first_query"], r["baseline"], r["first_query_baseline"]]
        lines.append(f"| {r['task']} | {r['mixer']} (seed {r['seed']}) | " + " | ".join(f"{100 * c:.1f}" for c in cells)
                     + " |")
    return lines


def _fmt(v, spec: str) -> str:
    return "—" if v is None else spec.format(v)


def _paper_table(table: dict, tasks: list[str], preset: str) -> list[str]:
    shown = [m for m in table if m in PAPER_NAMES]
    tasks = [t for t in tasks if t in TASK_NAMES]  # the paper has no recall tasks
    if not shown or not tasks:
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


def plot(table: dict[str, dict[str, Any]], preset: str, path: str | Path, chance: float | None = None) -> Path:
    """LRA-style bubble plot: x = training steps/s, y = average accuracy, bubble area = peak memory.

    ``chance`` (a fraction) draws the chance level; labels are placed so that none overlaps another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(m, t) for m, t in table.items() if t["avg"] is not None and t["steps_per_s"]]
    fig, ax = plt.subplots(figsize=(11, 7))
    if pts:
        mem = [t["peak_mem_mb"] or 1.0 for _, t in pts]
        top = max(mem)
        for (_, t), mm in zip(pts, mem, strict=True):
            ax.scatter(t["steps_per_s"], 100 * t["avg"], s=60 + 1200 * mm / top, alpha=0.4)
        ax.set_xscale("log")
        xs = [t["steps_per_s"] for _, t in pts]
        ys = [100 * t["avg"] for _, t in pts] + ([100 * chance] if chance is not None else [])
        ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
        pad = max(2.0, 0.25 * (max(ys) - min(ys)))
        ax.set_ylim(min(ys) - pad, max(ys) + pad)
    if chance is not None:
        ax.axhline(100 * chance, color="gray", ls="--", lw=1)
        ax.annotate(f"chance (majority class) {100 * chance:.1f}%", (0.01, 100 * chance), xycoords=("axes fraction",
                    "data"), xytext=(0, 3), textcoords="offset points", fontsize=8, color="gray")
    ax.set_xlabel("training speed (steps/s, log scale)")
    ax.set_ylabel("average test accuracy (%)")
    ax.set_title(f"efformer arena ({preset}): speed vs accuracy, bubble area = peak memory")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    if pts:
        _place_labels(fig, ax, [(m, t["steps_per_s"], 100 * t["avg"]) for m, t in pts])
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _place_labels(fig, ax, points: list[tuple[str, float, float]]) -> list[tuple[float, ...]]:
    """Label each point at the nearest free spot around it (a leader line when moved); returns the label boxes.

    Greedy in display pixels: crowded points (many mixers share the chance-level accuracy) get their labels
    pushed outwards along a spiral of candidate offsets until the text box is free."""
    import math as _m

    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed = []  # display-space boxes (x0, y0, x1, y1) of labels already drawn
    anchors = [ax.transData.transform((x, y)) for _, x, y in points]
    order = sorted(range(len(points)), key=lambda i: (anchors[i][1], anchors[i][0]))
    for i in order:
        name = points[i][0]
        ax_px, ay_px = anchors[i]
        probe = fig.text(0.5, 0.5, name, fontsize=8)  # figure coordinates: valid on any axis scale
        box = probe.get_window_extent(renderer)
        probe.remove()
        w, h = box.width + 4, box.height + 2
        best = None
        for r in range(0, 400, 6):
            for k in range(16 if r else 1):
                a = 2 * _m.pi * k / 16
                cx, cy = ax_px + r * _m.cos(a), ay_px + r * _m.sin(a)
                cand = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
                inside = (cand[0] >= frame.x0 and cand[2] <= frame.x1 and cand[1] >= frame.y0 and cand[3] <= frame.y1)
                if inside and not any(_overlap(cand, b) for b in placed):
                    best = (cx, cy, cand)
                    break
            if best:
                break
        if best is None:  # no free spot in reach: put it on the point rather than drop it
            best = (ax_px, ay_px, (ax_px - w / 2, ay_px - h / 2, ax_px + w / 2, ay_px + h / 2))
        cx, cy, cand = best
        placed.append(cand)
        moved = _m.hypot(cx - ax_px, cy - ay_px) > 8
        pt = 72 / fig.dpi  # offsets in points, so they scale with the text when saved at another dpi
        ax.annotate(name, (points[i][1], points[i][2]), xytext=((cx - ax_px) * pt, (cy - ay_px) * pt),
                    textcoords="offset points",
                    fontsize=8, ha="center", va="center",
                    arrowprops={"arrowstyle": "-", "color": "gray", "lw": 0.6} if moved else None)
    return placed


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
