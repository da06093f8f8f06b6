"""Learned merges with little calibration data, on the benchmark tasks and on the confirmation set: one table.

    python bench/generalisation.py RUNS_DIR [--write bench/RESULTS.md] [--plot curve.png]

RUNS_DIR holds one folder per ``bench/quality.py --out`` (e.g. ``bench_lora_100``: a pool at 100 calibration
texts per task), each with a folder per method (``train.py`` out_dirs). Per learned run the table gives its
start (the row ``start: …``: task arithmetic for AdaMerging, RegMean++ for distill merging), the exported
merge and which of start / best checkpoint / end was exported (``selection.json``), the difference to the
start, the share of the gap between task arithmetic (λ 0.3, an AdaMerging run's start row in the same
folder) and the experts that the merge closes, and the held-out
objective's rank correlation with test accuracy when ``bench/holdout_tracking.py`` was run on it. Closed-form
runs (RegMean++) are rows of their own. ``--plot``: normalized accuracy against calibration size, one line per
(pool, method), the start dashed.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def rows_of(group: Path) -> list[dict]:
    """One dict per method run of a quality.py output folder (normalized by the expert row of the run that
    evaluated the reference rows, as quality.py does)."""
    m = re.fullmatch(r"(.*)_(\d+)", group.name)
    pool, size = (m.group(1), int(m.group(2))) if m else (group.name, None)
    runs = {run: json.loads((run / "eval.json").read_text())
            for run in sorted(p for p in group.iterdir() if (p / "eval.json").exists())}
    expert = next((e["rows"]["expert"] for e in runs.values() if "expert" in e["rows"]), None)

    def norm(row: dict) -> float | None:
        if "norm" in row:
            return row["norm"]
        tasks = [t for t in row if t not in ("avg", "norm")]
        return sum(row[t] / expert[t] for t in tasks) / len(tasks) if expert else None

    # task arithmetic's normalized accuracy: the start row of an AdaMerging run of this group, if any
    ta = next((norm(r) for e in runs.values() for n, r in e["rows"].items()
               if n.startswith("start: task_arithmetic")), None)
    out = []
    for run, ev in runs.items():
        rows = ev["rows"]
        own = next((n for n in rows if n.startswith(run.name)), None)
        if own is None:
            continue
        start = next((n for n in rows if n.startswith("start:")), None)
        sel_path = run / "export" / "selection.json"
        sel = json.loads(sel_path.read_text()) if sel_path.exists() else {}
        track_path = run / "holdout_tracking.json"
        track = json.loads(track_path.read_text()) if track_path.exists() else {}
        out.append({"pool": pool, "size": size, "method": run.name, "norm": norm(rows[own]),
                    "start": start, "start_norm": norm(rows[start]) if start else None,
                    "exported": sel.get("exported"), "spearman": track.get("spearman"), "ta": ta,
                    "best_by_test": (track.get("best_by_test") or {}).get("test_norm")})
    return out


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| pool | texts/task | method | start | start norm | exported norm | exported | Δ vs start | "
             "gap to the experts closed vs task arithmetic | ρ held-out vs test | best checkpoint by test |",
             "|---" * 11 + "|"]
    for r in rows:
        start, s0, norm = (r["start"] or "–").removeprefix("start: "), r["start_norm"], r["norm"]
        delta = "–" if s0 is None else f"{100 * (norm - s0):+.2f}"
        ta = r["ta"]
        gap = f"{100 * (norm - ta) / (1 - ta):.0f}%" if ta is not None and ta < 1 else "–"
        rho = "–" if r["spearman"] is None else f"{r['spearman']:.2f}"
        lines.append(f"| {r['pool']} | {r['size'] or 'all'} | {r['method']} | {start} | {pct(s0)} | {pct(norm)} | "
                     f"{r['exported'] or '–'} | {delta} | {gap} | {rho} | {pct(r['best_by_test'])} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    lines: dict[tuple[str, str], list[tuple[int, float, float | None]]] = {}
    for r in rows:
        if r["size"] is not None:
            lines.setdefault((r["pool"], r["method"]), []).append((r["size"], r["norm"], r["start_norm"]))
    for (pool, method), pts in sorted(lines.items()):
        pts.sort()
        (line,) = ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=f"{pool}: {method}")
        if all(p[2] is not None for p in pts):
            ax.plot([p[0] for p in pts], [100 * p[2] for p in pts], "--", color=line.get_color(), alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("calibration texts per task")
    ax.set_ylabel("normalized accuracy (%)")
    ax.set_title("exported merge (solid) and its start (dashed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path)
    ap.add_argument("--write", type=Path, default=None, help="append the table to this markdown file")
    ap.add_argument("--plot", type=Path, default=None)
    a = ap.parse_args(argv)
    rows = [r for group in sorted(p for p in a.runs.iterdir() if p.is_dir()) for r in rows_of(group)]
    text = table(rows)
    print(text)
    if a.write:
        with a.write.open("a") as f:
            f.write("\n" + text + "\n")
    if a.plot:
        plot(rows, a.plot)


if __name__ == "__main__":
    main()
