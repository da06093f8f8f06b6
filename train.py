"""Entry point: ``python train.py method=adamerging_layerwise [key=value ...]``.

Compose configs/ → build pool → method → data → Trainer; fit (resuming if asked); evaluate; export.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the CLI never reaches a hub unless HF_HUB_OFFLINE=0 is exported

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("adamerge")


def read_losses(log_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) from every CSV log of this run (a resumed run adds a version), later runs win."""
    by_step: dict[int, float] = {}
    for f in sorted(log_dir.glob("*/metrics.csv"), key=lambda p: p.stat().st_mtime):
        with f.open() as fh:
            for row in csv.DictReader(fh):
                if row.get("loss"):
                    by_step[int(row["step"])] = float(row["loss"])
    return sorted(by_step.items())


def run_config_files(cfg: DictConfig) -> dict[str, str]:
    """The files Hydra would write to ``<out_dir>/.hydra/``: config.yaml, and when run through Hydra
    overrides.yaml and hydra.yaml."""
    from hydra.core.hydra_config import HydraConfig

    files = {"config.yaml": OmegaConf.to_yaml(cfg)}
    if HydraConfig.initialized():
        files["overrides.yaml"] = OmegaConf.to_yaml(HydraConfig.get().overrides.task)
        files["hydra.yaml"] = OmegaConf.to_yaml(HydraConfig.instance().cfg)
    return files


_fitting = False  # the Trainer is fitting: SIGTERM is handled by Lightning and SaveOnInterrupt


def run(cfg: DictConfig) -> dict:
    """One run as named steps: check everything → pool and method → fit → evaluate → export."""
    from hydra.core.hydra_config import HydraConfig

    from adamerge.config import check_writable_dir
    from adamerge.distributed import launch_is_rank_zero
    from adamerge.lock import out_dir_lock

    out_dir = Path(HydraConfig.get().run.dir) if HydraConfig.initialized() else Path(cfg.out_dir)
    if not launch_is_rank_zero():  # the run's rank 0 holds the lock for all its processes
        return run_locked(cfg, out_dir, rank_zero=False)
    check_writable_dir(out_dir, "out_dir")
    with out_dir_lock(out_dir):  # a second run into this out_dir is refused before it writes anything
        return run_locked(cfg, out_dir, rank_zero=True)


def run_locked(cfg: DictConfig, out_dir: Path, rank_zero: bool) -> dict:
    from adamerge.checkpointing import resolve_resume
    from adamerge.export import atomic_write_text

    # written once the run passed its checks (hydra.output_subdir is null: Hydra would write them before
    # any check, so a refused rerun would overwrite the old run's); taken now, before start_from is inlined
    run_config = run_config_files(cfg)
    c, trains = checked_config(cfg, out_dir)
    pool, method = build_pool_and_method(c, trains)
    if method is None:  # a statistics process of a closed-form DDP run: its part is done
        return {}
    ckpt_path = resolve_resume(c["resume"], out_dir / "checkpoints") if trains else None
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
    elif c["resume"]:
        log.warning("method %s does not train, so it has nothing to resume: resume=%s ignored",
                    c["method"]["id"], c["resume"])
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
    import pytorch_lightning as pl

    from adamerge.checkpointing import check_fresh_run
    from adamerge.config import ConfigError, check_config, check_no_missing, check_writable_dir
    from adamerge.distributed import launch_is_rank_zero
    from adamerge.export import check_export_target, remove_stale_temporaries
    from adamerge.loggers import logger_names
    from adamerge.methods import CheckpointError, get_method

    for key in ("start_from", "init"):  # method.start_from=<method id>: start from that merge
        start = cfg.method.get(key)
        if isinstance(start, str):  # configs/method/<id>.yaml (``init=<id>`` is the older spelling)
            path = ROOT / "configs" / "method" / f"{start}.yaml"
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
    if c["task_vectors"].get("shard"):
        cls.check_shardable(method_cfg)
    c["logger"] = logger_names(c.get("logger"))
    check_writable_dir(out_dir, "out_dir")
    export_dir = Path(c["export"]["dir"])
    if launch_is_rank_zero():
        remove_stale_temporaries(export_dir)
        check_export_target(export_dir, c["export"]["overwrite"])  # refuse before spending time training
        check_writable_dir(export_dir.parent, "export.dir")  # the export is written next to its target
        if trains:
            check_fresh_run(c["resume"], out_dir / "checkpoints")
    if not trains and c["resume"] and c["resume"] != "last" and not Path(c["resume"]).exists():
        # nothing to resume here, but a path that does not exist is a mistake worth naming
        raise CheckpointError(f"resume={c['resume']}: checkpoint file does not exist")
    if trains and int(c["trainer"].get("max_steps") or 0) <= 0:
        raise ConfigError(f"trainer.max_steps (method.steps) must be > 0 for {c['method']['id']}, "
                          f"got {c['trainer'].get('max_steps')}")
    pl.seed_everything(c["seed"], workers=True, verbose=False)
    return c, trains


