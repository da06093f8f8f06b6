"""What routing costs: a routed export (Twin-Merging's ``export/routed``) against the static merge it routes over.

The static merge is the routed model's own shared weights under one task's head (what ``export/model`` plus a head
serves); the routed pass is ``RoutedModel``'s: the router's features, then the forward with the low-rank deltas under
each routed task's head. Both run on the same batches of real test texts, interleaved repetition by repetition (so
drift in the machine's speed falls on both alike); the latency is the median over repetitions, as a ratio. Memory is
the bytes the routed export adds to the static merge (deltas, router, the other tasks' heads).

    OMP_NUM_THREADS=1 python bench/routed_cost.py --export runs/gen17/twin_fh_lora/twin_merging/export --batch 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import ROOT


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    import torch
    from omegaconf import OmegaConf
    from torch.func import functional_call

    from adamerge import routed
    from adamerge.pool.config import resolve_recipe
    from adamerge.run.data import batches, encode, load_tokenizer, read_jsonl

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export", type=Path, required=True, help="an export directory holding routed/")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=4, help="batches per repetition")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()

    model = routed.load(args.export)
    run_cfg = OmegaConf.load(args.export.parent / ".hydra" / "config.yaml")
    tasks = resolve_recipe(OmegaConf.to_container(run_cfg.pool, resolve=True), ROOT)["tasks"]  # a recipe: its files
    texts = [t for task in model.tasks for t in read_jsonl(tasks[task]["test"], task, need_labels=False)[0]]
    step = max(1, len(texts) // (args.batch * args.batches))  # spread over every task's texts
    chosen = texts[::step][: args.batch * args.batches]
    encoded = encode(load_tokenizer(args.export / "model"), chosen, args.max_length)
    work = batches(encoded, args.batch)
    head = model.heads[model.tasks[0]]

    def static() -> None:
        model.weights = None  # the hooks pass the output through: the shared merge alone
        for b in work:
            functional_call(model.model, head, args=(), kwargs=b, strict=False)

    def routed_pass() -> None:
        for b in work:
            model(**b)

    times: dict[str, list[float]] = {"static": [], "routed": []}
    with torch.no_grad():
        static(), routed_pass()  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("static", static), ("routed", routed_pass)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    per_batch = {k: statistics.median(v) / len(work) for k, v in times.items()}
    shared = tensor_bytes(model.model.parameters())
    extra = (tensor_bytes(t for twin in model.twins.values() for t in twin.values())
             + tensor_bytes(model.router.parameters())
             + tensor_bytes(t for task, h in model.heads.items() if task != model.tasks[0] for t in h.values()))
    row = {"export": str(args.export), "batch": args.batch, "texts": len(chosen), "threads": torch.get_num_threads(),
           "static_ms_per_batch": 1000 * per_batch["static"], "routed_ms_per_batch": 1000 * per_batch["routed"],
           "latency_ratio": per_batch["routed"] / per_batch["static"], "shared_MB": shared / 1e6,
           "extra_MB": extra / 1e6, "extra_share": extra / shared}
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
