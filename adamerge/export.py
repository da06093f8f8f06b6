"""Export: merged model (``save_pretrained``), per-task heads, coefficients.json, heatmap — atomically.

Layout of an export directory::

    model/                 merged model, loadable with transformers ``from_pretrained`` (+ tokenizer); sequence
                           classification: the backbone alone (``AutoModel``; a sentence-transformers base's
                           modules beside it); clip_zero_shot: the vision tower,
                           ``CLIPVisionModelWithProjection``, + image processor (heads/ are zero-shot)
    tasks/<task>/          sequence classification: merged backbone + that task's head, config and labels
    lora/                  LoRA experts merged with task- or layer-wise coefficients: the merge as one PEFT
                           adapter (adamerge/lora_export.py)
    README.md              model card: base, experts, method and its config, coefficients, evaluation
    heads/<task>.safetensors, heads.json   each task's own head, so every task can be served
    coefficients.json, coefficients.png    the learned combination (and loss curve)
    eval.json, eval.md                     the evaluation table, when evaluated

Everything is written into a temporary sibling directory that is renamed into place at the end, so
an interrupted or failed export never leaves a half-written directory and never harms a previous one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import atomic_directory
from .lora_export import why_not_lora, write_lora_adapter
from .model_files import in_dtype, write_merged_model

log = logging.getLogger(__name__)


def plot_coefficients(report: dict, path: str | Path, losses: list[tuple[int, float]] | None = None) -> None:
    """Heatmap of the coefficients (tasks × merged tensors) and, when given, the loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = torch.tensor(report["coefficients"]).T  # [K, L]
    labels = list(report["tasks"])
    if report.get("mask_sparsity"):
        # one more row: the fraction of each tensor's entries the shared mask keeps
        keep = torch.tensor([1 - report["mask_sparsity"][n] for n in report["tensors"]]).unsqueeze(0)
        table = torch.cat([table, keep])
        labels.append("mask keep")
    n_plots = 2 if losses else 1
    fig, axes = plt.subplots(n_plots, 1, figsize=(max(6, 0.12 * table.shape[1] + 3), 2.2 + 0.4 * table.shape[0] + 3 * (n_plots - 1)),
                             squeeze=False)
    ax = axes[0, 0]
    im = ax.imshow(table.numpy(), aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("merged tensor (layer order)")
    ax.set_title(f"{report['method']}: coefficients ({report['granularity']}-wise)")
    fig.colorbar(im, ax=ax)
    if losses:
        steps, vals = zip(*losses)
        axes[1, 0].plot(steps, vals)
        axes[1, 0].set_xlabel("step")
        axes[1, 0].set_ylabel("loss")
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def model_card(pool, report: dict, method_cfg: dict | None, eval_md: str | None) -> str:
    """``README.md`` of an export: what was merged, how, how well, and how to load it."""
    table = report.get("coefficients")
    coefs = None if table is None else torch.tensor(table, dtype=torch.float64).reshape(-1, len(report["tasks"]))
    name = (method_cfg or {}).get("id") or report["method"]
    lines = [f"# Merged model: {name}", "", f"Base model: `{pool.sources.get('pool.base', pool.base_path)}`", "",
             "| task | expert | coefficient mean | min | max |", "|---|---|---|---|---|"]
    for k, task in enumerate(report["tasks"]):  # the combined models: the pool's experts, or FW's candidates
        expert = pool.sources.get(f"pool.tasks.{task}.expert", pool.tasks[task].expert) if task in pool.tasks else None
        source = f"`{expert}`" if expert else "candidate"
        if coefs is None:  # closed form: W = W0 + D
            lines.append(f"| {task} | {source} | – | – | – |")
            continue
        col = coefs[:, k]  # [L, K] table
        lines.append(f"| {task} | {source} | {col.mean():.4f} | {col.min():.4f} | {col.max():.4f} |")
    if report.get("note"):
        lines += ["", report["note"]]
    lines += ["", f"Method `{name}`, config:", "", "```json", json.dumps(method_cfg or {}, indent=2, default=str),
              "```", ""]
    if eval_md:
        lines += ["## Evaluation", "", eval_md.strip(), ""]
    lines += ["## How to load", ""]
    lines += pool.family.how_to_load(pool)
    return card_front_matter(pool, name) + "\n".join(lines) + "\n"


def card_front_matter(pool, method_id: str) -> str:
    """The Hub's model-card metadata (huggingface_hub ``ModelCardData``): the base model when it came from the
    hub (``hf://org/name``), tags ``merge``, ``adamerge`` and the method, and the library that loads it."""
    from huggingface_hub import ModelCardData

    source = str(pool.sources.get("pool.base", ""))
    base = source.removeprefix("hf://").split(" ")[0].split("@")[0] if source.startswith("hf://") else None
    data = ModelCardData(base_model=base, library_name="transformers", tags=["merge", "adamerge", method_id])
    return f"---\n{data.to_yaml()}\n---\n\n"


def export_merged(method, export_dir: str | Path, overwrite: bool = False, extra: dict[str, str] | None = None,
                  losses: list[tuple[int, float]] | None = None, method_cfg: dict | None = None,
                  task_models: bool = True, dtype: str | None = None, max_shard_size: str | None = None) -> Path:
    """Write the merged model, heads, per-task models, model card, coefficients and any ``extra`` text
    files, atomically; floating-point weights in ``dtype`` (None: as merged), model files of at most
    ``max_shard_size`` (None: transformers' default)."""
    pool = method.pool

    def write_model(model_dir: Path) -> None:
        write_merged_model(pool, method.merged, model_dir, dtype, max_shard_size)

    report = method.report()
    return write_export(pool, export_dir, write_model, lambda: report, overwrite, extra, losses, method_cfg,
                        task_models, dtype, max_shard_size, lora_method=method, stages=(*method.stages, method),
                        task_state=method.task_params if getattr(method, "per_task", False) else None)


def write_export(pool, export_dir: str | Path, write_model, make_report, overwrite: bool = False,
                 extra: dict[str, str] | None = None, losses: list[tuple[int, float]] | None = None,
                 method_cfg: dict | None = None, task_models: bool = True, dtype: str | None = None,
                 max_shard_size: str | None = None, lora_method=None, plot: bool = True, stages=(),
                 task_state=None) -> Path:
    """The export directory, atomically: ``write_model(model_dir)`` writes the merged model's weights and config
    (in memory: ``export_merged``; streamed: adamerge/streaming.py), then everything around them — tokenizer,
    LoRA adapter (``lora_method``'s merge, where it is one), heads, ``make_report()``'s coefficients (and their
    heatmap with ``plot``), per-task models, model card, and what the transform ``stages`` keep (``write_state``).
    ``task_state(task)`` (a method with one model per task): that task's merged tensors, written into its
    ``tasks/<task>`` model, for every model family."""
    shards = {"max_shard_size": max_shard_size} if max_shard_size else {}

    def write(tmp: Path) -> None:
        model_dir = tmp / "model"
        write_model(model_dir)
        for stage in stages:
            stage.write_state(tmp)
        copy_sentence_transformers_files(pool.base_path, model_dir)
        tok = None
        if pool.family.saves_tokenizer():  # not CLIP's: its export is the vision tower
            try:
                tok = pool.tokenizer()  # the one training and evaluation used
            except (OSError, ValueError):
                pass  # a base without a tokenizer exports the model alone
        if tok is not None:
            tok.save_pretrained(model_dir)
        if any(e.is_lora for e in pool.experts.values()):  # LoRA in, LoRA out where the merge is one
            reason = why_not_lora(lora_method) if lora_method is not None else "the merge was streamed"
            if reason is None:
                rank = write_lora_adapter(lora_method, tmp / "lora", str(pool.base_path))
                log.info("export/lora: the merge as one PEFT LoRA adapter of rank %d", rank)
            else:
                log.info("no export/lora: %s", reason)
        heads_meta = {}
        for task, spec in pool.tasks.items():
            head = {n: in_dtype(t, dtype).detach().cpu().contiguous() for n, t in pool.head(task).items()}
            if head:
                (tmp / "heads").mkdir(exist_ok=True)
                save_file(head, str(tmp / "heads" / f"{task}.safetensors"))
            heads_meta[task] = {"num_labels": pool.num_labels(task), "label_names": spec.label_names,
                                "tensors": sorted(head), "auto_class": pool.family.auto_class}
        (tmp / "heads.json").write_text(json.dumps(heads_meta, indent=2))
        report = make_report()
        (tmp / "coefficients.json").write_text(json.dumps(report, indent=2))
        if plot and report.get("coefficients") is not None:  # closed-form merges have no coefficient table
            plot_coefficients(report, tmp / "coefficients.png", losses)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        if task_models and (pool.family.task_models or task_state is not None):
            # model/ is the backbone alone: give each task a directory from_pretrained serves as is (a backbone copy each)
            for task in pool.tasks:
                task_model = load_task_model(tmp, task)
                if task_state is not None:  # its own merged tensors (names as in the pool's full model)
                    own = {n: in_dtype(v, dtype).cpu() for n, v in task_state(task).items()}
                    task_model.load_state_dict(own, strict=False)
                (task_model.to(getattr(torch, dtype)) if dtype else task_model).save_pretrained(tmp / "tasks" / task,
                                                                                                **shards)
                if tok is not None:
                    tok.save_pretrained(tmp / "tasks" / task)
        (tmp / "README.md").write_text(model_card(pool, report, method_cfg, (extra or {}).get("eval.md")))

    return atomic_directory(export_dir, overwrite, write)


def copy_sentence_transformers_files(base: Path, model_dir: Path) -> None:
    """A sentence-transformers base (``modules.json``): its module configs (pooling, normalisation) beside the
    merged backbone, so that ``SentenceTransformer(model_dir)`` loads the merge as an embedding model."""
    modules = base / "modules.json"
    if not modules.is_file() or not (model_dir / "config.json").is_file():
        return
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        if (base / name).is_file():
            shutil.copy2(base / name, model_dir / name)
    for module in json.loads(modules.read_text()):
        path = module.get("path", "")
        if path and (base / path).is_dir():  # "" is the transformer itself: the merge just written
            shutil.copytree(base / path, model_dir / path, dirs_exist_ok=True)


def load_task_model(export_dir: str | Path, task: str):
    """The exported merged model with ``task``'s head, as a ``transformers`` model ready to serve."""
    import transformers
    from safetensors.torch import load_file

    d = Path(export_dir)
    meta = json.loads((d / "heads.json").read_text())
    if task not in meta:
        raise KeyError(f"task '{task}' is not in {d / 'heads.json'} (tasks: {sorted(meta)})")
    m = meta[task]
    kwargs = {}
    if m.get("num_labels"):
        # the exported config carries the first task's label map: give this task's, of the right size
        names = m.get("label_names") or [f"LABEL_{i}" for i in range(m["num_labels"])]
        kwargs = {"num_labels": m["num_labels"], "id2label": dict(enumerate(names)),
                  "label2id": {v: i for i, v in enumerate(names)}}
    # the class the pool's family declares (heads.json; exports written before it say nothing: a classifier's)
    auto_class = getattr(transformers, m.get("auto_class", "AutoModelForSequenceClassification"))
    model = auto_class.from_pretrained(str(d / "model"), ignore_mismatched_sizes=True, **kwargs)
    head_file = d / "heads" / f"{task}.safetensors"
    if head_file.exists():
        missing = model.load_state_dict(load_file(str(head_file)), strict=False)
        if missing.unexpected_keys:
            raise KeyError(f"{head_file}: tensors {missing.unexpected_keys} do not fit the model")
    return model.eval()
