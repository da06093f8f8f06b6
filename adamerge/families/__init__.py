"""Model families by the pool's ``model_class``: one file per family behind ``ModelFamily`` (base.py).

``sequence_classification`` (classifier.py), ``causal_lm`` (causal.py), ``seq2seq_lm`` (seq2seq.py),
``clip_zero_shot`` (clip.py, clip_images.py) and ``auto`` (base.py). Importing this package fills the
registry; a new family is one new file imported here.
"""

from __future__ import annotations

from . import causal, classifier, clip, seq2seq  # noqa: F401  (each files its family with @register_family)
from .base import FAMILIES, ModelFamily, build_model, get_family, register_family

__all__ = ["FAMILIES", "ModelFamily", "build_model", "get_family", "register_family"]
