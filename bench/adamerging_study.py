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
import time

import torch
import torch.nn.functional as F
from common import ROOT, load_pool


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
    ap.add_argument("--seed", type=int, default=0, help="calibration batch order (train.py's seed)")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()


    from adamerge.core.objectives import entropy
    from adamerge.evaluate import evaluate_params, load_test_sets
    from adamerge.methods import get_method
    from adamerge.run.data import (
        StepBatches,
        load_tokenizer,
        read_jsonl,
        step_indices,
        trim,
    )
    from adamerge.run.datamodule import CalibrationDataModule

    torch.manual_seed(args.seed)
    pool = load_pool(args.pool, head_prefixes=args.head_prefixes)
    mcfg = {"name": "adamerging", "id": "study", "granularity": args.granularity, "init": 0.3,
            "clamp": [0.0, 1.0], "lr": args.lr, "diversity": args.diversity if args.objective == "im" else 0.0}
    tok = load_tokenizer(pool.base_path)
    dm = CalibrationDataModule.from_pool(pool, batch_size=args.batch, max_length=64, seed=args.seed)
    if args.transductive:  # unlabeled test inputs, as the authors' scripts (evaluation uses the first N)
        dm = CalibrationDataModule({t: read_jsonl(s.test, t)[0] for t, s in pool.tasks.items()}, tok,
                                   batch_size=args.batch, max_length=64, seed=args.seed)
    cls = get_method("adamerging")
    if args.objective == "oracle":  # the same texts in the same order, with their labels
        labels = {t: torch.tensor(read_jsonl(spec.calibration, t, need_labels=True)[1]) for t, spec in pool.tasks.items()}

        class Oracle(cls):
            step = 0

            def task_loss(self, task, inputs, params=None):
                logits, _ = self.task_logits(task, inputs, params)
                n = dm.encoded[task]["input_ids"].shape[0]
                idx = step_indices(n, args.batch, self.step, 0, list(dm.encoded).index(task))
                return F.cross_entropy(logits.float(), labels[task][idx])

        cls = Oracle
    method = cls(pool, mcfg, {"exclude": args.exclude})
    tests = load_test_sets(pool, tok, 64, args.test_examples)
    cal_eval = {t: trim({k: v[:256] for k, v in enc.items()}) for t, enc in dm.encoded.items()}
    stream = StepBatches(dm.encoded, args.batch, args.seed)
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=args.lr)

    @torch.no_grad()
    def report(step):
        merged = {n: v.detach() for n, v in method.merged.merged_params().items()}
        acc = evaluate_params(pool.base_model, lambda t: {**merged, **pool.head(t)}, tests, 128)
        ent = {t: float(entropy(method.task_logits(t, inp, merged)[0])) for t, inp in cal_eval.items()}
        c = method.merged.coefficients.values().detach()
        row = {"step": step, "acc": acc, "avg": sum(acc.values()) / len(acc), "entropy": ent,
               "coef_mean_per_task": c.reshape(-1, c.shape[-1]).mean(0).tolist()}
        print(json.dumps(row), flush=True)
        return row

    t0 = time.time()
    rows = [report(0)]
    for step in range(args.steps):
        method.step = step  # the oracle's labels follow the step's batch
        _, to_backward = method.step_loss(stream.batch(step))  # the method's own merge + per-task backward
        opt.zero_grad()
        to_backward.backward()
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