def hydra_choices() -> dict:
    """The config group options of this run (``{"pool": "minilm_lora", ...}``); empty without Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def build_pool_and_method(c: dict, trains: bool):
    """The pool (every data file checked) and the method built on it; ``(pool, None)`` on a statistics
    process of a closed-form DDP run, which has contributed its part once the method is built."""
    from adamerge.data import check_data
    from adamerge.methods import get_method
    from adamerge.pool_config import pool_from_config, resolve_recipe
    from adamerge.start_vs_end import resolve_monitor

    pool = pool_from_config(resolve_recipe(c["pool"], ROOT))
    check_data(pool)  # a bad line or label is named now, not after training
    if trains:  # checkpoint.monitor=auto becomes what this pool and method allow
        cls = get_method(c["method"]["name"])
        c["checkpoint"]["monitor"] = resolve_monitor(pool, c["checkpoint"].get("monitor"),
                                                     c["data"].get("holdout_fraction") or 0.0, cls.selectable)
    stats_rank = 0 if trains else _launch_statistics_ranks(c["trainer"])
    extra = {}
    if c["task_vectors"].get("shard"):  # each process reads only its slices of the task vectors
        from adamerge.distributed import launch_rank_world

        extra["shard_slice"] = launch_rank_world(c["trainer"].get("devices"), c["trainer"].get("num_nodes"))
    # closed form: every rank adds its statistics
    method = get_method(c["method"]["name"])(pool, c["method"], c["task_vectors"], **extra)
    return pool, (method if stats_rank == 0 else None)


def fit(method, pool, c: dict, out_dir: Path, ckpt_path: str | None):
    """Train with the Lightning Trainer (checkpoints, resume, interrupts, progress, loggers), then
    compare the end with the start (adamerge/start_vs_end.py). Returns ``(start_state, selection)``,
    or None on a DDP rank other than 0."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from adamerge.checkpointing import AtomicCheckpointIO, Interrupted, SaveOnInterrupt
    from adamerge.config import ConfigError
    from adamerge.data import CalibrationDataModule
    from adamerge.evaluate import load_test_sets
    from adamerge.loggers import build_loggers
    from adamerge.progress import ProgressLog, StepProgressBar
    from adamerge.start_vs_end import (
        HoldoutMonitor,
        StartObjective,
        ValidationMonitor,
        choose,
        gather_merges,
        holdout_batches,
        monitor_batches,
        snapshot,
    )

    ckpt_dir = out_dir / "checkpoints"
    dm = CalibrationDataModule.from_pool(pool, batch_size=c["data"]["batch_size"], max_length=c["data"]["max_length"],
                                         seed=c["seed"], size=c["data"]["calibration_size"],
                                         holdout_fraction=c["data"].get("holdout_fraction") or 0.0)
    holdout = holdout_batches(dm.holdout, c["evaluate"]["batch_size"])
    if getattr(method.cfg, "passes", None):  # steps from the data: passes over the largest task's training texts, at most steps
        n = max(next(iter(enc.values())).shape[0] for enc in dm.encoded.values())
        c["trainer"]["max_steps"] = min(int(c["trainer"]["max_steps"]), math.ceil(method.cfg.passes * n / dm.batch_size))
        log.info("method.passes=%g over %d texts: %d steps", method.cfg.passes, n, c["trainer"]["max_steps"])
    start_state = snapshot(method)  # the starting merge, kept to compare with the end
    monitor = monitor_batches(dm.encoded, dm.batch_size, c["seed"], int(c["evaluate"]["monitor_batches"]))
    start_objective = StartObjective(start_state, monitor)
    interrupt = SaveOnInterrupt(ckpt_dir / "last.ckpt")
    every_n, watched = int(c["checkpoint"]["every_n_steps"]), c["checkpoint"].get("monitor")
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:06d}", auto_insert_metric_name=False,
                                 every_n_train_steps=every_n, save_top_k=-1,
                                 save_last=False),
                 interrupt, ProgressLog(c["progress"]["every_n_steps"], c["progress"]["every_s"]), start_objective]

    def validation_sets() -> dict:
        return (load_test_sets(pool, dm.tokenizer, c["data"]["max_length"], split="validation",
                               max_new_tokens=c["evaluate"]["max_new_tokens"]) if pool.family.evaluated else {})

    by_holdout = watched == "holdout_objective"
    if watched:  # the best merge by validation or held-out objective, kept by a ModelCheckpoint in its own folder
        val_monitor = (HoldoutMonitor(holdout, every_n) if by_holdout
                       else ValidationMonitor(validation_sets(), every_n, c["evaluate"]["batch_size"]))
        best = ModelCheckpoint(dirpath=ckpt_dir / "best", filename="step{step:06d}", auto_insert_metric_name=False,
                               monitor=watched, mode="min" if by_holdout else "max", save_top_k=1,
                               every_n_train_steps=every_n)
        callbacks += [val_monitor, best]
    bar = c["trainer"].get("enable_progress_bar")
    bar = sys.stdout.isatty() if bar is None else bool(bar)  # redrawn lines only make sense on a terminal
    if bar:
        callbacks.append(StepProgressBar())
    try:
        trainer = pl.Trainer(**{**c["trainer"], "enable_progress_bar": bar}, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
                             logger=build_loggers(c["logger"], out_dir, out_dir.name),
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    except (TypeError, ValueError) as e:  # unknown key or bad value under trainer.*
        raise ConfigError(f"config group 'trainer': {e}") from e
    global _fitting
    _fitting = True  # SIGTERM is the Trainer's now (cli's handler stands aside: see ``terminated``)
    try:
        trainer.fit(method, datamodule=dm, ckpt_path=ckpt_path)
    except SIGTERMException as e:  # SaveOnInterrupt wrote last.ckpt
        raise Interrupted(interrupt.signum) from e
    finally:
        _fitting = False
    trainer.save_checkpoint(ckpt_dir / "last.ckpt")
    best_ckpt = trainer.strategy.load_checkpoint(best.best_model_path) if watched and best.best_model_path else None
    best_state = best_ckpt["state_dict"] if best_ckpt else None
    if method.merged.sharded:  # every process takes part in gathering the merges rank 0 evaluates and exports
        states = [start_state, snapshot(method)] + ([best_state] if best_state is not None else [])
        gather_merges(method, states, keep=trainer.global_rank == 0)
    if trainer.global_rank != 0:
        return None
    method.cpu()
    # validation files are read by rank 0 only when the monitor did not read them
    validation = val_monitor.validation if watched and not by_holdout else validation_sets()
    selection = choose(method, start_state, start_objective.value, monitor, validation, c["evaluate"]["batch_size"],
                       best=best_state, metric=watched or "val_acc",
                       expert=val_monitor.expert if watched and not by_holdout else None, holdout=holdout)
    if best_ckpt:
        selection["best_checkpoint"] = {"path": best.best_model_path, "step": best_ckpt["global_step"],
                                        watched: float(best.best_model_score)}
    return start_state, selection


def evaluate_run(method, pool, c: dict, out_dir: Path, start_state, selection) -> dict | None:
    """Per-task test accuracy of the reference rows, the start (learned methods) and the merge; the
    table is printed and saved (eval.json). None when there is nothing to evaluate."""
    from adamerge.evaluate import (
        load_test_sets,
        markdown,
        merge_accuracies,
        reference_rows,
        save_report,
        summarize,
    )
    from adamerge.start_vs_end import exported_note, merged_at, merged_now

    if not c["evaluate"]["enabled"] or not pool.family.evaluated:
        return None
    tokenizer = pool.tokenizer()
    tests = load_test_sets(pool, tokenizer, c["data"]["max_length"], c["evaluate"]["max_examples"],
                           max_new_tokens=c["evaluate"]["max_new_tokens"])
    if not tests:
        return None
    bs = c["evaluate"]["batch_size"]

    def accuracies(merged: dict) -> dict[str, float]:
        return merge_accuracies(pool, merged, tests, bs)

    rows = reference_rows(pool, tests, bs) if c["evaluate"]["reference_rows"] else {}
    if start_state is not None and c["evaluate"]["start_row"]:
        rows[method.start_label()] = accuracies(merged_at(method, start_state))
    label = c["method"]["id"] + exported_note(selection)
    rows[label] = accuracies(merged_now(method))
    summary = summarize(rows)
    save_report(summary, out_dir)
    table = markdown(summary)
    print("\n" + table + "\n", flush=True)
    return {"summary": summary, "markdown": table}


def export_run(method, c: dict, out_dir: Path, extra: dict[str, str]) -> str:
    """The atomic export (model, heads, coefficients, heatmap, model card, ``extra`` files)."""
    from adamerge.export import export_merged

    export_dir = Path(c["export"]["dir"])
    export_merged(method, export_dir, overwrite=c["export"]["overwrite"], extra=extra,
                  losses=read_losses(out_dir / "logs"), method_cfg=c["method"], task_models=c["export"]["task_models"])
    print(f"exported merged model to {export_dir}", flush=True)
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
    devices, nodes = trainer_cfg.get("devices", 1), int(trainer_cfg.get("num_nodes", 1) or 1)
    strategy = str(trainer_cfg.get("strategy", "auto"))
    if "ddp" not in strategy or (devices in (1, "1") and nodes == 1):
        return 0
    from lightning_fabric import Fabric

    fabric = Fabric(accelerator=trainer_cfg.get("accelerator", "auto"), devices=devices, num_nodes=nodes,
                    strategy="ddp")
    fabric.launch()
    return fabric.global_rank


def quiet_third_party(verbose: bool) -> None:
    """The one place that silences other libraries' start-up noise (unless ``verbose``): the Trainer's
    info lines (GPU/TPU available, tips, ``weights_only``), transformers' info and progress bars, and
    third-party deprecation warnings, which the user of a run can do nothing about. Lightning Fabric's
    info lines (``Initializing distributed: GLOBAL_RANK ...``) stay: they show which processes started."""
    if verbose:
        return
    import warnings

    import pytorch_lightning  # noqa: F401  (importing sets its logger to INFO: set the level after)
    import transformers

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Frank-Wolfe and Concrete AdaMerging step manually; their checkpoints hold the state after the step,
    # which is exactly what resuming needs, and Lightning warns about that for every such module
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    # a run into a checkpoint folder is refused unless it resumes, and a resumed run's folder has checkpoints
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")


def cli(cfg: DictConfig) -> int:
    """Run, turning the user's errors into one line on stderr; returns the exit code."""
    from adamerge.checkpointing import Interrupted

    quiet_third_party(bool(cfg.get("verbose")))

    def terminated(signum, frame):
        # outside training only: during fit the Trainer chains this handler after its own, which stops
        # at the next step boundary and writes last.ckpt (SaveOnInterrupt)
        if not _fitting:
            raise Interrupted(signum)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminated) if in_main_thread else None
    try:
        run(cfg)
        return 0
    except Interrupted as e:  # 128 + the signal's number, as a shell reports a process the signal ended
        last = Path(str(cfg.out_dir)) / "checkpoints" / "last.ckpt"
        hint = f": last checkpoint written; continue with out_dir={cfg.out_dir} resume=last" if last.exists() else ""
        print(f"interrupted ({signal.Signals(e.signum).name}){hint}", file=sys.stderr, flush=True)
        return 128 + e.signum
    except KeyboardInterrupt:  # Ctrl-C outside training (loading, evaluating, exporting)
        print("interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except Exception as e:  # one clear line for the user; the traceback behind verbose=true
        from adamerge.errors import is_user_error

        if cfg.get("verbose") or not is_user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


_job_started = False  # main() was reached: Hydra has created out_dir


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    global _job_started
    _job_started = True
    code = cli(cfg)
    if code:
        sys.exit(code)


def _config_errors() -> tuple[type[BaseException], ...]:
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return HydraException, OmegaConfBaseException, yaml.YAMLError


def hydra_argv(argv: list[str]) -> list[str]:
    """``pool=null`` as ``~pool``: Hydra refuses a null group with a ValueError that names no group,
    while without a pool check_config names what to do."""
    return ["~pool" if a == "pool=null" else a for a in argv]


if __name__ == "__main__":
    # Hydra then raises its config errors (unknown group option, bad override, duplicate yaml key)
    # instead of printing a traceback, so they get the same one-line treatment as ours
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    sys.argv = hydra_argv(sys.argv)
    try:
        main()
    except Exception as e:
        if "verbose=true" in sys.argv:
            raise
        reason = e if isinstance(e, OSError) else e.__cause__  # logging wraps its file's OSError
        if not _job_started and isinstance(reason, OSError):  # Hydra's mkdir of out_dir or train.log there
            print(f"error: config key 'out_dir': cannot write the run directory: {reason}", file=sys.stderr,
                  flush=True)
            sys.exit(2)
        if not isinstance(e, _config_errors()):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
