"""``evaluate.lm_eval_tasks``: the lm-evaluation-harness (the ``lm_eval`` package) run on the exported causal LM, its
results written to ``export/lm_eval.json``. Checked before any work: the package must import, the model must be a
causal LM, and the task datasets must be reachable (the hub on, or ``HF_DATASETS_OFFLINE=1`` for cached datasets).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import atomic_write_text
from .errors import ConfigError


def check_lm_eval(c: dict) -> None:
    """One ConfigError line, before the pool loads, when ``evaluate.lm_eval_tasks`` cannot run."""
    tasks = c["evaluate"].get("lm_eval_tasks")
    if not tasks:
        return
    where = f"evaluate.lm_eval_tasks={list(tasks)}"
    model_class = (c.get("pool") or {}).get("model_class", "sequence_classification")
    if model_class not in ("causal_lm", "auto"):
        raise ConfigError(f"{where}: lm-eval runs causal LMs; the pool's model_class is {model_class}")
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{where}: the lm-eval package is not installed (pip install lm-eval), or drop the key") from e
    from huggingface_hub import constants

    if constants.is_offline_mode() and os.environ.get("HF_DATASETS_OFFLINE") != "1":
        raise ConfigError(f"{where}: lm-eval reads its task datasets from the hub, which is off (HF_HUB_OFFLINE=1, "
                          "adamerge's default); export HF_HUB_OFFLINE=0, or HF_DATASETS_OFFLINE=1 when the datasets "
                          "are in your cache, or drop the key")


def run_lm_eval(export_dir: str | Path, evaluate: dict) -> dict:
    """The harness on ``export_dir/model``: {task: metrics}, also written to ``export_dir/lm_eval.json`` ({} when
    ``evaluate.lm_eval_tasks`` is empty)."""
    if not evaluate.get("lm_eval_tasks"):
        return {}
    import lm_eval

    model = Path(export_dir) / "model"
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model}", tasks=list(evaluate["lm_eval_tasks"]),
                                  batch_size=evaluate["lm_eval_batch_size"], limit=evaluate["lm_eval_limit"])
    results = out["results"]
    atomic_write_text(Path(export_dir) / "lm_eval.json", json.dumps(results, indent=2, default=str))
    for task, metrics in results.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"lm-eval {task}: {shown}", flush=True)
    return results
