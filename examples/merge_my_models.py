"""Merge your own Hugging Face checkpoints from Python: a base, one fine-tuned expert per task, and a file of
unlabeled texts per task (JSON lines ``{"text": ...}``; a test file adds ``"label"``).

    python examples/merge_my_models.py --base /models/bert-base \
        --task sst2=/models/bert-sst2,/data/sst2_unlabeled.jsonl,/data/sst2_test.jsonl \
        --task mnli=/models/bert-mnli,/data/mnli_unlabeled.jsonl \
        --method adamerging_layerwise --out runs/mine

Experts may be save_pretrained directories, .safetensors state dicts or PEFT LoRA adapters. The run is the one
``adamerge method=...`` runs (checkpoints, held-out selection, export under ``--out``).
"""

from __future__ import annotations

import argparse
import json

import adamerge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the pretrained model (a save_pretrained directory)")
    ap.add_argument("--task", action="append", required=True, metavar="NAME=EXPERT,CALIBRATION[,TEST]")
    ap.add_argument("--method", default="adamerging_layerwise")
    ap.add_argument("--out", default="runs/my_merge")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the method's)")
    args = ap.parse_args()

    tasks = {}
    for spec in args.task:
        name, files = spec.split("=", 1)
        expert, calibration, *test = files.split(",")
        tasks[name] = {"expert": expert, "calibration": calibration, **({"test": test[0]} if test else {})}
    pool = {"base": args.base, "model_class": "sequence_classification", "head_prefixes": ["classifier."],
            "tasks": tasks}
    steps = {"trainer": {"max_steps": args.steps}} if args.steps else {}
    result = adamerge.merge(pool=pool, method=args.method, out_dir=args.out, **steps)
    print(f"exported to {result['export']}")
    if result.get("selection"):
        print("exported the", result["selection"]["exported"], "merge:", result["selection"]["why"])
    print(json.dumps(result.get("eval"), indent=2))


if __name__ == "__main__":
    main()
