"""Distill merging: starts exactly at its start_from merge, the teacher is the real expert, training lowers
the distillation loss (through train.py)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import helpers
from adamerge.methods import get_method
from adamerge.run.datamodule import CalibrationDataModule

TA = {"name": "static", "id": "task_arithmetic", "scale": 0.3}


def dm_cfg(**kw) -> dict:
    cfg = {"name": "distill_merging", "id": "distill_merging", "start_from": TA, "init": 0.0, "clamp": [-1, 1]}
    cfg.update(kw)
    return cfg


def test_starts_at_the_start_merge_and_teaches_with_the_real_expert(pool):
    m = get_method("distill_merging")(pool, dm_cfg())
    ta = get_method("static")(pool, TA)
    start, ref = m.merged.merged_params(), ta.merged.merged_params()
    for n in m.merged.names:
        torch.testing.assert_close(start[n], ref[n], rtol=0, atol=1e-6)
    # task vectors are held relative to the start merge: the teacher must still be the expert itself
    for task in pool.task_names:
        teacher = m.expert_params(task)
        for n in m.merged.names:
            torch.testing.assert_close(teacher[n], pool.expert_tensor(task, n), rtol=0, atol=1e-6)
    # c = e_k reproduces expert k
    with torch.no_grad():
        m.merged.coefficients.raw.zero_()
        m.merged.coefficients.raw[:, 1] = 1.0
    merged = m.merged.merged_params()
    for n in m.merged.names:
        torch.testing.assert_close(merged[n], pool.expert_tensor(pool.task_names[1], n), rtol=0, atol=1e-5)


def test_config_errors(pool):
    with pytest.raises(ValueError, match="outside 'method.clamp'"):
        get_method("distill_merging")(pool, dm_cfg(init=2.0))
    with pytest.raises(ValueError, match="ties"):
        get_method("distill_merging")(pool, dm_cfg(ties={"density": 0.2}))


def test_train_py_lowers_the_distillation_loss(tmp_path, tiny_conf_dir, pool):
    out = tmp_path / "run"
    helpers.run_train(["--config-dir", str(tiny_conf_dir), "pool=tiny", "method=distill_merging",
                       "method.start_from=task_arithmetic", "method.lr=0.05", "trainer.max_steps=12",
                       "data.batch_size=4", "data.max_length=16", "trainer.log_every_n_steps=1",
                       "trainer.enable_progress_bar=false", "evaluate.reference_rows=false", f"out_dir={out}"])
    rep = json.loads((out / "export" / "coefficients.json").read_text())
    table = torch.tensor(rep["coefficients"])
    assert table.abs().max() > 0.05  # the coefficients moved from the start (γ = 0 by default)
    # the exported merge has a lower distillation loss than the start on fixed calibration batches
    m = get_method("distill_merging")(pool, dm_cfg())
    batches = list(itertools.islice(CalibrationDataModule.from_pool(pool, batch_size=4, max_length=16).train_dataloader(), 3))

    def loss() -> float:
        with torch.no_grad():
            return sum(float(m.task_loss(t, x)) for b in batches for t, x in b.items())

    before = loss()
    with torch.no_grad():
        m.merged.coefficients.raw.copy_(table)
    assert loss() < before
