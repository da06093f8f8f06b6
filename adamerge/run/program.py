"""The program one run is: check the config → pool and method → fit (learned methods) → evaluate → export.

``run(cfg)`` takes a composed config (Hydra's, as train.py passes it, or any ``DictConfig`` with the same
groups) and returns what was produced (out_dir, selection, evaluation summary, export path); a Python
caller runs the same program as the command line. Training itself is ``adamerge.run.fit``; turning errors
into one line and signals into exit codes is ``adamerge.run.cli``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from .evaluation import evaluate_run
from .fit import fit, read_losses

# shipped inside the package (a checkout links configs/ and data/ to them), so that an installed adamerge
# runs from any directory; a pool's ``recipe:`` path is relative to the package (data/benchmark.py)
PACKAGE = Path(__file__).resolve().parents[1]
CONFIGS = PACKAGE / "configs"
log = logging.getLogger("adamerge")


def run_config_files(cfg: DictConfig) -> dict[str, str]:
    """The files Hydra would write to ``<out_dir>/.hydra/``: config.yaml, and when run through Hydra
    overrides.yaml and hydra.yaml."""
    from hydra.core.hydra_config import HydraConfig

    files = {"config.yaml": OmegaConf.to_yaml(cfg)}
    if HydraConfig.initialized():
        files["overrides.yaml"] = OmegaConf.to_yaml(HydraConfig.get().overrides.task)
        files["hydra.yaml"] = OmegaConf.to_yaml(HydraConfig.instance().cfg)
    return files


def run(cfg: DictConfig) -> dict:
    """One run as named steps: check everything → pool and method → fit → evaluate → export."""
    from hydra.core.hydra_config import HydraConfig

    from .config import check_writable_dir
    from .distributed import launch_is_rank_zero
    from .lock import out_dir_lock

    out_dir = Path(HydraConfig.get().run.dir) if HydraConfig.initialized() else Path(cfg.out_dir)
    if not launch_is_rank_zero():  # the run's rank 0 holds the lock for all its processes
        return run_locked(cfg, out_dir, rank_zero=False)
    check_writable_dir(out_dir, "out_dir")
    with out_dir_lock(out_dir):  # a second run into this out_dir is refused before it writes anything
        return run_locked(cfg, out_dir, rank_zero=True)


def run_locked(cfg: DictConfig, out_dir: Path, rank_zero: bool) -> dict:
    from ..atomic import atomic_write_text
    from ..pool.config import resolve_recipe
    from ..streaming import should_stream, stream_run

    # written once the run passed its checks (hydra.output_subdir is null: Hydra would write them before
    # any check, so a refused rerun would overwrite the old run's); taken now, before start_from is inlined
    run_config = run_config_files(cfg)
    c, trains = checked_config(cfg, out_dir)
    if c.get("threads"):
        import torch

        torch.set_num_threads(int(c["threads"]))
    c["pool"] = resolve_recipe(c["pool"], PACKAGE)  # a recipe builds its experts first (once)
    if should_stream(c):  # a data-free merge, one tensor at a time from the experts' files into the export
        stream_run(c, out_dir, run_config if rank_zero else {})
        return {"out_dir": str(out_dir), "export": exported(c)}
    pool, method = build_pool_and_method(c, trains)
    if method is None:  # a statistics process of a closed-form DDP run: its part is done
        return {}
    ckpt_path = None
    if trains:  # Lightning's checkpoint IO: imported by runs that train
        from .checkpointing import resolve_resume

        ckpt_path = resolve_resume(c["resume"], out_dir / "checkpoints")
    if rank_zero:
        for name, text in run_config.items():  # the run is accepted: record its config
            atomic_write_text(out_dir / ".hydra" / name, text)
        log.info("%s", header(pool, method, c, out_dir, trains))
    start_state, selection = None, None
    if trains:
        fitted = fit(method, pool, c, out_dir, ckpt_path)
        if fitted is None:  # not the DDP rank that evaluates and exports
            return {}
        start_state, selection = fitted
    result, extra = {"out_dir": str(out_dir)}, {}
    if selection is not None:
        extra["selection.json"] = json.dumps(selection, indent=2)
        result["selection"] = selection
    summary = evaluate_run(method, pool, c, out_dir, start_state, selection)
    if summary is not None:
        extra.update({"eval.json": (out_dir / "eval.json").read_text(), "eval.md": summary["markdown"] + "\n"})
        result["eval"] = summary["summary"]
    result["export"] = export_run(method, c, out_dir, extra)
    return result


def checked_config(cfg: DictConfig, out_dir: Path) -> tuple[dict, bool]:
    """The resolved config with ``method.start_from`` inlined and ``logger`` as the list of loggers, every
    key checked, and everything this run will write to shown writable — before the pool loads, so that
    nothing is spent on a doomed run. Also whether the configured method trains."""
    from ..atomic import check_export_target, remove_stale_temporaries
    from ..errors import ConfigError
    from ..methods import CheckpointError, get_method
    from .config import check_config, check_no_missing, check_writable_dir
    from .distributed import launch_is_rank_zero
    from .loggers import logger_names

    for key in ("start_from", "init"):  # method.start_from=<method id>: start from that merge
        start = cfg.method.get(key)
        if isinstance(start, str):  # configs/method/<id>.yaml (``init=<id>`` is the older spelling)
            path = CONFIGS / "method" / f"{start}.yaml"
            if not path.exists():
                raise ConfigError(f"config key 'method.{key}': no method config {path.name} in configs/method")
            with open_dict(cfg):  # inside the tree, so its ${data...} interpolations resolve
                cfg.method[key] = OmegaConf.load(path)
    check_no_missing(cfg, hydra_choices())  # a ``???`` key, named before an interpolation trips over it
    c = OmegaConf.to_container(cfg, resolve=True)
    check_config(c)
    cls = get_method(c["method"].get("name"))
    method_cfg = cls.parse_config(c["method"])  # every method key typed and known
    trains = cls.trains(method_cfg)
    if not trains and c["resume"] and not getattr(cls, "keeps_state", False):  # evolve, m2n2: their search state
        log.warning("method %s does not train, so it has nothing to resume: resume=%s ignored", c["method"]["id"],
                    c["resume"])
    if c["task_vectors"].get("shard"):
        cls.check_shardable(method_cfg)
    c["logger"] = logger_names(c.get("logger"))
    check_writable_dir(out_dir, "out_dir")
    if c["task_vectors"]["device"] == "disk":
        check_writable_dir(Path(c["task_vectors"]["disk_dir"]).parent, "task_vectors.disk_dir")
    export_dir = Path(c["export"]["dir"])
    if launch_is_rank_zero():
        remove_stale_temporaries(export_dir)
        check_export_target(export_dir, c["export"]["overwrite"])  # refuse before spending time training
        check_writable_dir(export_dir.parent, "export.dir")  # the export is written next to its target
        if c["export"]["push_to_hub"]:
            from ..pool.hub import check_push_target

            check_push_target(c["export"]["push_to_hub"])
        if trains:
            from .checkpointing import check_fresh_run

            check_fresh_run(c["resume"], out_dir / "checkpoints")
    if not trains and c["resume"] and c["resume"] != "last" and not Path(c["resume"]).exists():
        # nothing to resume here, but a path that does not exist is a mistake worth naming
        raise CheckpointError(f"resume={c['resume']}: checkpoint file does not exist")
    if trains and int(c["trainer"].get("max_steps") or 0) <= 0:
        raise ConfigError(f"trainer.max_steps (method.steps) must be > 0 for {c['method']['id']}, "
                          f"got {c['trainer'].get('max_steps')}")
    return c, trains


def hydra_choices() -> dict:
    """The config group options of this run (``{"pool": "minilm_lora", ...}``); empty without Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def seed_run(c: dict) -> None:
    """Seed every generator (Lightning's ``seed_everything``), importing Lightning only for runs that build a
    method in memory (a streamed merge starts without it); importing it sets its logger to INFO."""
    import pytorch_lightning as pl

    if not c.get("verbose"):
        logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    pl.seed_everything(c["seed"], workers=True, verbose=False)


