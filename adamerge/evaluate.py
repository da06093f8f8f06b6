"""Per-task accuracy through each task's own head; absolute and normalized averages as one table.

Sequence classifiers are scored here; causal LMs (label words or exact match) by adamerge/evaluate_lm.py and
seq2seq LMs (label words or first token) by adamerge/seq2seq.py, behind the same ``load_test_sets`` and
``evaluate_params``, so every row and the table are the same.
CLIP zero-shot pools' test images are read and scored, a batch at a time, by adamerge/clip_zero_shot.py.

Normalized accuracy is averaged per task: mean_t acc_merged(t) / acc_expert(t) (as TALL masks and
LiNeS report it), not the ratio of averages.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch.func import functional_call
from torchmetrics.classification import MulticlassAccuracy

from .clip_zero_shot import ImageTestSet, image_accuracy
from .clip_zero_shot import load_test_sets as load_image_test_sets
from .data import batches, encode, read_split
from .evaluate_lm import LMTestSet, lm_accuracy, load_lm_test_sets
from .seq2seq import Seq2SeqTestSet, load_seq2seq_test_sets, seq2seq_accuracy

TestSets = dict[str, tuple[dict[str, torch.Tensor], torch.Tensor, int] | LMTestSet | Seq2SeqTestSet | ImageTestSet]
EVALUATED = ("sequence_classification", "causal_lm", "seq2seq_lm", "clip_zero_shot")  # the pool model classes with a per-task accuracy


def load_test_sets(pool, tokenizer, max_length: int = 64, max_examples: int | None = None,
                   split: str = "test", max_new_tokens: int = 16) -> TestSets:
    """{task: test set} from each task's labelled ``split`` file (``test`` or ``validation``); tasks
    without one are left out. Classifiers: (encoded inputs, labels, num_classes); causal LMs: an
    LMTestSet (prompts untruncated; ``max_new_tokens`` caps exact-match generation); seq2seq LMs: a
    Seq2SeqTestSet (inputs untruncated)."""
    if pool.model_class == "causal_lm":
        return load_lm_test_sets(pool, tokenizer, max_examples, split, max_new_tokens)
    if pool.model_class == "seq2seq_lm":
        return load_seq2seq_test_sets(pool, tokenizer, max_examples, split)
    if pool.model_class == "clip_zero_shot":  # image files, read when scored (adamerge/clip_zero_shot.py)
        return load_image_test_sets(pool, max_examples, split)
    out = {}
    for name, spec in pool.tasks.items():
        if not getattr(spec, split):
            continue
        n_cls = pool.num_labels(name)
        texts, labels = read_split(pool, name, split, need_labels=True)
        if max_examples:
            texts, labels = texts[:max_examples], labels[:max_examples]
        n_cls = n_cls or (max(labels) + 1)
        enc, y = encode(tokenizer, texts, max_length), torch.tensor(labels)
        # shortest first: batches of similar lengths carry little padding (accuracy ignores the order)
        order = torch.argsort(enc["attention_mask"].sum(1), stable=True)
        out[name] = ({k: v[order] for k, v in enc.items()}, y[order], n_cls)
    return out


@torch.no_grad()
def accuracy(logits_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], enc: dict[str, torch.Tensor],
             labels: torch.Tensor, num_classes: int, batch_size: int = 64,
             device: torch.device | str = "cpu") -> float:
    # one process evaluates (rank 0 of a DDP run, after the others left): no sync over the process group
    metric = MulticlassAccuracy(num_classes=num_classes, average="micro", sync_on_compute=False).to(device)
    for batch, y in zip(batches(enc, batch_size, device), labels.split(batch_size)):
        metric.update(logits_fn(batch).argmax(-1), y.to(device))
    return float(metric.compute())


@torch.no_grad()
def evaluate_params(base: torch.nn.Module, params_for_task: Callable[[str], dict[str, torch.Tensor]],
                    test_sets: TestSets, batch_size: int = 64) -> dict[str, float]:
    """Accuracy per task of ``base`` run with ``params_for_task(task)`` (merged weights + that head)."""
    device = next(base.parameters()).device
    was = base.training
    base.eval()
    res = {}
    for task, ts in test_sets.items():
        params = params_for_task(task)
        if isinstance(ts, LMTestSet):
            res[task] = lm_accuracy(base, params, ts, batch_size)
            continue
        if isinstance(ts, Seq2SeqTestSet):
            res[task] = seq2seq_accuracy(base, params, ts, batch_size)
            continue
        if isinstance(ts, ImageTestSet):
            res[task] = image_accuracy(base, params, ts, batch_size)
            continue
        enc, labels, n_cls = ts
        res[task] = accuracy(lambda b, p=params: functional_call(base, p, args=(), kwargs=b).logits,
                             enc, labels, n_cls, batch_size, device)
    base.train(was)
    return res


def reference_rows(pool, test_sets: TestSets, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """The pretrained backbone with the experts' heads (LMs: none), and each expert on its own
    task (the ceiling)."""
    pre = evaluate_params(pool.base_model, lambda t: pool.head(t), test_sets, batch_size)
    device = next(pool.base_model.parameters()).device
    exp = evaluate_params(
        pool.base_model,
        lambda t: {n: v.to(device) for n, v in pool.iter_expert_state(t)},
        test_sets, batch_size,
    )
    return {"pretrained": pre, "expert": exp}


def summarize(rows: dict[str, dict[str, float]], ceiling: str = "expert") -> dict:
    """Add ``avg`` and ``norm`` (per-task merged/expert, averaged) to each row."""
    tasks = list(next(iter(rows.values())).keys()) if rows else []
    table = {}
    for name, accs in rows.items():
        row = dict(accs)
        row["avg"] = sum(accs[t] for t in tasks) / max(1, len(tasks))
        if ceiling in rows:
            row["norm"] = sum(accs[t] / max(rows[ceiling][t], 1e-12) for t in tasks) / max(1, len(tasks))
        table[name] = row
    return {"tasks": tasks, "rows": table}


def markdown(summary: dict) -> str:
    tasks = summary["tasks"]
    cols = tasks + ["avg", "norm"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in summary["rows"].items():
        cells = [f"{100 * row[c]:.1f}" if c in row else "–" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_report(summary: dict, out_dir: str | Path) -> None:
    from .export import atomic_write_text

    out = Path(out_dir)
    atomic_write_text(out / "eval.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "eval.md", markdown(summary) + "\n")
