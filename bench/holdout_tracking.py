"""Does the label-free held-out objective track test accuracy? Rank correlation over one run's checkpoints.

    python bench/holdout_tracking.py RUN [RUN ...] [--write bench/RESULTS.md]

RUN: a train.py out_dir of a learned method trained with held-out texts (``data.holdout_fraction`` > 0,
so its CSV log has ``holdout_objective`` at step 0 and every ``checkpoint.every_n_steps``) and its step
checkpoints kept (``checkpoints/step*.ckpt``). The method is rebuilt from the run's ``.hydra/config.yaml``;
the start and every checkpoint are evaluated on the full test splits (normalized by each task's expert,
from the run's ``eval.json``), and the held-out objective (lower is better) is set against that accuracy:
Spearman's ρ of (−objective, accuracy) — 1 means the objective orders the merges exactly as the labels do.
Also printed: the label-free choice (lowest objective) against the best merge by test accuracy. A plot of
both curves goes to RUN/holdout_tracking.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import ROOT
from omegaconf import OmegaConf


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic) if len(x) > 2 else float("nan")


def expert_row(run: Path) -> dict[str, float]:
    """Each expert's test accuracy: from the run's eval.json, or from a sibling run's (bench/quality.py evaluates
    the reference rows once per output folder, in its first method's run)."""
    for ev in [run / "eval.json", *sorted(run.parent.glob("*/eval.json"))]:
        rows = json.loads(ev.read_text())["rows"] if ev.exists() else {}
        if "expert" in rows:
            return rows["expert"]
    raise SystemExit(f"{run}: no expert row in its eval.json nor in a sibling run's")


def rebuilt(run: Path):
    """The run's pool and method, built as train.py builds them (start_from inlined)."""
    from adamerge.run.program import build_pool_and_method

    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    start = cfg.method.get("start_from")
    if isinstance(start, str):
        cfg.method.start_from = OmegaConf.load(ROOT / "configs" / "method" / f"{start}.yaml")
    c = OmegaConf.to_container(cfg, resolve=True)
    return c, *build_pool_and_method(c, trains=True)


def track(run: Path) -> dict:
    from adamerge.evaluate import load_test_sets, merge_accuracies
    from adamerge.run.states import merged_now

    c, pool, method = rebuilt(run)
    held = {}
    for f in sorted((run / "logs").glob("*/metrics.csv")):
        import csv

        with f.open() as fh:
            held.update({int(r["step"]): float(r["holdout_objective"]) for r in csv.DictReader(fh)
                         if r.get("holdout_objective")})
    expert = expert_row(run)
    tests = load_test_sets(pool, pool.tokenizer(), c["data"]["max_length"])
    states = {0: None} | {int(p.stem[4:]): p for p in sorted((run / "checkpoints").glob("step*.ckpt"))}
    points = []
    for step, path in states.items():
        if step not in held:
            continue
        if path is not None:
            method.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
        accs = merge_accuracies(pool, merged_now(method), tests, c["evaluate"]["batch_size"])
        norm = sum(accs[t] / expert[t] for t in accs) / len(accs)
        points.append({"step": step, "holdout_objective": held[step], "test_norm": norm})
        print(f"{run.name} step {step:5d}: held-out objective {held[step]:.5f}, test normalized {100 * norm:.2f}",
              flush=True)
    rho = spearman([-p["holdout_objective"] for p in points], [p["test_norm"] for p in points])
    chosen = min(points, key=lambda p: (p["holdout_objective"], -p["step"]))
    best = max(points, key=lambda p: p["test_norm"])
    out = {"run": str(run), "method": c["method"]["id"], "spearman": rho, "points": points,
           "chosen_by_holdout": chosen, "best_by_test": best}
    (run / "holdout_tracking.json").write_text(json.dumps(out, indent=2))
    plot(out, run / "holdout_tracking.png")
    return out


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in out["points"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [100 * p["test_norm"] for p in out["points"]], "o-", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy, normalized (%)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [p["holdout_objective"] for p in out["points"]], "s--", color="tab:red")
    ax2.set_ylabel("held-out objective (lower is better)", color="tab:red")
    ax.set_title(f"{out['method']}: Spearman ρ = {out['spearman']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--write", type=Path, default=None, help="append the table to this markdown file")
    a = ap.parse_args(argv)
    lines = ["| run | method | checkpoints | Spearman ρ (−objective, test) | chosen by held-out: step, test norm | "
             "best by test: step, test norm | start test norm |", "|---|---|---|---|---|---|---|"]
    for run in a.runs:
        o = track(run)
        ch, be, st = o["chosen_by_holdout"], o["best_by_test"], o["points"][0]
        lines.append(f"| {run.name} | {o['method']} | {len(o['points'])} | {o['spearman']:.2f} | "
                     f"{ch['step']}, {100 * ch['test_norm']:.2f} | {be['step']}, {100 * be['test_norm']:.2f} | "
                     f"{100 * st['test_norm']:.2f} |")
    text = "\n".join(lines)
    print("\n" + text)
    if a.write:
        with a.write.open("a") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
