"""What the bench scripts share: the checkout's root on ``sys.path`` and a pool by its config name."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's adamerge, installed or not

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as train.py: before anything loads huggingface_hub


def load_pool(name: str, **overrides):
    """``configs/pool/<name>.yaml`` as a ModelPool (a recipe builds its experts first); ``overrides``
    replace top-level keys of the pool config (e.g. ``head_prefixes``)."""
    from omegaconf import OmegaConf

    from adamerge.pool.config import pool_from_config, resolve_recipe

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "pool" / f"{name}.yaml"), resolve=True)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return pool_from_config(resolve_recipe(cfg, ROOT))
