"""``model_class: causal_lm``: decoder-only LMs; the objectives see next-token logits, padding masked.

Evaluation gives the same per-task table as the classifiers' (adamerge/evaluate.py).

A task's test (or validation) file holds ``{"text": prompt, "target": answer}`` lines. Two ways to score:

- the task has ``classes`` (label words): each label word, all its tokens, is scored by its
  log-likelihood after the prompt (teacher-forced, summed over its tokens); the prediction is the most
  likely word, correct when it is the target;
- no ``classes``: greedy generation of as many tokens as the target has (at most
  ``evaluate.max_new_tokens``), stopped at the tokenizer's eos; correct when the decoded text equals
  the target, surrounding whitespace ignored.

Every forward is ``functional_call(base, params, ...)`` with the weights under evaluation. Sequences
are padded on the right, so positions are those of the unpadded sequence for any model. Generation
re-runs the whole sequence for each new token (no key/value cache): simple, model-agnostic, and
affordable for short answers. Prompts are not truncated (``data.max_length`` is the calibration length).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from ..errors import DataError
from ..evaluate import shard_examples
from ..run.data import labelled_splits, read_jsonl
from .base import ModelFamily, check_names, register_family


@dataclass
class LMTestSet:
    """One task's causal-LM test data, tokenized; shortest prompts first (accuracy ignores the order)."""

    prompts: list[list[int]]  # token ids of each prompt (with the tokenizer's special tokens, e.g. BOS)
    targets: list[str]
    tokenizer: Any  # decodes generations; gives pad and eos ids
    classes: list[list[int]] | None = None  # token ids of each label word (label-word scoring)
    answers: list[int] | None = None  # index of each example's target among the classes
    max_new: list[int] | None = None  # exact match: tokens to generate for each example

    def __len__(self) -> int:
        return len(self.prompts)

    def shard(self, rank: int, world: int) -> LMTestSet:
        """Examples rank, rank + world, … (one DDP process's share)."""
        return shard_examples(self, ("prompts", "targets", "answers", "max_new"), rank, world)

    def accuracy(self, base: torch.nn.Module, params: dict[str, torch.Tensor], batch_size: int = 64) -> float:
        return lm_accuracy(base, params, self, batch_size)


def load_lm_test_sets(pool, tokenizer, max_examples: int | None = None, split: str = "test",
                      max_new_tokens: int = 16) -> dict[str, LMTestSet]:
    """{task: LMTestSet} from each task's ``split`` file (``test`` or ``validation``); tasks without one
    are left out. Targets were checked (present; one of the classes) by ``read_split``."""
    out = {}
    for name, texts, targets in labelled_splits(pool, split, max_examples):
        spec = pool.tasks[name]
        prompts = [prompt_ids(tokenizer, t, f"task '{name}': {split} file {getattr(spec, split)}") for t in texts]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # stable: ties keep file order
        prompts, targets = [prompts[i] for i in order], [targets[i] for i in order]
        ts = LMTestSet(prompts, targets, tokenizer)
        if spec.classes:
            ts.classes = [word_ids(tokenizer, w, f"pool.tasks.{name}.classes") for w in spec.classes]
            stripped = [w.strip() for w in spec.classes]
            ts.answers = [stripped.index(t.strip()) for t in targets]
        else:
            ts.max_new = [min(len(word_ids(tokenizer, t, f"task '{name}': a target in {split}")), max_new_tokens)
                          for t in targets]
        out[name] = ts
    return out


def prompt_ids(tokenizer, text: str, where: str) -> list[int]:
    """The prompt's token ids with the tokenizer's special tokens (as calibration texts are encoded);
    the BOS token alone when the text has none, since the first answer token needs a position before it."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]
    if not ids:
        raise DataError(f"{where}: the prompt {text!r} has no tokens and the tokenizer no BOS token; "
                        "give every line a non-empty \"text\"")
    return ids


def word_ids(tokenizer, text: str, where: str) -> list[int]:
    """A label word's or target's token ids as written (no special tokens): for BPE tokenizers such as
    GPT-2's, write a leading space when the prompt does not end in one."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise DataError(f"{where}: {text!r} has no tokens; give a non-empty word")
    return ids


