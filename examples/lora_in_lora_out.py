"""LoRA in, LoRA out: merge PEFT LoRA experts and load the merge back as one adapter with peft.

    python examples/lora_in_lora_out.py --base /models/bert-base \
        --task sst2=/adapters/sst2,/data/sst2_unlabeled.jsonl --task mnli=/adapters/mnli,/data/mnli.jsonl

The export holds ``lora/`` (a PEFT adapter of rank ΣR) beside the dense ``model/``; this script loads the
adapter onto the base, folds it in and shows that it equals the dense export.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import adamerge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--task", action="append", required=True, metavar="NAME=ADAPTER,CALIBRATION")
    ap.add_argument("--out", default="runs/lora_merge")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()

    tasks = {}
    for spec in args.task:
        name, files = spec.split("=", 1)
        adapter, calibration = files.split(",")
        tasks[name] = {"expert": adapter, "calibration": calibration}
    pool = {"base": args.base, "model_class": "sequence_classification", "head_prefixes": ["classifier."],
            "tasks": tasks}
    steps = {"trainer": {"max_steps": args.steps}} if args.steps else {}
    export = Path(adamerge.merge(pool=pool, method="adamerging_layerwise", out_dir=args.out, **steps)["export"])

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(args.base)
    prefix = base.base_model_prefix
    folded = PeftModel.from_pretrained(base, str(export / "lora")).merge_and_unload().state_dict()
    # export/model is the backbone alone: its tensor names lack the prefix (bert.…)
    dense = {f"{prefix}.{n}": v for n, v in load_file(str(export / "model" / "model.safetensors")).items()}
    worst = max(float((folded[n] - v).norm() / v.norm().clamp_min(1e-12)) for n, v in dense.items())
    print(f"export/lora loaded with peft: largest relative difference to the dense export {worst:.1e}")
    assert worst < 1e-5, "the adapter does not equal the dense merge"


if __name__ == "__main__":
    main()
