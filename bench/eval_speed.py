"""Evaluation time with test sets sorted by length (as load_test_sets returns them) vs in file order.

    python bench/eval_speed.py --pool minilm_frozen_head_lora

Evaluates the pretrained row (base encoder + each task's head) over the full test splits both ways,
interleaved, and prints the time ratio (best of ``--rounds``) and that the accuracies are identical.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import load_pool


def main() -> None:

    from adamerge.evaluate import evaluate_params, load_test_sets
    from adamerge.run.data import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", default="minilm_frozen_head_lora")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    pool = load_pool(a.pool)
    by_length = load_test_sets(pool, load_tokenizer(pool.base_path), 64)
    g = torch.Generator().manual_seed(0)
    shuffled = {}
    for task, (enc, labels, n) in by_length.items():
        order = torch.randperm(labels.shape[0], generator=g)
        shuffled[task] = ({k: v[order] for k, v in enc.items()}, labels[order], n)
    times: dict[str, list[float]] = {"file order": [], "sorted by length": []}
    accs = {}
    for _ in range(a.rounds):
        for name, sets in (("file order", shuffled), ("sorted by length", by_length)):
            t0 = time.perf_counter()
            accs[name] = evaluate_params(pool.base_model, pool.head, sets, 128)
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    print(f"file order {best['file order']:.1f} s, sorted by length {best['sorted by length']:.1f} s: "
          f"ratio {best['sorted by length'] / best['file order']:.2f}; identical accuracies: "
          f"{accs['file order'] == accs['sorted by length']}")


if __name__ == "__main__":
    main()