def right_padded(seqs: list[list[int]], pad_id: int, width: int | None = None,
                  device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``seqs`` padded at the end to ``width`` (the longest by default)."""
    width = width or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else 0  # padded positions are masked: any id will do


@torch.no_grad()
def class_loglik(base: torch.nn.Module, params: dict[str, torch.Tensor], prompts: list[list[int]],
                 classes: list[list[int]], pad_id: int = 0, batch_size: int = 64) -> torch.Tensor:
    """[N, C]: log p(class word c | prompt n), summed over the word's tokens (teacher-forced)."""
    device = next(base.parameters()).device
    rows = [(n, c) for n in range(len(prompts)) for c in range(len(classes))]
    out = torch.empty(len(prompts), len(classes), dtype=torch.float64)
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        ids, mask = right_padded([prompts[n] + classes[c] for n, c in part], pad_id, device=device)
        logits = functional_call(base, params, args=(), kwargs={"input_ids": ids, "attention_mask": mask}).logits
        width = max(len(classes[c]) for _, c in part)
        # the word's j-th token sits at len(prompt) + j and is predicted at the position before it
        pos = torch.tensor([[len(prompts[n]) - 1 + min(j, len(classes[c]) - 1) for j in range(width)]
                            for n, c in part], device=device)
        tok = torch.tensor([classes[c] + [0] * (width - len(classes[c])) for _, c in part], device=device)
        valid = torch.tensor([[j < len(classes[c]) for j in range(width)] for _, c in part], device=device)
        picked = logits[torch.arange(len(part), device=device)[:, None], pos].float().log_softmax(-1)
        ll = (picked.gather(-1, tok[..., None])[..., 0] * valid).sum(-1)
        for (n, c), v in zip(part, ll.double().cpu()):
            out[n, c] = v
    return out


@torch.no_grad()
def greedy_generate(base: torch.nn.Module, params: dict[str, torch.Tensor], prompts: list[list[int]],
                    max_new: list[int], pad_id: int = 0, eos_id: int | None = None,
                    batch_size: int = 64) -> list[list[int]]:
    """Greedy continuation of each prompt: up to ``max_new[n]`` tokens, cut before the first ``eos_id``.
    A transformers causal LM decodes with its key/value cache (one new token per step after the prompt);
    any other module reruns the prefix each step."""
    cached = getattr(getattr(base, "config", None), "use_cache", None) is not None
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        ps, limits = prompts[i:i + batch_size], max_new[i:i + batch_size]
        tokens = (greedy_tokens_cached if cached else greedy_tokens)(base, params, ps, max(limits), pad_id)
        for row, limit in zip(tokens.tolist(), limits):
            row = row[:limit]
            out.append(row[:row.index(eos_id)] if eos_id is not None and eos_id in row else row)
    return out


def greedy_tokens(base: torch.nn.Module, params: dict[str, torch.Tensor], ps: list[list[int]], steps: int,
                  pad_id: int) -> torch.Tensor:
    """[N, steps] greedy tokens, the prompts padded on the right and the whole prefix run at every step."""
    device = next(base.parameters()).device
    lens = torch.tensor([len(p) for p in ps], device=device)
    ids, mask = right_padded(ps, pad_id, width=int(lens.max()) + steps, device=device)
    rows = torch.arange(len(ps), device=device)
    for step in range(steps):
        cur = lens + step  # where each row's next token goes
        width = int(cur.max())
        logits = functional_call(base, params, args=(),
                                 kwargs={"input_ids": ids[:, :width], "attention_mask": mask[:, :width]}).logits
        ids[rows, cur], mask[rows, cur] = logits[rows, cur - 1].argmax(-1), 1
    return ids[rows[:, None], lens[:, None] + torch.arange(steps, device=device)].cpu()


def greedy_tokens_cached(base: torch.nn.Module, params: dict[str, torch.Tensor], ps: list[list[int]], steps: int,
                         pad_id: int) -> torch.Tensor:
    """[N, steps] greedy tokens with the key/value cache: the prompts padded on the left (positions counted
    from each one's first real token), then one token per step against the cache."""
    device = next(base.parameters()).device
    width = max(len(p) for p in ps)
    ids = torch.full((len(ps), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(ps), width), dtype=torch.long, device=device)
    for r, p in enumerate(ps):
        ids[r, width - len(p):] = torch.tensor(p, device=device)
        mask[r, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # transformers 5 names the cache ``cache`` (earlier: ``past_key_values``), in the call and in the output
    cache_key = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    step_inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    tokens = []
    for _ in range(steps):
        out = functional_call(base, params, args=(), kwargs={**step_inputs, "use_cache": True})
        nxt = out.logits[:, -1].argmax(-1)
        tokens.append(nxt)
        mask = torch.cat([mask, mask.new_ones(len(ps), 1)], dim=1)
        positions = positions[:, -1:] + 1
        step_inputs = {"input_ids": nxt[:, None], "attention_mask": mask, "position_ids": positions,
                       cache_key: out[cache_key]}
    return torch.stack(tokens, dim=1).cpu()


def lm_accuracy(base: torch.nn.Module, params: dict[str, torch.Tensor], ts: LMTestSet,
                batch_size: int = 64) -> float:
    """Fraction of ``ts``'s examples answered correctly by ``base`` run with ``params``."""
    tok = ts.tokenizer
    if ts.classes is not None:
        pred = class_loglik(base, params, ts.prompts, ts.classes, pad_id(tok), batch_size).argmax(1)
        return float((pred == torch.tensor(ts.answers)).double().mean())
    gens = greedy_generate(base, params, ts.prompts, ts.max_new, pad_id(tok), tok.eos_token_id, batch_size)
    hits = [tok.decode(g, skip_special_tokens=True).strip() == t.strip() for g, t in zip(gens, ts.targets)]
    return sum(hits) / len(hits)


# ----------------------------------------------------------------------------------------------
# the families
# ----------------------------------------------------------------------------------------------
class TextAnswers(ModelFamily):
    """LMs whose tasks answer in text: test rows ``{"text", "target"}``, optional label words ``classes``."""

    evaluated = True

    def check_classes(self, task: str, classes) -> list[str] | None:
        """Label words: two or more distinct non-empty strings, or None (exact match)."""
        return None if classes is None else check_names(f"pool.tasks.{task}.classes", classes, "label words")

    def read_split(self, pool, task: str, split: str, path: str, need_labels: bool,
                   tokenizer=None) -> tuple[list, list]:
        if not need_labels:
            return read_jsonl(path, task, key=split)
        return read_jsonl(path, task, key=split, need_targets=True, classes=pool.tasks[task].classes,
                          tokenizer=tokenizer)


@register_family
class CausalLM(TextAnswers):
    name = "causal_lm"
    auto_class = "AutoModelForCausalLM"

    def load_tokenizer(self, pool) -> Any:
        from ..run.data import load_tokenizer

        return load_tokenizer(pool.base_path, causal=True)

    def model_inputs(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {**inputs, "use_cache": False}  # no key/value cache is needed for teacher forcing

    def logits(self, out, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return out.logits, inputs.get("attention_mask")

    def load_test_sets(self, pool, tokenizer, max_length: int, max_examples: int | None, split: str,
                       max_new_tokens: int) -> dict[str, LMTestSet]:
        return load_lm_test_sets(pool, tokenizer, max_examples, split, max_new_tokens)
