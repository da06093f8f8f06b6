"""adamerge: learn how to merge fine-tuned models (AdaMerging and friends) with Lightning."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub at run time

__version__ = "0.1.0"
