"""Every yaml in configs/method/ composes with Hydra, parses into its method's typed config and runs
through train.py on the tiny pool (2 steps if it trains); unknown or mistyped keys are refused early."""

from __future__ import annotations

from pathlib import Path

import pytest

import helpers
from adamerge.methods import all_methods, get_method
from adamerge.run.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
METHOD_IDS = sorted(p.stem for p in (ROOT / "configs" / "method").glob("*.yaml"))
# shorter schedules where a yaml's own would take minutes even on the tiny pool
FAST = {
    "concrete_adamerging_layerwise": ["method.mask_steps=1"],
    "concrete_adamerging_taskwise": ["method.mask_steps=1"],
    "projective_adamerging": ["method.delta_steps=2"],
    "projective_task_arithmetic": ["method.delta_steps=2"],
    "fw_merging_soft": ["method.inner_steps=2"],
    "regmean": ["method.num_examples=8"],
    "regmean_pp": ["method.num_examples=8"],
    "fisher_merging": ["method.num_examples=4"],
    "ota_merging": ["method.num_examples=4"],
    "rmm": ["method.rmm.rank=1"],  # the tiny pool has 2 experts
    "map": ["method.check_points=2", "method.candidates=64"],
    "evolve": ["method.evaluations=10", "method.popsize=5"],
    "m2n2": ["method.evaluations=4"],
    "twin_merging": ["method.router_epochs=2"],
}


@pytest.mark.parametrize("method_id", METHOD_IDS)
def test_every_method_yaml_runs_through_train_py(tiny_pool_cfg, tmp_path, method_id, capsys):
    out = tmp_path / "run"
    args = [f"method={method_id}", f"out_dir={out}", "evaluate.enabled=false", "export.task_models=false",
            "trainer.max_steps=2", "data.batch_size=4", "trainer.enable_progress_bar=false",
            *FAST.get(method_id, [])]
    cfg = helpers.compose(args, tiny_pool_cfg)
    from omegaconf import OmegaConf

    method = OmegaConf.to_container(cfg.method, resolve=True)
    assert method["id"] == method_id and method["name"] in all_methods()
    code = helpers.run_inprocess(args, tiny_pool_cfg)
    if method_id == "expert_merging_pp":  # needs the coefficients of a first expert_merging run
        assert code == 2 and "method.first_pass" in capsys.readouterr().err
        return
    assert code == 0, capsys.readouterr().err[-2000:]
    assert (out / "export" / "coefficients.json").exists()


@pytest.mark.parametrize("override, words", [
    ("+method.scaling_factor=0.5", ["unknown config key 'method.scaling_factor'", "method.scale"]),
    ("+method.ties.densty=0.5", ["unknown config key 'method.ties.densty'", "did you mean 'method.ties.density'"]),
    ("method.scale=abc", ["config key 'method.scale' must be", "'abc'"]),
])
def test_unknown_or_mistyped_method_key_is_one_clear_line(tiny_pool_cfg, tmp_path, capsys, override, words):
    out = tmp_path / "run"
    base = ["method=ties_merging" if "ties" in override else "method=task_arithmetic", f"out_dir={out}"]
    code = helpers.run_inprocess([*base, override], tiny_pool_cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and all(w in err[0] for w in words), err
    assert not (out / "export").exists()  # refused before any work


def test_learned_key_is_unknown_to_a_data_free_method():
    with pytest.raises(ConfigError, match="unknown config key 'method.lr'"):
        get_method("static").Config.parse({"name": "static", "id": "task_arithmetic", "lr": 0.1})
    cfg = get_method("adamerging").Config.parse({"name": "adamerging", "lr": 0.1})
    assert cfg.lr == 0.1 and cfg.init == 0.3 and cfg.granularity == "layer"  # the rest from the defaults


def test_every_registered_method_declares_a_config_whose_defaults_parse():
    for name, cls in all_methods().items():
        cfg = cls.Config.parse({"name": name})
        assert cfg.name == name and cfg.label == name


def test_only_methods_that_train_are_lightning_modules():
    """Data-free and closed-form merges are plain MergeAlgorithms; what trains is a MergeMethod
    (a LightningModule). DOGE's one class trains in one of its two configurations."""
    import pytorch_lightning as pl

    from adamerge.methods import MergeAlgorithm
    from adamerge.methods.base import MergeMethod

    for name, cls in all_methods().items():
        assert issubclass(cls, MergeAlgorithm), name
        cfg = cls.Config.parse({"name": name})
        if cls.trains(cfg):
            assert issubclass(cls, MergeMethod), name
    plain = {n for n, c in all_methods().items() if not issubclass(c, pl.LightningModule)}
    assert plain == {"static", "regmean", "regmean_pp", "fisher_merging", "pcb_merging", "tsv_merging", "ota_merging",
                     "map", "evolve", "m2n2", "twin_merging"}  # the last four search or route without optimizer steps


def test_the_registry_names_the_module_of_every_registered_method():
    """``get_method`` imports only the module ``MODULES`` names: every @register'd class must be found there."""
    import importlib
    import pkgutil

    import adamerge.methods as package
    from adamerge.methods.registry import METHODS, MODULES

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"adamerge.methods.{module.name}")
    assert {name: cls.__module__.rsplit(".", 1)[1] for name, cls in METHODS.items()} == MODULES


def test_a_data_free_merge_starts_without_lightning():
    """A streamed data-free run imports neither Lightning nor torchmetrics (seconds of start-up)."""
    import subprocess
    import sys

    code = ("import sys, adamerge.run.cli, adamerge.streaming, adamerge.export; from adamerge.methods import get_method; "
            "get_method('static'); print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pytorch_lightning', 'lightning_fabric', 'torchmetrics')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
