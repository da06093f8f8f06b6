"""Reversible model merging (adamerge/core/reversible.py): the closed form is the best rank-p rebuild, each task's
exported model is what the compact basis rebuilds, and the refusals."""

from __future__ import annotations

import json

import torch
from peer_pool import model_tensors

import helpers
from adamerge.core.reversible import rank_p, read_rmm_update


def test_the_rank_p_rebuild_is_the_best_one():
    """Its error is the Eckart–Young bound (the experts' smallest K − p squared singular values), below a random
    rank-p basis's least-squares fit."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(4, 300, generator=g, dtype=torch.float64)
    coefficients, basis = rank_p(rows, 2)
    error = (rows - coefficients @ basis).square().sum()
    tail = torch.linalg.svdvals(rows)[2:].square().sum()
    torch.testing.assert_close(error, tail)
    other = torch.randn(2, 300, generator=g, dtype=torch.float64)
    fit = torch.linalg.lstsq(other.T, rows.T).solution.T @ other
    assert (rows - fit).square().sum() > error


def test_each_tasks_model_is_what_the_stored_basis_rebuilds_on_lora_and_full_experts(tmp_path):
    for form in ("lora", "full"):
        pool = helpers.make_pool(tmp_path / form, k=3, form=form)
        run = tmp_path / f"run_{form}"
        helpers.train_here(pool, run, "method=rmm", "evaluate.enabled=false")
        base = model_tensors(tmp_path / form / "base")
        report = json.loads((run / "export" / "coefficients.json").read_text())["rmm"]
        assert report["storage_share"] == report["stored_floats"] / report["experts_floats"] < 0.7
        for k, task in enumerate(["task0", "task1", "task2"]):
            own = model_tensors(run / "export" / "tasks" / task)
            rebuilt = read_rmm_update(run / "export", k, {n: tuple(t.shape) for n, t in base.items()})
            assert len(rebuilt) == 4 if form == "lora" else len(rebuilt) > 20  # LoRA: query and value, 2 layers
            for n, update in rebuilt.items():
                torch.testing.assert_close(own[n], base[n] + update, rtol=0, atol=1e-6)


def test_a_basis_as_large_as_the_pool_is_refused_in_one_line(tmp_path, capsys):
    pool = helpers.make_pool(tmp_path / "pool", k=2)
    capsys.readouterr()
    code = helpers.run_inprocess([f"out_dir={tmp_path}/run", "method=rmm", "evaluate.enabled=false"], pool)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "rank must be below the number of experts (2)" in err, err
    assert not (tmp_path / "run" / "export").exists()
