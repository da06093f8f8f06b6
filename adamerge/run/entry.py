"""The command line: ``adamerge method=<method> [pool=<pool>] [key=value ...]`` (the console script) and
``python train.py ...`` (the same, from a checkout).

Hydra composes configs/ (plus ``--config-dir`` for the user's own groups) and hands the config to the program
(adamerge/run/program.py: pool → method → fit → evaluate → export), through ``adamerge.run.cli`` (one-line
errors, signals, exit codes). Importing this module switches the hub off unless HF_HUB_OFFLINE=0 is exported:
only command lines import it, never ``import adamerge``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from .cli import cli, hydra_argv, startup_error  # noqa: E402
from .program import CONFIGS  # noqa: E402

_job_started = False  # main() was reached: Hydra has created out_dir


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="config")
def main(cfg: DictConfig) -> None:
    global _job_started
    _job_started = True
    code = cli(cfg)
    if code:
        sys.exit(code)


def console_main() -> None:
    """``adamerge ...`` and ``python train.py ...``: Hydra's own config errors (unknown group option, bad
    override, duplicate yaml key) get the same one-line treatment as ours instead of a traceback."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    sys.argv = hydra_argv(sys.argv)
    try:
        main()
    except Exception as e:
        sys.exit(startup_error(e, sys.argv, _job_started))
