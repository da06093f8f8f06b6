"""Entry point: ``python train.py method=<method> [pool=<pool>] [key=value ...]``, the same as the ``adamerge``
command (adamerge/run/entry.py): Hydra composes configs/ and hands the config to the program
(adamerge/run/program.py: pool → method → fit → evaluate → export).
"""

from __future__ import annotations

from adamerge.run.entry import console_main  # the hub is off unless HF_HUB_OFFLINE=0
from adamerge.run.program import run  # noqa: F401  (the program, for Python callers of this file)

if __name__ == "__main__":
    console_main()
