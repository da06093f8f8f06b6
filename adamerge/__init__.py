"""adamerge: learn how to merge fine-tuned models (AdaMerging and friends) with Lightning."""

# The hub is switched off by the command-line programs (train.py, bench/, data/benchmark.py), not by importing
# the package: a notebook that imports adamerge keeps its hub access for everything else.

__version__ = "0.1.0"

from .api import merge  # noqa: E402,F401  (light: the API imports Hydra and torch only when called)
