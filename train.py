"""Entry point: ``python train.py method=<method> [pool=<pool>] [key=value ...]``.

Hydra composes configs/ and hands the config to the program (adamerge/run/program.py: pool → method → fit →
evaluate → export), through ``adamerge.run.cli`` (one-line errors, signals, exit codes).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the CLI never reaches a hub unless HF_HUB_OFFLINE=0 is exported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from adamerge.run.cli import cli, hydra_argv, startup_error  # noqa: E402
from adamerge.run.program import run  # noqa: E402,F401  (the program, for Python callers of this file)

_job_started = False  # main() was reached: Hydra has created out_dir


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    global _job_started
    _job_started = True
    code = cli(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    # Hydra then raises its config errors (unknown group option, bad override, duplicate yaml key)
    # instead of printing a traceback, so they get the same one-line treatment as ours
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    sys.argv = hydra_argv(sys.argv)
    try:
        main()
    except Exception as e:
        sys.exit(startup_error(e, sys.argv, _job_started))
