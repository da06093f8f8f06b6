"""The best merge of a gradient-free search (evolve, m2n2) against evaluations spent, on the full test splits.

    python bench/search_curve.py --pool minilm_frozen_head_lora --method evolve --budgets 50 100 200 --out runs/curve

One search, extended budget by budget through ``resume=last`` (the state of the search is kept between them, so the
curve costs one search plus an evaluation per budget): each point is the exported best merge's normalized test
accuracy and the wall time spent so far. Prints a table and plots ``curve.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT
from quality import run_method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool", default="minilm_frozen_head_lora")
    ap.add_argument("--method", default="evolve", choices=["evolve", "m2n2"])
    ap.add_argument("--budgets", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "search_curve")
    ap.add_argument("extra", nargs="*", help="more key=value overrides")
    a = ap.parse_args()
    points, wall, expert = [], 0.0, {}
    for i, budget in enumerate(sorted(a.budgets)):
        extra = [f"method.evaluations={budget}", "export.task_models=false", *a.extra]
        if i:
            extra += ["resume=last"]
        r = run_method(a.method, a.pool, a.out, None, reference=(i == 0), extra=extra)
        if "error" in r:
            raise SystemExit(f"{a.method} at {budget} evaluations failed: {r['error']}")
        wall += r["wall_s"]
        rows = r["summary"]["rows"]
        expert = expert or rows["expert"]  # the reference rows come with the first run
        row = rows[next(n for n in rows if n.startswith(a.method))]
        norm = sum(row[t] / expert[t] for t in r["summary"]["tasks"]) / len(r["summary"]["tasks"])
        search = json.loads((a.out / "export" / f"{a.method}.json").read_text())
        points.append({"evaluations": budget, "norm": norm, "avg": row["avg"], "wall_s": wall,
                       "search_best": search["best"].get("fitness", search["best"].get("share"))})
        print(f"{a.method} {budget} evaluations: normalized {100 * norm:.1f}, label-free best "
              f"{points[-1]['search_best']:.4f}, {wall:.0f} s so far", flush=True)
    print("\n| evaluations | normalized test accuracy | label-free search objective | wall s (cumulative) |\n|---|---|---|---|")
    for p in points:
        print(f"| {p['evaluations']} | {100 * p['norm']:.1f} | {p['search_best']:.4f} | {p['wall_s']:.0f} |")
    plot(a.out / "curve.png", a.method, points)


def plot(path: Path, method: str, points: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p["evaluations"] for p in points], [100 * p["norm"] for p in points], "o-", label=f"{method}: test")
    ax.set_xlabel("merges evaluated")
    ax.set_ylabel("normalized test accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
