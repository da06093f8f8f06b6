"""Calibration and test data: reading, checking, encoding, and the seeded batch stream of every task.

Batches are a pure function of (seed, step, task), so a resumed run sees exactly the batches the
uninterrupted run would have seen, and each DDP rank takes its own slice of the global batch. The
LightningDataModule that serves them to the Trainer is adamerge/run/datamodule.py.
Labels are dropped before anything reaches training: they are only read for evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset

from ..errors import DataError

TEXT_FILES = ("calibration", "test", "validation", "attack_test", "attack_clean")  # a task's data files (TaskSpec)


def read_jsonl(path: str | Path, task: str, need_labels: bool = False, num_labels: int | None = None,
               key: str = "data", need_targets: bool = False,
               classes: list[str] | None = None, tokenizer=None) -> tuple[list[str], list]:
    """Texts (and labels or targets) from a JSON-lines file of ``{"text": ..., "label": ...}`` objects
    (classifiers) or ``{"text": prompt, "target": answer}`` objects (causal/seq2seq LMs, ``need_targets``).

    ``key`` (calibration, test, validation) only names the file in errors; with ``num_labels`` each
    label must lie in [0, num_labels); with ``classes`` each target must be one of them; with a
    ``tokenizer`` (and no ``classes``) each target must have tokens.
    """
    p = Path(path)
    where = f"task '{task}': {key} file {p}"
    if not p.exists():
        raise DataError(f"{where} does not exist; fix the path under pool tasks.{task}.{key}")
    texts, labels = [], []
    allowed = {c.strip() for c in classes} if classes is not None else None  # targets match ignoring spaces
    for i, row in jsonl_rows(p, where):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{where} line {i} is not a JSON object with a string 'text' field; "
                            'write each line as {"text": "..."}')
        texts.append(row["text"])
        if need_labels:
            labels.append(_label(row, f"{where} line {i}", num_labels))
        elif need_targets:
            labels.append(_target(row, f"{where} line {i}", classes, allowed, f"pool tasks.{task}.classes",
                                  tokenizer))
    if not texts:
        raise DataError(f"{where} has no examples (empty calibration/test data); give at least one line")
    if not any(t.strip() for t in texts):
        raise DataError(f"{where}: every 'text' is empty ({len(texts)} lines); nothing to calibrate or test on")
    return texts, labels


def jsonl_rows(path: Path, where: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of every non-blank line; a DataError naming ``where`` and the line otherwise."""
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where} line {i} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} line {i} is not valid JSON ({e}); each line must be one JSON object") from e


def _label(row: dict, where: str, num_labels: int | None) -> int:
    """The row's label as an int, or a DataError saying what is wrong and how to fix it."""
    if "label" not in row:
        raise DataError(f"{where} has no 'label' (needed for evaluation); add an integer \"label\"")
    y = row["label"]
    if isinstance(y, bool) or not isinstance(y, int):  # json gives int, float or str; bool is an int subclass
        raise DataError(f"{where}: label {y!r} is not an integer; labels are class indices 0..num_labels-1")
    if y < 0 or (num_labels is not None and y >= num_labels):
        bound = f"[0, {num_labels})" if num_labels is not None else ">= 0"
        raise DataError(f"{where}: label {y} is outside {bound}; fix the label or the task's num_labels in the pool")
    return y


def _target(row: dict, where: str, classes: list[str] | None, allowed: set[str] | None, classes_key: str,
            tokenizer=None) -> str:
    """The row's target answer (an LM's expected output), or a DataError with the fix."""
    if "target" not in row:
        raise DataError(f"{where} has no 'target' (needed for evaluation); add the expected answer as a string "
                        '"target" next to "text"')
    y = row["target"]
    if not isinstance(y, str) or not y.strip():
        raise DataError(f"{where}: target {y!r} is not a non-empty string; write the expected answer as text")
    if allowed is not None and y.strip() not in allowed:
        raise DataError(f"{where}: target {y!r} is not one of the task's classes {classes}; fix the target "
                        f"or {classes_key}")
    if tokenizer is not None and allowed is None and not tokenizer(y, add_special_tokens=False)["input_ids"]:
        raise DataError(f"{where}: target {y!r} has no tokens under the base model's tokenizer, so there is "
                        "nothing to score; write the expected answer as words the tokenizer keeps")
    return y


def read_split(pool, task: str, split: str, need_labels: bool = False,
               needed_by: str | None = None, tokenizer=None) -> tuple[list[str], list[int]]:
    """Texts and, with ``need_labels``, the answers of ``task``'s ``split`` file (``calibration``,
    ``test`` or ``validation``) in the pool: integer labels checked against the task's ``num_labels``
    (sequence classification), or target strings checked against the task's ``classes`` when it has
    them (causal/seq2seq LMs; with a ``tokenizer``, that they have tokens), or image paths (CLIP), as the
    pool's family reads them (adamerge/families/). A DataError naming the task and the pool key when it
    has no such file. The one way methods, the data module and evaluation read a task's data."""
    spec = pool.tasks[task]
    path = getattr(spec, split, None)
    if not path:
        who = f" ({needed_by} needs one)" if needed_by else ""
        raise DataError(f"task '{task}' has no {split} file in the pool config{who}; add pool tasks.{task}.{split}")
    return pool.family.read_split(pool, task, split, path, need_labels, tokenizer)


