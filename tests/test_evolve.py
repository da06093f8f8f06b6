"""Evolutionary merging (adamerge/methods/evolve.py) through train.py: a search resumed from its checkpointed state
ends where one uninterrupted search ends, and a state is never taken over silently."""

from __future__ import annotations

import json

import pytest

import helpers

pytest.importorskip("cma")


@pytest.fixture(scope="module")
def pool3(tmp_path_factory):
    return helpers.make_pool(tmp_path_factory.mktemp("pool3"), k=3)


def evolve(pool, out, *overrides):
    helpers.train_here(pool, out, "method=evolve", "method.popsize=5", "method.sigma0=0.3", "evaluate.enabled=false",
                       *overrides)
    return json.loads((out / "export" / "coefficients.json").read_text())


def test_a_resumed_search_ends_where_one_search_ends(pool3, tmp_path):
    whole = evolve(pool3, tmp_path / "whole", "method.evaluations=20")
    evolve(pool3, tmp_path / "parts", "method.evaluations=10")
    resumed = evolve(pool3, tmp_path / "parts", "method.evaluations=20", "resume=last", "export.overwrite=true")
    assert resumed["evolve"]["evaluations"] == whole["evolve"]["evaluations"] == 20
    assert resumed["evolve"]["best"] == whole["evolve"]["best"]
    assert resumed["coefficients"] == whole["coefficients"]
    history = json.loads((tmp_path / "parts" / "export" / "evolve.json").read_text())["history"]
    assert [h["evaluations"] for h in history] == [5, 10, 15, 20]
    assert all(a["best_fitness"] <= b["best_fitness"] for a, b in zip(history, history[1:]))


def test_a_state_is_not_taken_over_without_resume_nor_resumed_with_other_settings(pool3, tmp_path, capsys):
    evolve(pool3, tmp_path / "run", "method.evaluations=5")
    capsys.readouterr()
    base = [f"out_dir={tmp_path}/run", "method=evolve", "method.popsize=5", "evaluate.enabled=false",
            "export.dir=" + str(tmp_path / "other_export")]
    assert helpers.run_inprocess([*base, "method.evaluations=10"], pool3) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass resume=last" in err, err
    assert helpers.run_inprocess([*base, "method.evaluations=10", "method.sigma0=0.5", "resume=last"], pool3) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other settings (sigma0)" in err, err
    assert not (tmp_path / "other_export").exists()


def test_under_ddp_each_process_measures_its_share_and_the_search_equals_one_process(tiny_conf_dir, tiny_pool_cfg,
                                                                                     tmp_path):
    """``trainer=ddp``: 2 CPU processes over gloo split every candidate's examples; the hits are gathered, so the
    search and its export equal the single-process ones."""
    args = ["method=evolve", "method.evaluations=10", "method.popsize=5", "evaluate.enabled=false"]
    helpers.train_here(tiny_pool_cfg, tmp_path / "one", *args)  # in this process: no interpreter start-up
    proc = helpers.run_train(["--config-dir", str(tiny_conf_dir), "pool=tiny", *args, f"out_dir={tmp_path / 'two'}",
                              "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])
    assert "Initializing distributed: GLOBAL_RANK: 1" in proc.stdout + proc.stderr  # really two processes
    one, two = (json.loads((tmp_path / d / "export" / "coefficients.json").read_text()) for d in ("one", "two"))
    assert two["evolve"] == one["evolve"] and two["coefficients"] == one["coefficients"]