def build_pool_and_method(c: dict, trains: bool):
    """The pool (every data file checked) and the method built on it; ``(pool, None)`` on a statistics
    process of a closed-form DDP run, which has contributed its part once the method is built."""
    from ..methods import get_method
    from ..pool.config import pool_from_config, resolve_recipe
    from .data import check_data
    from .monitors import resolve_monitor

    seed_run(c)  # before the pool: a base's mismatched head is initialised at random
    pool = pool_from_config(resolve_recipe(c["pool"], PACKAGE))  # (a resolved config is returned as it is)
    check_data(pool)  # a bad line or label is named now, not after training
    if trains:  # checkpoint.monitor=auto becomes what this pool and method allow
        cls = get_method(c["method"]["name"])
        c["checkpoint"]["monitor"] = resolve_monitor(pool, c["checkpoint"].get("monitor"),
                                                     c["data"]["holdout_fraction"], cls.selectable)
    stats_rank = 0 if trains else _launch_statistics_ranks(c["trainer"])
    extra = {}
    if c["task_vectors"].get("shard"):  # each process reads only its slices of the task vectors
        from .distributed import launch_rank_world

        extra["shard_slice"] = launch_rank_world(c["trainer"].get("devices"), c["trainer"].get("num_nodes"))
    # closed form: every rank adds its statistics
    method = get_method(c["method"]["name"])(pool, c["method"], c["task_vectors"], **extra)
    return pool, (method if stats_rank == 0 else None)


