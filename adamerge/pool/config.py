"""Pool configs: the ``pool`` group's dict (explicit, or a recipe file that builds it) to a ModelPool."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

from ..errors import DataError, PoolError, refuse_unknown_keys
from ..families import get_family
from ..run.data import TEXT_FILES
from . import hub
from .model_pool import ModelPool, TaskSpec

# data_dir: only for the pool yaml's own interpolations (``${pool.data_dir}/<task>/test.jsonl``)
POOL_KEYS = ["base", "tasks", "model_class", "head_prefixes", "check_finite", "check_fine_tuned", "data_dir"]

log = logging.getLogger(__name__)


def pool_from_config(cfg: dict, base_in_memory: bool = True) -> ModelPool:
    """Build a ModelPool from a plain dict (the ``pool`` config group, recipe already resolved);
    ``base_in_memory=False``: the base read tensor by tensor from its files (a streamed merge).

    ``hf://`` references (``base``, a task's ``expert``) are resolved to local directories (adamerge/pool/hub.py)
    once every key is checked and before anything loads."""
    for key in ("base", "tasks"):
        if key not in cfg or cfg[key] in (None, "", {}):
            raise PoolError(f"pool config: key '{key}' is required")
    refuse_unknown_keys(cfg, POOL_KEYS, "pool", "a pool config", PoolError)
    model_class = cfg.get("model_class", "sequence_classification")
    family = get_family(model_class)
    tasks = {}
    task_keys = [f.name for f in dataclasses.fields(TaskSpec) if f.name != "name"]
    for name, t in cfg["tasks"].items():
        if isinstance(t, str):
            t = {"expert": t}
        refuse_unknown_keys(t, task_keys, f"pool.tasks.{name}", f"task '{name}'", PoolError)
        if "expert" not in t:
            raise PoolError(f"pool config: task '{name}' has no 'expert' path")
        tasks[name] = TaskSpec(
            name=name, expert=t["expert"], calibration=t.get("calibration"), test=t.get("test"),
            validation=t.get("validation"), optimizer_state=t.get("optimizer_state"), attack_test=t.get("attack_test"),
            attack_clean=t.get("attack_clean"),
            num_labels=t.get("num_labels"), label_names=list(t["label_names"]) if t.get("label_names") else None,
            classes=family.check_classes(name, t.get("classes")),
            templates=family.check_templates(name, t.get("templates")),
        )
    expert_keys = {n: f"pool.tasks.{n}.expert" for n in tasks}
    refs = hub.resolve({"pool.base": cfg["base"], **{expert_keys[n]: t.expert for n, t in tasks.items()}},
                       before_download=lambda: check_data_paths(tasks))
    for n, t in tasks.items():
        if expert_keys[n] in refs:
            t.expert = refs[expert_keys[n]].path
    warn_shared_experts(tasks)
    pool = ModelPool(
        refs["pool.base"].path if "pool.base" in refs else cfg["base"], tasks, model_class=model_class,
        head_prefixes=list(cfg.get("head_prefixes", ["classifier."])),
        check_finite=cfg.get("check_finite", True),
        check_fine_tuned=cfg.get("check_fine_tuned", True), base_in_memory=base_in_memory,
    )
    pool.sources = {key: hub.describe(r) for key, r in refs.items()}
    return pool


def warn_shared_experts(tasks: dict[str, TaskSpec]) -> None:
    """One warning per expert directory given for more than one task: allowed (one model may serve several
    tasks), but it is usually a copy-paste slip, and the merge then counts that expert twice."""
    by_path: dict[str, list[str]] = {}
    for name, spec in tasks.items():
        by_path.setdefault(str(Path(spec.expert).resolve()), []).append(name)
    for path, names in by_path.items():
        if len(names) > 1:
            log.warning("tasks %s all use the expert %s: it is merged once per task (check pool.tasks.<task>.expert)",
                        " and ".join(f"'{n}'" for n in names), path)


def check_data_paths(tasks: dict[str, TaskSpec]) -> None:
    """Each task's data paths exist (a DataError naming the key otherwise): run before hub models are
    downloaded; the files themselves are read by ``adamerge.run.data.check_data`` once the pool has loaded."""
    for name, spec in tasks.items():
        for key in (*TEXT_FILES, "optimizer_state"):
            path = getattr(spec, key)
            if path and not Path(path).exists():
                raise DataError(f"task '{name}': {key} path {path} does not exist; fix the path under pool "
                                f"tasks.{name}.{key} (checked before the pool's hub models are downloaded)")


def load_recipe(path: str | Path):
    """The recipe file at ``path`` as a module (a file, not an installed package: data/ recipes); the modules
    beside it are importable from it."""
    import importlib.util

    path = Path(path)
    if not path.exists():
        raise PoolError(f"pool recipe {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"adamerge_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # a recipe may import the modules beside it (data/benchmark.py does)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def resolve_recipe(cfg: dict, root: str | Path) -> dict:
    """A pool config with ``recipe: path/to/file.py`` is built by that file's ``build(cfg)``.

    The recipe returns the explicit form (base, model_class, head_prefixes, tasks); explicit
    configs are returned unchanged.
    """
    if not cfg.get("recipe"):
        return cfg
    out = load_recipe(Path(root) / cfg["recipe"]).build({k: v for k, v in cfg.items() if k not in ("recipe", "head_prefixes")})
    if cfg.get("head_prefixes"):  # the config decides which tensors are per-task heads (not merged)
        out["head_prefixes"] = list(cfg["head_prefixes"])
    return out
