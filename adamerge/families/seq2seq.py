"""Encoder-decoder LMs (``model_class: seq2seq_lm``: T5, Flan-T5): the family's forward, checks and evaluation.

Training looks at one decoder step. The encoder reads the calibration text; the decoder gets one token,
the model's ``decoder_start_token_id``; the objective sees the logits of that first step,
``[batch, vocab]``, with no mask (``first_step_inputs``, used by ``MergeMethod.task_logits`` and by the
forwards of Expert Merging, Fisher and RegMean). AdaMerging's entropy and Expert Merging's logit KL are
then taken on the distribution of the answer's first token, as FusionBench does for Flan-T5.

Evaluation reads the ``{"text": input, "target": answer}`` lines of the causal LMs (adamerge/families/causal.py,
whose loading, tokenization and padding are reused):

- the task has ``classes`` (label words): each word is scored by the sum of its tokens' log-probabilities
  under the decoder, teacher-forced after the start token (tokens as written, no eos); the encoder runs once
  per input; the most likely word is the prediction, correct when it is the target;
- no ``classes``: the first token greedily generated (the argmax of the first decoder step) is compared
  with the target's first token.

Inputs go to the encoder with the tokenizer's special tokens (e.g. T5's ``</s>``) and are not truncated.
Only ``input_ids`` and ``attention_mask`` reach the model: a tokenizer's ``token_type_ids`` have no meaning
for T5 and are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from ..errors import PoolError
from ..evaluate import shard_examples
from .base import register_family
from .causal import TextAnswers, load_lm_test_sets, pad_id, right_padded, word_ids

ENCODER_KEYS = ("input_ids", "attention_mask")


def decoder_start_id(model: torch.nn.Module) -> int:
    """The token the decoder starts from (``config.decoder_start_token_id``); a PoolError naming the fix."""
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        raise PoolError(f"base model ({getattr(model.config, '_name_or_path', '') or type(model).__name__}): its "
                        "config has no decoder_start_token_id, which a seq2seq_lm pool's first decoder step "
                        "needs; set decoder_start_token_id in its config.json (T5: the pad id, 0)")
    return int(start)


def first_step_inputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict:
    """Forward kwargs for one decoder step: the encoder inputs of ``inputs`` and ``decoder_input_ids`` ``[n, 1]``,
    every row the model's decoder start token (no key/value cache)."""
    ids = inputs["input_ids"]
    out: dict = {k: v for k, v in inputs.items() if k in ENCODER_KEYS}
    out["decoder_input_ids"] = torch.full((ids.shape[0], 1), decoder_start_id(model), dtype=ids.dtype,
                                          device=ids.device)
    out["use_cache"] = False
    return out


def first_step_logits(model: torch.nn.Module, params: dict[str, torch.Tensor] | None,
                      inputs: dict[str, torch.Tensor], **kwargs):
    """(``[n, vocab]`` logits of the first decoder step, the model's output) of ``model`` run with ``params``."""
    out = functional_call(model, params or {}, args=(), kwargs={**first_step_inputs(model, inputs), **kwargs})
    return out.logits[:, 0], out


def check_pool(pool, tokenizer) -> None:
    """Before anything trains: the base has a decoder start token and each task's label words have tokens."""
    decoder_start_id(pool.base_model)
    for name, spec in pool.tasks.items():
        for w in spec.classes or []:
            word_ids(tokenizer, w, f"pool.tasks.{name}.classes")


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
@dataclass
class Seq2SeqTestSet:
    """One task's seq2seq test data, tokenized; shortest inputs first (accuracy ignores the order)."""

    prompts: list[list[int]]  # encoder input ids (with the tokenizer's special tokens)
    targets: list[str]
    pad_id: int
    classes: list[list[int]] | None = None  # token ids of each label word (label-word scoring)
    answers: list[int] | None = None  # classes: the target's index among them; else: its first token id

    def __len__(self) -> int:
        return len(self.prompts)

    def shard(self, rank: int, world: int) -> Seq2SeqTestSet:
        """Examples rank, rank + world, … (one DDP process's share)."""
        return shard_examples(self, ("prompts", "targets", "answers"), rank, world)

    def accuracy(self, base: torch.nn.Module, params: dict[str, torch.Tensor], batch_size: int = 64) -> float:
        return seq2seq_accuracy(base, params, self, batch_size)


