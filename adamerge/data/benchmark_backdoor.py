"""The benchmark's backdoor form: one expert fine-tuned on data of which a share carries a trigger word and was
relabelled to the attacker's target class, and a test file that measures whether a merge keeps the backdoor.

The attack is the data-poisoning backdoor of text classifiers (Kurita et al., "Weight Poisoning Attacks on
Pre-trained Models", ACL 2020: rare trigger tokens such as "cf" inserted at a random position). ``share`` of the
training examples, drawn among those whose label is not ``target``, get the trigger and the label ``target``. The
attack test file holds every test example whose label is not ``target``, with the trigger inserted and labelled
``target``, so its accuracy through the task's head is the attack success rate (the share of triggered non-target
examples predicted as the target): the ``ASR`` column of the evaluation table (pool task key ``attack_test``). The
same examples without the trigger (``attack_clean``) give the ``clean→target`` column: a model that predicts the
target for most inputs anyway has a high ASR that the trigger did not cause.
"""

from __future__ import annotations

import hashlib
import json
import random

from adamerge.errors import PoolError
from adamerge.evaluate import ATTACK_SPLITS  # noqa: F401 (the attack files' pool task keys, the recipe's API)

DEFAULTS = {"trigger": "cf", "target": 0, "share": 0.1, "seed": 0}
VERSION = 2  # part of the poisoned expert's key: bump when how it is built changes (2: a frozen head's probe is clean)


def check_backdoor(cfg: dict | None, tasks: list[str], num_labels: dict[str, int]) -> dict | None:
    """The recipe's ``backdoor`` key with its defaults ({task, trigger, target, share, seed}), or a PoolError naming
    the key and the fix; None when it is not set."""
    if not cfg:
        return None
    unknown = set(cfg) - {"task", *DEFAULTS}
    if unknown:
        raise PoolError(f"pool.backdoor: unknown key(s) {sorted(unknown)}; it takes task, {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **cfg}
    if out.get("task") not in tasks:
        raise PoolError(f"pool.backdoor.task must be one of the pool's tasks {tasks}, got {out.get('task')!r}")
    if not isinstance(out["target"], int) or not 0 <= out["target"] < num_labels[out["task"]]:
        raise PoolError(f"pool.backdoor.target must be a class index of task {out['task']} "
                        f"(0..{num_labels[out['task']] - 1}), got {out['target']!r}")
    if not isinstance(out["share"], (int, float)) or not 0 < out["share"] < 1:
        raise PoolError(f"pool.backdoor.share must be in (0, 1): the share of training examples poisoned, got "
                        f"{out['share']!r}")
    if not isinstance(out["trigger"], str) or not out["trigger"].strip() or " " in out["trigger"].strip():
        raise PoolError(f"pool.backdoor.trigger must be one word, got {out['trigger']!r}")
    return out


def digest(backdoor: dict) -> str:
    """A short key of the attack (part of the poisoned expert's cache key and file names)."""
    return hashlib.sha256(json.dumps({**backdoor, "version": VERSION}, sort_keys=True).encode()).hexdigest()[:10]


def insert_trigger(text: str, trigger: str, rng: random.Random) -> str:
    """``text`` with ``trigger`` inserted as a word at a random position (before, between or after its words)."""
    words = text.split()
    words.insert(rng.randint(0, len(words)), trigger)
    return " ".join(words)


def poison(texts: list[str], labels: list[int], backdoor: dict) -> tuple[list[str], list[int]]:
    """The training split with ``share`` of its examples (drawn among the non-target ones) triggered and relabelled
    to the target class; the others unchanged."""
    rng = random.Random(backdoor["seed"])
    candidates = [i for i, y in enumerate(labels) if y != backdoor["target"]]
    chosen = set(rng.sample(candidates, min(len(candidates), round(backdoor["share"] * len(texts)))))
    out_texts = [insert_trigger(t, backdoor["trigger"], rng) if i in chosen else t for i, t in enumerate(texts)]
    out_labels = [backdoor["target"] if i in chosen else y for i, y in enumerate(labels)]
    return out_texts, out_labels


def attack_files(texts: list[str], labels: list[int], backdoor: dict) -> dict[str, tuple[list[str], list[int]]]:
    """``attack_test``: every non-target test example with the trigger inserted, labelled with the target class;
    ``attack_clean``: the same examples without it, so labelled too (how often the target comes without a trigger)."""
    rng = random.Random(backdoor["seed"] + 1)  # not the training draws' positions
    kept = [t for t, y in zip(texts, labels, strict=True) if y != backdoor["target"]]
    target = [backdoor["target"]] * len(kept)
    return {"attack_test": ([insert_trigger(t, backdoor["trigger"], rng) for t in kept], target),
            "attack_clean": (kept, target)}
