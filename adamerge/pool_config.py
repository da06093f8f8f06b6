"""Pool configs: the ``pool`` group's dict (explicit, or a recipe file that builds it) to a ModelPool."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .errors import PoolError, refuse_unknown_keys
from .families import get_family
from .pool import ModelPool, TaskSpec

POOL_KEYS = ["base", "tasks", "model_class", "head_prefixes", "check_finite"]


def pool_from_config(cfg: dict) -> ModelPool:
    """Build a ModelPool from a plain dict (the ``pool`` config group, recipe already resolved)."""
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
            validation=t.get("validation"),
            num_labels=t.get("num_labels"), label_names=list(t["label_names"]) if t.get("label_names") else None,
            classes=family.check_classes(name, t.get("classes")),
            templates=family.check_templates(name, t.get("templates")),
        )
    return ModelPool(
        cfg["base"], tasks, model_class=model_class,
        head_prefixes=list(cfg.get("head_prefixes", ["classifier."])),
        check_finite=cfg.get("check_finite", True),
    )


def load_recipe(path: str | Path):
    """The recipe file at ``path`` as a module (a file, not an installed package: data/ recipes)."""
    import importlib.util

    path = Path(path)
    if not path.exists():
        raise PoolError(f"pool recipe {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"adamerge_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