def labelled_splits(pool, split: str, max_examples: int | None = None) -> Iterator[tuple[str, list, list]]:
    """(task, inputs, answers) of every task with a labelled ``split`` file, the first ``max_examples`` rows
    of each (all when None): what each family's test sets are built from."""
    for name, spec in pool.tasks.items():
        if getattr(spec, split):
            inputs, answers = read_split(pool, name, split, need_labels=True)
            yield name, inputs[:max_examples], answers[:max_examples]


def check_data(pool) -> None:
    """Read every data file the pool names, before anything is trained: each line JSON with a string
    'text'; test, validation and attack labels integers in [0, num_labels) (sequence classification pools) or
    string targets, one of the task's ``classes`` when it has them (causal and seq2seq LM pools; seq2seq:
    label words and targets with tokens), or image files (clip_zero_shot pools): the pool's family reads
    each file (adamerge/families/).
    Raises DataError naming task, file, line and the fix."""
    family = pool.family
    tok = family.check_data(pool)
    labelled = family.evaluated  # the answers of evaluated pools' test and validation files are checked
    for name, spec in pool.tasks.items():
        for key in TEXT_FILES:
            if getattr(spec, key):
                read_split(pool, name, key, need_labels=labelled and key != "calibration", tokenizer=tok)


def load_tokenizer(path: str | Path, causal: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if causal:
        tok.padding_side = "right"  # entropy masks assume padding at the end
    return tok


def encode(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop padding columns no row of this batch uses (inputs are padded to max_length once)."""
    if "attention_mask" not in batch:  # images: nothing padded
        return batch
    n = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :n] for k, v in batch.items()}


def batches(enc: dict[str, torch.Tensor], size: int, device: torch.device | str | None = None) -> list[dict]:
    """``enc`` cut into consecutive batches of ``size`` rows, each trimmed to its longest row."""
    n = next(iter(enc.values())).shape[0]
    return [trim({k: v[i:i + size].to(device) if device else v[i:i + size] for k, v in enc.items()})
            for i in range(0, n, size)]


def step_indices(n: int, batch_size: int, step: int, seed: int, task_idx: int) -> torch.Tensor:
    """Indices of one task's global batch at ``step``: consecutive slices of seeded permutations."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, pos = divmod(start + len(out), n)
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + task_idx * 7_919 + epoch)
        perm = torch.randperm(n, generator=g)
        out.extend(perm[pos: pos + batch_size - len(out)].tolist())
    return torch.tensor(out)


# The seeded batch streams of a run, one per purpose, so that no two purposes step through the same batches:
# training's, the fixed batches on which start and end are compared (adamerge/run/start_vs_end.py), and
# FW-Merging's inner AdaMerging steps.
STREAM_SEEDS = {"train": 0, "monitor": 1, "fw_inner": 2}


def stream(encoded: dict[str, dict[str, torch.Tensor]], batch_size: int, seed: int, purpose: str,
           **kwargs) -> StepBatches:
    """The run's batch stream for ``purpose`` (one of STREAM_SEEDS)."""
    return StepBatches(encoded, batch_size, seed + STREAM_SEEDS[purpose], **kwargs)


class StepBatches(IterableDataset):
    """Infinite stream: item s is {task: inputs} for micro-step s, this rank's slice only."""

    def __init__(self, encoded: dict[str, dict[str, torch.Tensor]], batch_size: int, seed: int,
                 start: int = 0, rank: int = 0, world: int = 1):
        self.encoded, self.batch_size, self.seed = encoded, batch_size, seed
        self.start, self.rank, self.world = start, rank, world

    def batch(self, step: int) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for k, (task, enc) in enumerate(self.encoded.items()):
            n = next(iter(enc.values())).shape[0]
            idx = step_indices(n, self.batch_size, step, self.seed, k)[self.rank:: self.world]
            out[task] = trim({name: v[idx] for name, v in enc.items()})
        return out

    def __iter__(self):
        step = self.start
        while True:
            yield self.batch(step)
            step += 1


def split_holdout(items: list, fraction: float, seed: int, task_idx: int) -> tuple[list, list]:
    """(training, held-out) items: a seeded ``fraction`` of them held out (at least one when there are two
    or more, never all), the rest kept in their order. The draw depends on (seed, task), not on the other
    tasks, so one task's held-out texts do not change when another task's file does."""
    n = len(items)
    k = min(n - 1, max(1, round(fraction * n))) if fraction > 0 and n > 1 else 0
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + task_idx * 7_919 + 104_729)
    held = set(torch.randperm(n, generator=g)[:k].tolist())
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
