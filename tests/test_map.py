"""MAP (adamerge/methods/map.py, adamerge/core/pareto.py): the authors' samples, surrogates that recover a known
metric, the front and the preference, and a run through train.py that exports what it chose."""

from __future__ import annotations

import json

import pytest
import torch

import helpers
from adamerge.core import pareto


def test_samples_are_the_one_hots_then_grid_points_that_are_neither_one_hot_isotropic_nor_on_the_simplex():
    c = pareto.map_samples(4, 30, torch.Generator().manual_seed(0))
    assert c.shape == (30, 4) and torch.equal(c[:4], torch.eye(4, dtype=c.dtype))
    grid = c[4:]
    assert (grid.sum(1) != 1).all() and not (grid == grid[:, :1]).all(1).any()
    assert set(grid.unique().tolist()) <= {0.0, 0.5, 1.0}  # ⌈(26 / 0.5)^(1/4)⌉ = 3 values per axis
    assert len({tuple(r) for r in grid.tolist()}) == len(grid)


def test_a_surrogate_recovers_a_sigmoid_quadratic_metric_off_its_samples():
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(10, generator=g, dtype=torch.float64)  # K = 3: 10 parameters
    metric = lambda c: torch.sigmoid(pareto.quadratic_features(c) @ truth)  # noqa: E731
    fit_on = pareto.map_samples(3, 20, g)
    elsewhere = torch.rand(50, 3, generator=g, dtype=torch.float64)
    surrogate = pareto.Surrogate(fit_on, metric(fit_on))
    assert pareto.r_squared(metric(elsewhere), surrogate(elsewhere)) > 0.999


def test_the_front_keeps_exactly_the_non_dominated_points_and_a_preference_picks_on_it():
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.4, 0.4], [0.5, 0.2]])
    assert pareto.non_dominated(points, chunk=2).tolist() == [True, True, True, False, False]
    assert pareto.choose(points, torch.tensor([1.0, 0.0])) == 0
    assert pareto.choose(points, torch.tensor([1.0, 1.0])) in (0, 1, 2)
    assert pareto.choose(points[[2, 3]], torch.tensor([1.0, 1.0])) == 0


@pytest.fixture(scope="module")
def pool3(tmp_path_factory):
    return helpers.make_pool(tmp_path_factory.mktemp("pool3"), k=3)


def test_map_exports_the_point_its_preference_picks_on_the_surrogates_front(pool3, tmp_path):
    helpers.train_here(pool3, tmp_path / "run", "method=map", "method.check_points=4", "method.candidates=512",
                       "+method.preference={task1:1}", "evaluate.enabled=false")
    export = tmp_path / "run" / "export"
    front = json.loads((export / "pareto" / "front.json").read_text())
    assert (export / "pareto" / "front.png").stat().st_size > 0
    assert front["metric"] == "agreement" and front["samples"]["fitted_on"] == 20  # (K+1)(K+2)
    assert len(front["samples"]["measured"]) == 24 and set(front["r2_on_check_points"]) == {"task0", "task1", "task2"}
    predicted = torch.tensor(front["front"]["predicted"], dtype=torch.float64)
    assert pareto.non_dominated(predicted).all()
    chosen = front["chosen"]
    assert chosen["predicted"][1] == predicted[:, 1].max()  # all the weight on task1: its best front point
    report = json.loads((export / "coefficients.json").read_text())
    assert report["coefficients"][0] == pytest.approx(chosen["coefficients"])  # what the export merged


def test_metric_validation_without_validation_files_is_refused_in_one_line(pool3, tmp_path, capsys):
    capsys.readouterr()
    code = helpers.run_inprocess([f"out_dir={tmp_path}/run", "method=map", "method.metric=validation",
                                  "evaluate.enabled=false"], pool3)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "task0, task1, task2 have no validation file" in err, err
    assert not (tmp_path / "run" / "export").exists()


@pytest.mark.parametrize("preference, says", [("{task9:1}", "names task9, not tasks of the pool"),
                                              ("{task0:0}", "non-negative weights, not all zero")])
def test_a_preference_that_names_no_task_or_weighs_nothing_is_refused_in_one_line(pool3, tmp_path, capsys,
                                                                                   preference, says):
    capsys.readouterr()
    code = helpers.run_inprocess([f"out_dir={tmp_path}/run", "method=map", f"+method.preference={preference}",
                                  "evaluate.enabled=false"], pool3)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "run" / "export").exists()