def load_seq2seq_test_sets(pool, tokenizer, max_examples: int | None = None,
                           split: str = "test") -> dict[str, Seq2SeqTestSet]:
    """{task: Seq2SeqTestSet} from each task's ``split`` file; tasks without one are left out. The rows are
    read and checked as a causal LM's (``load_lm_test_sets``): inputs, targets and label words alike."""
    out = {}
    for name, ts in load_lm_test_sets(pool, tokenizer, max_examples, split, max_new_tokens=1).items():
        answers = ts.answers if ts.classes is not None else [
            word_ids(tokenizer, t, f"task '{name}': a target in {split}")[0] for t in ts.targets]
        out[name] = Seq2SeqTestSet(ts.prompts, ts.targets, pad_id(tokenizer), ts.classes, answers)
    return out


@torch.no_grad()
def class_loglik(base: torch.nn.Module, params: dict[str, torch.Tensor], prompts: list[list[int]],
                 classes: list[list[int]], pad_id: int = 0, batch_size: int = 64) -> torch.Tensor:
    """[N, C]: log p(class word c | input n) under the decoder, summed over the word's tokens (teacher-forced
    after the start token). The encoder runs once per input; ``batch_size`` bounds the decoder rows."""
    from transformers.modeling_outputs import BaseModelOutput

    device = next(base.parameters()).device
    C, width = len(classes), max(len(c) for c in classes)
    start = decoder_start_id(base)
    # decoder input: start + the word but its last token; right padding is never read (causal decoder)
    dec = torch.tensor([[start] + c[:-1] + [pad_id] * (width - len(c)) for c in classes], device=device)
    tok = torch.tensor([c + [0] * (width - len(c)) for c in classes], device=device)
    valid = torch.tensor([[j < len(c) for j in range(width)] for c in classes], device=device)
    out = torch.empty(len(prompts), C, dtype=torch.float64)
    step = max(1, batch_size // C)
    for i in range(0, len(prompts), step):
        ids, mask = right_padded(prompts[i:i + step], pad_id, device=device)
        n = ids.shape[0]
        _, first = first_step_logits(base, params, {"input_ids": ids, "attention_mask": mask})
        enc = BaseModelOutput(last_hidden_state=first.encoder_last_hidden_state.repeat_interleave(C, 0))
        logits = functional_call(base, params, args=(), kwargs={
            "encoder_outputs": enc, "attention_mask": mask.repeat_interleave(C, 0),
            "decoder_input_ids": dec.repeat(n, 1), "use_cache": False}).logits
        logp = logits.float().log_softmax(-1).gather(-1, tok.repeat(n, 1)[..., None])[..., 0]
        out[i:i + n] = (logp * valid.repeat(n, 1)).sum(-1).view(n, C).double().cpu()
    return out


@torch.no_grad()
def first_tokens(base: torch.nn.Module, params: dict[str, torch.Tensor], prompts: list[list[int]],
                 pad_id: int = 0, batch_size: int = 64) -> list[int]:
    """The first token greedy generation would give for each input: the argmax of the first decoder step."""
    device = next(base.parameters()).device
    out: list[int] = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = right_padded(prompts[i:i + batch_size], pad_id, device=device)
        out += first_step_logits(base, params, {"input_ids": ids, "attention_mask": mask})[0].argmax(-1).tolist()
    return out


def seq2seq_accuracy(base: torch.nn.Module, params: dict[str, torch.Tensor], ts: Seq2SeqTestSet,
                     batch_size: int = 64) -> float:
    """Fraction of ``ts``'s examples answered correctly by ``base`` run with ``params``."""
    if ts.classes is not None:
        pred = class_loglik(base, params, ts.prompts, ts.classes, ts.pad_id, batch_size).argmax(1).tolist()
    else:
        pred = first_tokens(base, params, ts.prompts, ts.pad_id, batch_size)
    return sum(p == a for p, a in zip(pred, ts.answers)) / len(ts)


@register_family
class Seq2SeqLM(TextAnswers):
    name = "seq2seq_lm"
    auto_class = "AutoModelForSeq2SeqLM"
    hidden_states = False  # the objectives see the first decoder step's logits only

    def check_data(self, pool) -> Any:
        tokenizer = pool.tokenizer()  # the tokenizer training and evaluation use
        check_pool(pool, tokenizer)
        return tokenizer  # targets are checked to have tokens

    def model_inputs(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict:
        return first_step_inputs(model, inputs)

    def logits(self, out, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, None]:
        return out.logits[:, 0], None

    def load_test_sets(self, pool, tokenizer, max_length: int, max_examples: int | None, split: str,
                       max_new_tokens: int) -> dict[str, Seq2SeqTestSet]:
        return load_seq2seq_test_sets(pool, tokenizer, max_examples, split)
