"""MAP's front against the task-arithmetic λ sweep, measured on the full test splits through train.py.

    python bench/map_front.py --pool minilm_frozen_head_lora --out runs/map_front_fh

1. ``method=map`` (label-free agreement where the pool has no validation files) writes export/pareto/front.json.
2. Task arithmetic at λ = 0.1 … 1.0 (``--lambdas``) (``method=task_arithmetic method.scale=λ``).
3. Front points: the uniform preference's (MAP's export) and those ``--preferences`` seeded random preferences pick,
   each measured as ``method=task_arithmetic method.scale=[c_1, …, c_K]``.
Prints, per pool: every point's per-task test accuracy, whether any λ point is strictly better on every task than
the measured front point nearest to it, the uniform-preference merge's mean against the best λ's, and the
surrogates' R² on their check points; plots each pair of tasks (``front_vs_lambda.png``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import ROOT
from quality import run_method


def accuracies(r: dict, tasks: list[str]) -> list[float]:
    row = r["summary"]["rows"][next(n for n in r["summary"]["rows"] if n not in ("pretrained", "expert"))]
    return [row[t] for t in tasks]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool", default="minilm_frozen_head_lora")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "map_front")
    ap.add_argument("--preferences", type=int, default=10, help="random preferences whose front points are measured")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[round(0.1 * i, 1) for i in range(1, 11)],
                    help="task arithmetic's λ sweep")
    ap.add_argument("extra", nargs="*", help="more key=value overrides for the map run")
    a = ap.parse_args()
    quiet = ["export.task_models=false"]
    mapped = run_method("map", a.pool, a.out / "map", None, reference=True, extra=[*quiet, *a.extra])
    if "error" in mapped:
        raise SystemExit(f"map failed: {mapped['error']}")
    tasks = mapped["summary"]["tasks"]
    expert = mapped["summary"]["rows"]["expert"]
    front = json.loads((a.out / "map" / "export" / "pareto" / "front.json").read_text())
    points = {"map (uniform preference)": (front["chosen"]["coefficients"], accuracies(mapped, tasks))}
    predicted = torch.tensor(front["front"]["predicted"], dtype=torch.float64)
    coefficients = front["front"]["coefficients"]
    g = torch.Generator().manual_seed(0)
    from adamerge.core.pareto import choose

    picked: set[int] = set()
    for _ in range(a.preferences):
        w = -torch.rand(len(tasks), generator=g, dtype=torch.float64).log()  # uniform on the simplex, normalized
        picked.add(choose(predicted, w / w.sum()))
    for i in sorted(picked):
        c = coefficients[i]
        r = run_method("task_arithmetic", a.pool, a.out / f"front_{i}", None, reference=False,
                       extra=[*quiet, "method.scale=[" + ",".join(f"{v:.6f}" for v in c) + "]"])
        points[f"front point {i}"] = (c, accuracies(r, tasks))
        print(f"front point {i}: c={[round(v, 3) for v in c]} -> {[round(100 * v, 1) for v in points[f'front point {i}'][1]]}",
              flush=True)
    sweep = {}
    for lam in a.lambdas:
        r = run_method("task_arithmetic", a.pool, a.out / f"lambda_{lam}", None, reference=False,
                       extra=[*quiet, f"method.scale={lam}"])
        sweep[lam] = accuracies(r, tasks)
        print(f"λ {lam}: {[round(100 * v, 1) for v in sweep[lam]]}", flush=True)
    front_acc = torch.tensor([acc for _, acc in points.values()])
    dominated = []
    for lam, acc in sweep.items():
        nearest = int((front_acc - torch.tensor(acc)).norm(dim=1).argmin())
        if all(x > y for x, y in zip(acc, front_acc[nearest].tolist())):
            dominated.append((lam, list(points)[nearest]))
    norm = lambda acc: sum(a / expert[t] for a, t in zip(acc, tasks)) / len(tasks)  # noqa: E731
    best_lam = max(sweep, key=lambda lam: norm(sweep[lam]))
    lines = ["| point | coefficients | " + " | ".join(tasks) + " | norm |", "|---" * (len(tasks) + 3) + "|"]
    for name, (c, acc) in [*points.items(), *((f"task arithmetic λ {lam}", ([lam] * len(tasks), acc))
                                              for lam, acc in sweep.items())]:
        lines.append(f"| {name} | {', '.join(f'{v:.2f}' for v in c)} | " + " | ".join(f"{100 * v:.1f}" for v in acc)
                     + f" | {100 * norm(acc):.1f} |")
    print("\n".join(lines))
    print(f"\nλ points strictly better on every task than their nearest measured front point: {dominated or 'none'}")
    print(f"uniform preference's merge: {100 * norm(points['map (uniform preference)'][1]):.1f} normalized; best λ "
          f"({best_lam}): {100 * norm(sweep[best_lam]):.1f}")
    print(f"metric: {front['metric']}; surrogate R² on {len(front['samples']['measured']) - front['samples']['fitted_on']} "
          f"check points: " + ", ".join(f"{t} {v:.2f}" for t, v in front["r2_on_check_points"].items()))
    plot(a.out / "front_vs_lambda.png", tasks, points, sweep)


def plot(path: Path, tasks: list[str], points: dict, sweep: dict) -> None:
    from adamerge.core.pareto import pair_grid

    lam, acc = list(sweep.values()), [a for _, a in points.values()]

    def draw(ax, i: int, j: int) -> None:
        ax.plot([100 * a[i] for a in lam], [100 * a[j] for a in lam], "o-", c="0.5", ms=3, label="task arithmetic λ")
        ax.scatter([100 * a[i] for a in acc], [100 * a[j] for a in acc], c="tab:blue", s=14, label="MAP front (measured)")
        ax.scatter([100 * acc[0][i]], [100 * acc[0][j]], c="tab:red", marker="*", s=70, label="uniform preference")

    pair_grid(path, tasks, draw)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
