"""Is merge A better than merge B, or is the difference the test sets' noise? A paired comparison.

    python bench/paired.py RUN_A RUN_B [--resamples 10000]

RUN_A, RUN_B: two train.py output directories of the same classifier pool (``out_dir``: the export
and ``.hydra/config.yaml``). Each task's exported model (``export/tasks/<task>/``, loaded with
``from_pretrained``) is run on that task's full test split; both runs are scored on the same examples,
so the comparison is paired: per task the examples one gets right and the other wrong (with an exact
two-sided McNemar p), and a paired bootstrap (examples resampled within each task, the same draw for
both runs) of the difference in normalized accuracy, A − B, as in the benchmark tables (each task's
accuracy over its expert's, from RUN_A's ``eval.json``). The re-measured accuracies must equal the
ones each run recorded in its ``eval.json``: a check of the export itself.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from common import ROOT
from omegaconf import OmegaConf

from adamerge.evaluate import load_test_sets
from adamerge.pool.config import pool_from_config, resolve_recipe
from adamerge.run.data import batches


def run_config(run: Path) -> dict:
    path = run / ".hydra" / "config.yaml"
    if not path.is_file():
        raise SystemExit(f"{run}: no .hydra/config.yaml — pass a train.py out_dir")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


@torch.no_grad()
def correct_per_example(model_dir: Path, test_set, batch_size: int = 64) -> torch.Tensor:
    """One bool per test example: whether the exported model at ``model_dir`` predicts its label."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    preds = [model(**b).logits.argmax(-1) for b in batches(test_set.encoded, batch_size, "cpu")]
    return torch.cat(preds) == test_set.labels


def mcnemar_p(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p: the discordant pairs as Binomial(n, 1/2)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap(correct_a: dict, correct_b: dict, expert: dict, resamples: int, seed: int = 0) -> torch.Tensor:
    """``resamples`` draws of the normalized-accuracy difference A − B (percentage points)."""
    g = torch.Generator().manual_seed(seed)
    diff = torch.zeros(resamples, dtype=torch.float64)
    for task, a in correct_a.items():
        d = a.double() - correct_b[task].double()
        idx = torch.randint(0, len(d), (resamples, len(d)), generator=g)
        diff += d[idx].mean(1) / expert[task]
    return 100 * diff / len(correct_a)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--resamples", type=int, default=10000)
    args = ap.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the base's load report (no head: each task has its own) is expected
    hf_logging.disable_progress_bar()  # one bar per task and run says nothing here

    runs = [args.run_a, args.run_b]
    configs = [run_config(r) for r in runs]
    if configs[0]["pool"] != configs[1]["pool"]:
        raise SystemExit(f"{runs[0]} and {runs[1]} merged different pools: a paired comparison needs the same test sets")
    c = configs[0]
    pool = pool_from_config(resolve_recipe(c["pool"], ROOT))
    tests = load_test_sets(pool, pool.tokenizer(), c["data"]["max_length"])
    evals = [json.loads((r / "eval.json").read_text()) for r in runs]
    expert = evals[0]["rows"]["expert"]
    correct, acc = [], []
    for run, ev in zip(runs, evals):
        merged_row = list(ev["rows"].values())[-1]  # the merge is the table's last row
        per_task = {t: correct_per_example(run / "export" / "tasks" / t, ts) for t, ts in tests.items()}
        run_acc = {t: ok.float().mean().item() for t, ok in per_task.items()}
        for t, a in run_acc.items():
            if abs(a - merged_row[t]) > 1e-6:
                raise SystemExit(f"{run}: task '{t}' re-measured {a:.4f} from the export, "
                                 f"eval.json says {merged_row[t]:.4f}")
        correct.append(per_task)
        acc.append(run_acc)

    print(f"A = {runs[0]}\nB = {runs[1]}\n")
    print("| task | n | A | B | A right, B wrong | A wrong, B right | McNemar p |")
    print("|---|---|---|---|---|---|---|")
    for t in tests:
        a, b = correct[0][t], correct[1][t]
        a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
        print(f"| {t} | {len(a)} | {100 * acc[0][t]:.1f} | {100 * acc[1][t]:.1f} | {a_only} | {b_only} "
              f"| {mcnemar_p(a_only, b_only):.3f} |")
    norm = [100 * sum(run_acc[t] / expert[t] for t in tests) / len(tests) for run_acc in acc]
    diffs = paired_bootstrap(correct[0], correct[1], expert, args.resamples)
    lo, hi = torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    print(f"\nnormalized accuracy: A {norm[0]:.2f}, B {norm[1]:.2f}; A − B = {norm[0] - norm[1]:+.2f} "
          f"(paired bootstrap over test examples, {args.resamples} resamples: 95% interval [{lo:+.2f}, {hi:+.2f}], "
          f"P(A − B ≤ 0) = {(diffs <= 0).double().mean().item():.3f})")


if __name__ == "__main__":
    main()