def export_run(method, c: dict, out_dir: Path, extra: dict[str, str]) -> str:
    """The atomic export (model, heads, coefficients, heatmap, model card, ``extra`` files)."""
    from ..export import export_merged

    export_merged(method, Path(c["export"]["dir"]), overwrite=c["export"]["overwrite"], extra=extra,
                  losses=read_losses(out_dir / "logs"), method_cfg=c["method"], task_models=c["export"]["task_models"],
                  dtype=c["export"]["dtype"], max_shard_size=c["export"]["max_shard_size"])
    return exported(c)


def exported(c: dict) -> str:
    """Say where the export is, and upload it when ``export.push_to_hub`` asks."""
    export_dir = Path(c["export"]["dir"])
    print(f"exported merged model to {export_dir}", flush=True)
    from ..lm_eval_hook import run_lm_eval

    run_lm_eval(export_dir, c["evaluate"])  # evaluate.lm_eval_tasks, when given
    if c["export"]["push_to_hub"]:
        from ..pool.hub import push_export

        print(f"uploaded the export to {push_export(c['export']['push_to_hub'], str(export_dir))}", flush=True)
    return str(export_dir)


def header(pool, method, c: dict, out_dir: Path, trains: bool) -> str:
    """One screen that says what this run is about to do."""
    merged = method.merged
    tv = merged.task_vectors
    held = tv.nbytes() if tv is not None else sum(v.numel() * v.element_size() for v in merged.offset.values())
    mib = held / 2**20
    what = "task vectors" if tv is not None else "merged update"
    if merged.factored_names:
        what += f" ({len(merged.factored_names)} tensors as LoRA factors)"
    t = c["trainer"]
    steps = f"{t.get('max_steps')} steps" if trains else "closed form / data-free (no steps)"
    return "\n".join([
        f"pool      {len(pool.task_names)} experts ({', '.join(pool.task_names)}) on {pool.base_path}",
        f"merged    {len(merged.names)} tensors, {what} {mib:.1f} MiB ({c['task_vectors']['dtype']})",
        f"method    {c['method']['id']}: {steps}",
        f"devices   {t.get('accelerator')} x {t.get('devices')} ({t.get('strategy')}), precision {t.get('precision')}",
        f"out_dir   {out_dir}",
    ])


def _launch_statistics_ranks(trainer_cfg: dict) -> int:
    """Closed-form methods under ``trainer=ddp``: start the processes the Trainer would, return the rank.

    No Trainer runs for them, so Lightning Fabric launches the same processes and process group
    (gloo on CPU, NCCL on GPUs); each process reads its slice of the calibration data and the
    statistics (Gram matrices, Fisher diagonals) are all-reduced. Single process: returns 0.
    """
    from .distributed import several_processes

    if not several_processes(trainer_cfg):
        return 0
    from lightning_fabric import Fabric

    devices, nodes = trainer_cfg.get("devices", 1), int(trainer_cfg.get("num_nodes", 1) or 1)

    fabric = Fabric(accelerator=trainer_cfg.get("accelerator", "auto"), devices=devices, num_nodes=nodes,
                    strategy="ddp")
    fabric.launch()
    return fabric.global_rank
