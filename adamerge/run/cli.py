"""The command line's side of a run: third-party noise silenced, SIGTERM and Ctrl-C turned into a checkpoint and
an exit code, a user's error into one line on stderr (adamerge.errors), the program's own traceback kept."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from omegaconf import DictConfig

from . import program
from .fit import FITTING


def quiet_third_party(verbose: bool) -> None:
    """The one place that silences other libraries' start-up noise (unless ``verbose``): the Trainer's
    info lines (GPU/TPU available, tips, ``weights_only``), transformers' info and progress bars, and
    third-party deprecation warnings, which the user of a run can do nothing about. Lightning Fabric's
    info lines (``Initializing distributed: GLOBAL_RANK ...``) stay: they show which processes started."""
    if verbose:
        return
    import warnings

    import transformers

    # Lightning's own logger is quieted where it is imported (program.seed_run): importing it sets INFO
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
    from ..errors import Interrupted

    quiet_third_party(bool(cfg.get("verbose")))

    def terminated(signum, frame):
        # outside training only: during fit the Trainer chains this handler after its own, which stops
        # at the next step boundary and writes last.ckpt (SaveOnInterrupt)
        if not FITTING["now"]:
            raise Interrupted(signum)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminated) if in_main_thread else None
    try:
        program.run(cfg)
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
        from ..errors import is_user_error

        if cfg.get("verbose") or not is_user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _config_errors() -> tuple[type[BaseException], ...]:
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return HydraException, OmegaConfBaseException, yaml.YAMLError


def hydra_argv(argv: list[str]) -> list[str]:
    """``pool=null`` as ``~pool``: Hydra refuses a null group with a ValueError that names no group,
    while without a pool check_config names what to do."""
    return ["~pool" if a == "pool=null" else a for a in argv]


def startup_error(e: Exception, argv: list[str], job_started: bool) -> int:
    """An error raised around Hydra's own start-up (before or after ``cli``): one line and exit code 2 when it is
    the user's — out_dir not creatable, a config Hydra refuses — else raised again with its traceback."""
    if "verbose=true" in argv:
        raise e
    if isinstance(e, _config_errors()):  # before OSError: Hydra's MissingConfigException is an IOError too
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    reason = e if isinstance(e, OSError) else e.__cause__  # logging wraps its file's OSError
    if not job_started and isinstance(reason, OSError):  # Hydra's mkdir of out_dir or train.log there
        print(f"error: config key 'out_dir': cannot write the run directory: {reason}", file=sys.stderr, flush=True)
        return 2
    raise e
