"""Per-task accuracy through each task's own head; absolute and normalized averages as one table.

Each model family (adamerge/families/) loads its own test sets — encoded texts of a classifier, prompts
and label words of an LM, image files of CLIP — and each test set scores itself (``accuracy``), so every
row and the table are the same whatever the family.

Normalized accuracy is averaged per task: mean_t acc_merged(t) / acc_expert(t) (as TALL masks and
LiNeS report it), not the ratio of averages.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .run.data import batches

TestSets = dict[str, Any]  # task -> a family's test set (adamerge/families/), with .accuracy(base, params, batch_size)


def load_test_sets(pool, tokenizer, max_length: int = 64, max_examples: int | None = None,
                   split: str = "test", max_new_tokens: int = 16) -> TestSets:
    """{task: test set} from each task's labelled ``split`` file (``test`` or ``validation``), as the pool's
    family reads it; tasks without one are left out. Classifier inputs are cut to ``max_length``; LM
    prompts are not (``max_new_tokens`` caps exact-match generation)."""
    return pool.family.load_test_sets(pool, tokenizer, max_length, max_examples, split, max_new_tokens)


def shard_examples(test_set: Any, fields: tuple[str, ...], rank: int, world: int) -> Any:
    """A copy of a dataclass test set with examples rank, rank + world, … of its per-example ``fields``
    (lists or tensors; ``None`` stays ``None``); the other fields are shared."""
    values = {f: getattr(test_set, f) for f in fields}
    return dataclasses.replace(test_set, **{f: v if v is None else v[rank::world] for f, v in values.items()})


@torch.no_grad()
def accuracy(logits_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], enc: dict[str, torch.Tensor],
             labels: torch.Tensor, num_classes: int, batch_size: int = 64,
             device: torch.device | str = "cpu") -> float:
    from torchmetrics.classification import MulticlassAccuracy  # here: importing it takes seconds

    # one process evaluates (rank 0 of a DDP run, after the others left): no sync over the process group
    metric = MulticlassAccuracy(num_classes=num_classes, average="micro", sync_on_compute=False).to(device)
    for batch, y in zip(batches(enc, batch_size, device), labels.split(batch_size)):
        metric.update(logits_fn(batch).argmax(-1), y.to(device))
    return float(metric.compute())


@torch.no_grad()
def evaluate_params(base: torch.nn.Module, params_for_task: Callable[[str], dict[str, torch.Tensor]],
                    test_sets: TestSets, batch_size: int = 64) -> dict[str, float]:
    """Accuracy per task of ``base`` run with ``params_for_task(task)`` (merged weights + that head)."""
    was = base.training
    base.eval()
    res = {task: ts.accuracy(base, params_for_task(task), batch_size) for task, ts in test_sets.items()}
    base.train(was)
    return res


def merge_accuracies(pool, merged: dict[str, torch.Tensor], test_sets: TestSets, batch_size: int = 64,
                     base: torch.nn.Module | None = None) -> dict[str, float]:
    """Accuracy per task of the merged weights with that task's own head (LMs: none), run on ``base``
    (default: the pool's) where it lives."""
    base = base if base is not None else pool.base_model
    device = next(base.parameters()).device
    return evaluate_params(base, lambda t: {**merged, **{n: v.to(device) for n, v in pool.head(t).items()}},
                           test_sets, batch_size)


def merged_rows(method, label: str, merged: dict[str, torch.Tensor], test_sets: TestSets,
                batch_size: int = 64) -> dict[str, dict[str, float]]:
    """The merge's row of the table; for a method with one model per task (``per_task``), each task's own model's
    row and their average's (``merged``)."""
    pool = method.pool
    if getattr(method, "routed", None) is not None:  # a routed merge (twin_merging): the shared one and the routed one
        from .routed import routed_accuracies

        routed = routed_accuracies(method.routed, test_sets, batch_size)
        method.routing = routed["routing"]
        return {label: merge_accuracies(pool, merged, test_sets, batch_size),
                f"{label} routed (no task id)": routed["no_task_id"],
                f"{label} routed, the task's own head": routed["own_head"]}
    if not getattr(method, "per_task", False):
        return {label: merge_accuracies(pool, merged, test_sets, batch_size)}
    own = {t: merge_accuracies(pool, method.task_params(t), {t: ts}, batch_size)[t] for t, ts in test_sets.items()}
    return {f"{label} (average of the task models)": merge_accuracies(pool, merged, test_sets, batch_size),
            f"{label} (each task's own model)": own}


def expert_row(pool, test_sets: TestSets, batch_size: int = 64, base: torch.nn.Module | None = None) -> dict[str, float]:
    """Each expert on its own task (the ceiling), run on ``base`` (default: the pool's) where it lives."""
    base = base if base is not None else pool.base_model
    device = next(base.parameters()).device
    return evaluate_params(base, lambda t: {n: v.to(device) for n, v in pool.iter_expert_state(t)},
                           test_sets, batch_size)


def reference_rows(pool, test_sets: TestSets, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """The pretrained backbone with the experts' heads (LMs: none), and each expert on its own
    task (the ceiling)."""
    pre = evaluate_params(pool.base_model, lambda t: pool.head(t), test_sets, batch_size)
    return {"pretrained": pre, "expert": expert_row(pool, test_sets, batch_size)}


# a backdoored expert's attack files (pool task keys) -> the rows' key for each, and its column heading
ATTACK_SPLITS = {"attack_test": "asr", "attack_clean": "clean_to_target"}
EXTRA_HEADINGS = {"asr": "ASR", "clean_to_target": "clean→target"}


def summarize(rows: dict[str, dict[str, float]], ceiling: str = "expert",
              extra: dict[str, dict[str, dict[str, float]]] | None = None) -> dict:
    """Add ``avg`` and ``norm`` (per-task merged/expert, averaged) to each row, and ``extra`` columns where they were
    measured ({key: {row: {task: value}}}, e.g. a backdoor's attack success rate per attacked task)."""
    tasks = list(next(iter(rows.values())).keys()) if rows else []
    table = {}
    for name, accs in rows.items():
        row = dict(accs)
        row["avg"] = sum(accs[t] for t in tasks) / max(1, len(tasks))
        if ceiling in rows:
            row["norm"] = sum(accs[t] / max(rows[ceiling][t], 1e-12) for t in tasks) / max(1, len(tasks))
        for key, by_row in (extra or {}).items():
            if name in by_row:
                row[key] = dict(by_row[name])
        table[name] = row
    columns = {key: sorted({t for r in by_row.values() for t in r}) for key, by_row in (extra or {}).items()}
    return {"tasks": tasks, "rows": table, **({"extra": columns} if any(columns.values()) else {})}


def extra_cells(summary: dict, row: dict) -> dict[str, float]:
    """A row's ``extra`` columns by their headings ("ASR <task>", …)."""
    return {f"{EXTRA_HEADINGS.get(key, key)} {t}": v for key in summary.get("extra", {}) for t, v in row.get(key, {}).items()}


def markdown(summary: dict) -> str:
    extra = [f"{EXTRA_HEADINGS.get(key, key)} {t}" for key, tasks in summary.get("extra", {}).items() for t in tasks]
    cols = summary["tasks"] + ["avg", "norm"] + extra
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in summary["rows"].items():
        values = {**row, **extra_cells(summary, row)}
        cells = [f"{100 * values[c]:.1f}" if c in values else "–" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_report(summary: dict, out_dir: str | Path) -> None:
    from .atomic import atomic_write_text

    out = Path(out_dir)
    atomic_write_text(out / "eval.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "eval.md", markdown(summary) + "\n")
