"""Streamed data-free merges: one tensor at a time from the experts' files into the export's shards.

A static merge (weight average, task arithmetic, TIES, DARE, consensus, LiNeS: adamerge/methods/static.py)
is per tensor once its model-wide statistics are known (TIES' top-k thresholds and majority sign,
adamerge/core/transforms.py). Each statistic is one pass over the tensors; the last pass merges each
tensor with the kernel MergedModel uses (adamerge/core/combine.py) and writes it at its place in the
output shards (adamerge/safetensors_writer.py). The base is read from its files too (``ModelPool`` with
``base_in_memory=False``), so memory holds a few tensors' stacks, never K models nor the merged one, and
the result equals the in-memory merge bit for bit (tests/test_streaming.py).

``task_vectors.stream``: ``auto`` streams a data-free merge run without evaluation (``evaluate.enabled=false``)
whose experts are local full checkpoints; ``true`` insists (one line says why it cannot); ``false`` never streams.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .core.coefficients import Coefficients
from .core.combine import combine
from .core.merged_model import tied_sources
from .core.task_vectors import resolve_dtype, select_names
from .core.tensor_stream import expert_rows, logged_passes, tensor_stacks
from .core.transforms import build_stages, fit_stages, streamed
from .errors import ConfigError
from .export import write_export
from .model_files import export_dtype, save_model_config, write_weights

log = logging.getLogger(__name__)


def refusal(c: dict) -> str | None:
    """Why the run ``c`` (a resolved config) cannot stream (None: it can), known before the pool loads."""
    from .families import get_family
    from .methods import get_method
    from .methods.method_config import PER_TASK_RULES
    from .methods.static import StaticMerge
    from .run.distributed import several_processes

    cls = get_method(c["method"]["name"])
    if cls is not StaticMerge:
        return f"method {c['method'].get('id')} is not a per-tensor data-free merge"
    per_task = [key for key in PER_TASK_RULES if c["method"].get(key)]
    if per_task:
        return f"a model per task (method.{per_task[0]}) is evaluated and exported in memory"
    if c["method"].get("start_from"):
        return "method.start_from re-expresses the task vectors against a merge held in memory"
    if c["evaluate"]["enabled"]:
        return "evaluation needs the merged model in memory (set evaluate.enabled=false)"
    if c["task_vectors"].get("shard"):
        return "task_vectors.shard splits task vectors held in memory"
    if several_processes(c.get("trainer") or {}):
        return "a streamed merge runs in one process (drop trainer=ddp)"
    if not get_family(c["pool"].get("model_class", "sequence_classification")).streams:
        return f"a {c['pool'].get('model_class')} pool builds its heads from the base in memory"
    return None


def may_have_lora_experts(c: dict) -> bool:
    """Whether an expert of the pool config is, or may be, a PEFT adapter (merged in memory: LoRA in, LoRA out): an
    adapter directory, or a hub reference (``hf://``, resolved only when the pool loads)."""
    experts = [str(t.get("expert", "")) for t in (c["pool"].get("tasks") or {}).values()]
    return any(e.startswith("hf://") or (Path(e) / "adapter_config.json").is_file() for e in experts)


def should_stream(c: dict) -> bool:
    """``task_vectors.stream`` resolved for the run ``c``: a ConfigError when ``true`` cannot be honoured."""
    mode = c["task_vectors"].get("stream", "auto")
    if mode is False:
        return False
    why = refusal(c)
    if mode is True and why:
        raise ConfigError(f"task_vectors.stream=true: {why}")
    return why is None and (mode is True or not may_have_lora_experts(c))


def output_plan(pool, dtype: str | None) -> dict[str, tuple[str | None, tuple[int, ...], torch.dtype]]:
    """Each tensor of the exported model: name in the files -> (the pool's name of its value, or None for a
    tensor copied from the base's files as it is; shape; dtype). Names as in the base's files; a backbone
    export (``family.backbone_export``) keeps the backbone's tensors, named without its prefix."""
    tied = tied_sources(pool.base_model)  # a tied weight's own key in the files follows its source
    prefix = pool.base_model.base_model_prefix + "." if pool.family.backbone_export else ""
    plan = {}
    for key in pool.base_files.source.keys():
        canon = pool.canonical_name(key) or tied.get(key)
        if prefix and canon is not None and not canon.startswith(prefix):
            continue  # the base's own head: each task's is in heads/
        out = canon[len(prefix):] if prefix and canon is not None else key
        if canon is not None:
            p = pool._params[canon]
            shape, dt = tuple(p.shape), p.dtype
        else:
            t = pool.base_files.source.get(key)
            shape, dt = tuple(t.shape), t.dtype
        plan[out] = (canon, shape, export_dtype(dt, dtype))
    return plan


def stream_merge(pool, method_cfg, stages: list, tv_cfg: dict, model_dir: Path, dtype: str | None,
                 max_shard_size: str | None) -> list[str]:
    """Write the merged model (config and weights) into ``model_dir``, streamed, the task vectors through ``stages``
    (the config's transforms, adamerge/core/transforms.py); returns the merged tensors' names."""
    from .methods.static import StaticMerge

    names = select_names(pool.shared_names(), tv_cfg.get("include") or None, tv_cfg.get("exclude") or None)
    K = len(pool.task_names)
    # stages that read one expert at a time (OPCM) get each tensor's experts as they are asked for, not a K-row stack
    read = expert_rows if stages and all(s.reads_rows for s in stages) else tensor_stacks
    source = logged_passes(read(pool, names, resolve_dtype(tv_cfg.get("dtype", "float32")),
                                bool(tv_cfg.get("keep_unchanged", False))), len(names), "read")
    fit_stages(source, stages, K)
    coefs = Coefficients(K, 1, granularity="task", init=StaticMerge.scale(method_cfg, K))()[0]
    plan = output_plan(pool, dtype)
    save_model_config(pool.family.exported_module(pool.base_model), model_dir, dtype)

    def merged():
        for name, stack in streamed(source, stages)():
            w0 = pool.base_tensor(name)
            # w0 + Σ c τ as MergedModel.merged_params, added into the fresh sum (the same bits: + commutes)
            # a one-row stack (ExpertRows' stages) holds the merge in row 0: the rows after it would be zeros
            yield name, combine(coefs[:len(stack)], stack, w0.device).to(w0.dtype).add_(w0)

    def base_value(key: str, name: str | None) -> torch.Tensor:
        return pool.base_tensor(name) if name is not None else pool.base_files.source.get(key)

    for s in stages:
        s.open_state(model_dir.parent)
    names = write_weights(model_dir, plan, merged(), base_value, max_shard_size)
    for s in stages:
        s.write_state(model_dir.parent)
    return names


def stream_run(c: dict, out_dir: Path, run_config: dict[str, str]) -> str:
    """A streamed data-free merge: the pool with its base on the meta device, ``run_config`` (the files of
    ``.hydra/``; none on a process that is not the run's first) recorded, then the export (adamerge/export.py's
    layout: model, heads, coefficients, card). Returns the export directory."""
    from .atomic import atomic_write_text
    from .methods.static import StaticMerge
    from .pool.config import pool_from_config

    pool = pool_from_config(c["pool"], base_in_memory=False)
    for name, text in run_config.items():
        atomic_write_text(out_dir / ".hydra" / name, text)
    log.info("pool      %d experts (%s) on %s\nmethod    %s: data-free, streamed tensor by tensor\nout_dir   %s",
             len(pool.task_names), ", ".join(pool.task_names), pool.base_path, c["method"]["id"], out_dir)
    method_cfg = StaticMerge.parse_config(c["method"])
    K, ex = len(pool.task_names), c["export"]
    merged: list[str] = []
    stages = build_stages(method_cfg, pool=pool)

    def write_model(model_dir: Path) -> None:
        merged.extend(stream_merge(pool, method_cfg, stages, c["task_vectors"], model_dir, ex["dtype"],
                                   ex["max_shard_size"]))

    def report() -> dict:
        lam = StaticMerge.scale(method_cfg, K)
        row = list(lam) if isinstance(lam, list) else [lam] * K
        rep = {"method": method_cfg.label, "tasks": pool.task_names, "tensors": merged, "granularity": "task",
               "coefficients": [row for _ in merged], "num_trainable": 0, "streamed": True}
        for s in stages:
            rep.update(s.report())
        return rep

    export_dir = Path(ex["dir"])
    write_export(pool, export_dir, write_model, report, ex["overwrite"], None, None, c["method"],
                 ex["task_models"], ex["dtype"], ex["max_shard_size"], plot=False)  # one λ everywhere: no heatmap
    return str(export_dir)
