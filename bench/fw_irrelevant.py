"""FW-Merging with irrelevant candidates: task arithmetic vs FW hard vs FW soft as the pool grows.

The pool is the benchmark's fully fine-tuned experts (relevant) plus ``r`` irrelevant candidates for
r = 0, 1×, 2×, 3× the relevant ones. An irrelevant candidate is MiniLM fine-tuned like the experts
on one task's texts with shuffled labels (built once, cached under runs/): a real fine-tune that
carries no skill. (Permuting a task vector's entries is *not* irrelevant enough: task arithmetic
with 5 such candidates added scored 61.3, the same as without.) Every row runs in its own
subprocess (peak RSS is its own):

* task arithmetic over all candidates (λ = 0.3), computed here from the pool's tensors;
* ``fw_merging_hard`` and ``fw_merging_soft`` through the real train.py with
  ``method.candidates_dir`` = the candidate folder, cross-entropy LMO on 100 labelled calibration
  examples per task (the authors' setting). CPU budgets: ``--hard-steps``, ``--soft-steps`` and
  ``--inner-steps`` (authors: 10 / 15 / 500) — the table says what ran.

    python bench/fw_irrelevant.py --write bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import ROOT, load_pool

WORK = ROOT / "runs" / "fw_irrelevant"


def _irrelevant(pool, j: int, src: str, steps: int = 60) -> Path:
    """Irrelevant candidate ``j``: MiniLM fully fine-tuned on ``src``'s texts with *shuffled* labels.

    A real fine-tune (a weight change of the experts' kind and size) that carries no skill: what an
    unrelated checkpoint on a hub looks like to a merge. The experts' optimizer (AdamW lr 1e-4, weight
    decay 0.01, linear decay, so weights move as far per step) on cheaper batches (16 × 32 tokens),
    ``steps`` steps, seed ``j``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adamerge.pool.config import load_recipe

    d = WORK / "irrelevant" / f"{j:02d}_{src}"
    if (d / "model.safetensors").exists():
        return d
    bm = load_recipe(ROOT / "data" / "benchmark.py")
    texts, labels = bm.split_task(src, 0)["train"]
    g = torch.Generator().manual_seed(1000 + j)
    labels = torch.tensor(labels)[torch.randperm(len(labels), generator=g)]
    tok = AutoTokenizer.from_pretrained(pool.base_path)
    torch.manual_seed(1000 + j)
    model = AutoModelForSequenceClassification.from_pretrained(pool.base_path, num_labels=int(labels.max()) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(texts), (16,), generator=g)
        enc = tok([texts[i] for i in idx], truncation=True, max_length=32, padding=True, return_tensors="pt")
        loss = model(**enc, labels=labels[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    return d


def make_candidates(pool, n_irrelevant: int) -> Path:
    """Folder of candidates: links to the experts + ``n_irrelevant`` permuted-task-vector models."""
    folder = WORK / f"candidates_{n_irrelevant}"
    if folder.exists():
        return folder
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for t in pool.task_names:
        (tmp / f"relevant_{t}").symlink_to(Path(pool.experts[t].path).resolve())
    for j in range(n_irrelevant):
        src = pool.task_names[j % len(pool.task_names)]
        (tmp / f"irrelevant_{j:02d}_{src}").symlink_to(_irrelevant(pool, j, src))
    tmp.rename(folder)
    return folder


def task_arithmetic_row(n_irrelevant: int, lam: float) -> dict:
    """One subprocess: TA over every candidate of the folder, evaluated on the benchmark's test sets."""
    from adamerge.evaluate import evaluate_params, load_test_sets
    from adamerge.pool.candidates import CandidatePool, candidate_paths
    from adamerge.run.data import load_tokenizer

    t0 = time.time()
    pool = load_pool("minilm_full")
    cands = CandidatePool(pool, candidate_paths(candidates_dir=WORK / f"candidates_{n_irrelevant}"))
    merged = {}
    for name in pool.shared_names():
        base = pool.base_tensor(name).float()
        merged[name] = base + lam * sum(cands.tensor(i, name).float() - base for i in range(len(cands)))
    tests = load_test_sets(pool, load_tokenizer(pool.base_path), 64)
    acc = evaluate_params(pool.base_model, lambda t: {**merged, **pool.head(t)}, tests, 128)
    return {"acc": acc, "wall_s": time.time() - t0,
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def train_row(method: str, n_irrelevant: int, steps: int, extra: list[str]) -> dict:
    out = WORK / f"{method}_{n_irrelevant}"
    args = [sys.executable, str(ROOT / "train.py"), f"method={method}", "pool=minilm_full", f"out_dir={out}",
            f"method.candidates_dir={WORK / f'candidates_{n_irrelevant}'}", "method.objective=cross_entropy",
            f"method.steps={steps}", "evaluate.reference_rows=false", "export.overwrite=true",
            "trainer.enable_progress_bar=false", *extra]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # a fresh run (train.py refuses old checkpoints)
    # a wrapper process whose only child is train.py: its RUSAGE_CHILDREN peak is that run's own
    wrap = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print('RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(r.returncode)")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", wrap, *args], cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        return {"error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:]), "wall_s": wall}
    rss = float(proc.stderr.rsplit("RSS_KIB", 1)[1].split()[0]) / 1024
    summary = json.loads((out / "eval.json").read_text())
    return {"acc": summary["rows"][method], "wall_s": wall, "rss_mib": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=int, nargs="*", default=[0, 1, 2, 3])
    ap.add_argument("--methods", nargs="*", default=["task_arithmetic", "fw_merging_hard", "fw_merging_soft"])
    ap.add_argument("--hard-steps", type=int, default=10)
    ap.add_argument("--soft-steps", type=int, default=3)
    ap.add_argument("--inner-steps", type=int, default=20)
    ap.add_argument("--lam", type=float, default=0.3)
    ap.add_argument("--one", nargs=2, metavar=("N_IRRELEVANT", "LAM"), help=argparse.SUPPRESS)
    ap.add_argument("--write", default=None)
    args = ap.parse_args()
    if args.one:  # child process: one task-arithmetic row
        print(json.dumps(task_arithmetic_row(int(args.one[0]), float(args.one[1]))))
        return

    pool = load_pool("minilm_full")
    k = len(pool.task_names)
    results = []
    for r in args.ratios:
        n_irr = r * k
        make_candidates(pool, n_irr)
        for m in args.methods:
            t0 = time.time()
            if m == "task_arithmetic":
                proc = subprocess.run([sys.executable, __file__, "--one", str(n_irr), str(args.lam)],
                                      capture_output=True, text=True, cwd=ROOT)
                res = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
                    "error": proc.stderr.strip().splitlines()[-1:]}
            elif m == "fw_merging_hard":
                res = train_row(m, n_irr, args.hard_steps, [])
            else:
                res = train_row(m, n_irr, args.soft_steps, [f"method.inner_steps={args.inner_steps}"])
            res.update(method=m, n_irrelevant=n_irr, n_candidates=k + n_irr)
            results.append(res)
            print(json.dumps(res), flush=True)
            print(f"# {m} with {n_irr} irrelevant: {time.time() - t0:.0f} s", flush=True)
    (WORK / "results.json").write_text(json.dumps(results, indent=1))

    tasks = pool.task_names
    lines = ["| method | candidates (relevant + irrelevant) | " + " | ".join(tasks) + " | avg | wall s | peak RSS MiB |",
             "|---" * (len(tasks) + 5) + "|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | {k} + {r['n_irrelevant']} | failed: {r['error']} |")
            continue
        acc = r["acc"]
        avg = sum(acc[t] for t in tasks) / len(tasks)
        rss = r.get("rss_mib", float("nan"))
        lines.append(f"| {r['method']} | {k} + {r['n_irrelevant']} | " + " | ".join(f"{100 * acc[t]:.1f}" for t in tasks)
                     + f" | {100 * avg:.1f} | {r['wall_s']:.0f} | {rss:.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.write:
        head = (f"\n## FW-Merging with irrelevant candidates ({datetime.date.today()}, `bench/fw_irrelevant.py`; "
                f"hard {args.hard_steps} it., soft {args.soft_steps} it. × {args.inner_steps} inner steps)\n\n")
        with open(args.write, "a") as f:
            f.write(head + table + "\n")


if __name__ == "__main__":
    main()
