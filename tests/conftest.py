import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_pool_cfg(tmp_path_factory):
    """Two full-fine-tune experts of a tiny BERT (heads of 2 and 3 classes) with data files."""
    import helpers

    return helpers.make_pool(tmp_path_factory.mktemp("pool_full"), k=2, form="full")


@pytest.fixture(scope="session")
def tiny_conf_dir(tmp_path_factory, tiny_pool_cfg):
    """An extra Hydra config dir holding ``pool/tiny.yaml`` for ``train.py --config-dir``."""
    import helpers

    d = tmp_path_factory.mktemp("conf")
    helpers.write_pool_config(d, "tiny", tiny_pool_cfg)
    return d


@pytest.fixture(scope="module")
def pool(tiny_pool_cfg):
    """The tiny pool loaded once per test module."""
    from adamerge.pool.config import pool_from_config

    return pool_from_config(tiny_pool_cfg)


@pytest.fixture
def conf(tmp_path, tiny_pool_cfg):
    """A config dir holding the tiny pool as ``pool=tiny``, where each test may write its own broken pool."""
    import helpers

    d = tmp_path / "conf"
    helpers.write_pool_config(d, "tiny", tiny_pool_cfg)
    return d


@pytest.fixture
def one_thread():
    """``threads=1`` for a run in this process (an exact comparison of resumed training needs bitwise-equal steps,
    which one intra-op thread gives); the process's thread count is restored after the test."""
    import torch

    threads = torch.get_num_threads()
    yield "threads=1"
    torch.set_num_threads(threads)
