"""Why does AdaMerging do what it does on a pool? A diagnostic loop over the library's own pieces.

Trains layer-/task-wise coefficients with the AdaMerging method class (merge, per-task backward,
Adam) for a few hundred steps under one *variant* and prints test accuracy and calibration entropy
every ``--every`` steps, so that objectives, learning rates and merged-tensor sets can be compared
in one table. ``--objective oracle`` uses the calibration *labels* (cross-entropy): not a method,
an upper bound on what the coefficient parametrisation can reach on this pool.

    python bench/adamerging_study.py --pool minilm_full --variant entropy --steps 150
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", default="minilm_full")
    ap.add_argument("--objective", default="entropy", choices=["entropy", "oracle", "im"])
    ap.add_argument("--granularity", default="layer")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--exclude", nargs="*", default=[], help="regexes of tensors kept at the base")
    ap.add_argument("--test-examples", type=int, default=400)
    ap.add_argument("--diversity", type=float, default=1.0, help="weight of the marginal entropy (im)")
    ap.add_argument("--head-prefixes", nargs="*", default=None, help="tensors kept per task (not merged)")
    ap.add_argument("--transductive", action="store_true", help="calibrate on the test inputs (as the authors)")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()

    from omegaconf import OmegaConf

    from adamerge.data import CalibrationDataModule, load_tokenizer, read_jsonl, trim
    from adamerge.evaluate import evaluate_params, load_test_sets
    from adamerge.methods import get_method
    from adamerge.pool import pool_from_config, resolve_recipe

    torch.manual_seed(0)
    pool_cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "pool" / f"{args.pool}.yaml"))
    if args.head_prefixes:
        pool_cfg["head_prefixes"] = args.head_prefixes
    pool = pool_from_config(resolve_recipe(pool_cfg, ROOT))
    mcfg = {"name": "adamerging", "id": "study", "granularity": args.granularity, "init": 0.3,
            "clamp": [0.0, 1.0], "lr": args.lr}
    method = get_method("adamerging")(pool, mcfg, {"exclude": args.exclude})
    tok = load_tokenizer(pool.base_path)
    dm = CalibrationDataModule.from_pool(pool, batch_size=args.batch, max_length=64, seed=0)
    if args.transductive:  # unlabeled test inputs, as the authors' scripts (evaluation uses the first N)
        dm = CalibrationDataModule({t: read_jsonl(s.test, t)[0] for t, s in pool.tasks.items()}, tok,
                                   batch_size=args.batch, max_length=64, seed=0)
    labels = {}
    if args.objective == "oracle":  # the same texts in the same order, with their labels
        for t, spec in pool.tasks.items():
            labels[t] = torch.tensor(read_jsonl(spec.calibration, t, need_labels=True)[1])
    tests = load_test_sets(pool, tok, 64, args.test_examples)
    cal_eval = {t: trim({k: v[:256] for k, v in enc.items()}) for t, enc in dm.encoded.items()}

    from adamerge.data import StepBatches, step_indices

    stream = StepBatches(dm.encoded, args.batch, 0)
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=args.lr)

    def loss_fn(task, inputs, params, step):
        logits, _ = method.task_logits(task, inputs, params)
        logp = F.log_softmax(logits.float(), -1)
        if args.objective == "oracle":
            k = list(dm.encoded).index(task)
            n = dm.encoded[task]["input_ids"].shape[0]
            y = labels[task][step_indices(n, args.batch, step, 0, k)]
            return F.nll_loss(logp, y)
        h = -(logp.exp() * logp).sum(-1).mean()
        if args.objective == "im":  # information maximisation: confident *and* diverse predictions
            pbar = logp.exp().mean(0)
            h = h + args.diversity * (pbar * pbar.clamp_min(1e-12).log()).sum()
        return h

    @torch.no_grad()
    def report(step):
        merged = {n: v.detach() for n, v in method.merged.merged_params().items()}
        acc = evaluate_params(pool.base_model, lambda t: {**merged, **pool.head(t)}, tests, 128)
        ent = {}
        for t, inp in cal_eval.items():
            logits, _ = method.task_logits(t, inp, merged)
            logp = F.log_softmax(logits.float(), -1)
            ent[t] = float(-(logp.exp() * logp).sum(-1).mean())
        c = method.merged.coefficients.values().detach()
        row = {"step": step, "acc": acc, "avg": sum(acc.values()) / len(acc), "entropy": ent,
               "coef_mean_per_task": c.reshape(-1, c.shape[-1]).mean(0).tolist()}
        print(json.dumps(row), flush=True)
        return row

    t0 = time.time()
    rows = [report(0)]
    for step in range(args.steps):
        batch = stream.batch(step)
        params = method.merged.merged_params()
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        for task, inputs in batch.items():
            loss_fn(task, inputs, leaves, step).backward()
        used = [n for n in params if leaves[n].grad is not None]
        opt.zero_grad()
        torch.autograd.backward([params[n] for n in used], [leaves[n].grad for n in used])
        opt.step()
        if (step + 1) % args.every == 0:
            rows.append(report(step + 1))
    print(f"# {args.steps} steps in {time.time() - t0:.0f} s", flush=True)
    out = ROOT / "runs" / "study"
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"{args.objective}_{args.granularity}_lr{args.lr:g}"
    (out / f"{name}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
