"""M2N2 (adamerge/methods/m2n2.py): competition for examples, attraction, split-point SLERP, and a resumed archive
that ends where one run ends."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import helpers
from adamerge.methods.m2n2 import M2n2Merge, slerp_split, worth


def test_an_example_few_members_get_right_is_worth_more():
    scores = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 0, 1]], dtype=torch.float64)
    # example 0: right by all three (1/3 each); example 1: only member 0; example 2: only member 2
    torch.testing.assert_close(worth(scores, 1.0), torch.tensor([1 / 3 + 1, 1 / 3, 1 / 3 + 1], dtype=torch.float64))
    torch.testing.assert_close(worth(scores, 0.0), scores.sum(1))  # α = 0: a plain count (the authors' GA ablation)


def test_split_point_slerp_takes_w_below_the_split_and_one_minus_w_above():
    x, y = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    child = slerp_split(0.0, 2, x, y)  # weight 0 (all x) below index 2, weight 1 (all y) from it on
    torch.testing.assert_close(child, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    half = slerp_split(0.5, 4, x, y)  # no split inside: SLERP at 0.5 keeps the unit norm
    torch.testing.assert_close(half.norm(), torch.tensor(1.0, dtype=torch.float64))


def test_attraction_picks_the_member_strong_where_the_first_parent_is_weak():
    method = SimpleNamespace(cfg=SimpleNamespace(alpha=1.0, matchmaker=True))
    scores = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        first, second = M2n2Merge.parents(method, scores, g)
        assert second == (2 if first < 2 else second)  # members 0 and 1 only attract member 2
        if first == 2:
            assert second in (0, 1)


@pytest.fixture(scope="module")
def pool3(tmp_path_factory):
    return helpers.make_pool(tmp_path_factory.mktemp("pool3"), k=3)


def run(pool, out, *overrides):
    helpers.train_here(pool, out, "method=m2n2", "method.archive_size=4", "method.checkpoint_every=3",
                       "evaluate.enabled=false", *overrides)
    return json.loads((out / "export" / "m2n2.json").read_text())


def test_a_resumed_archive_ends_where_one_run_ends_and_the_best_member_is_exported(pool3, tmp_path):
    whole = run(pool3, tmp_path / "whole", "method.evaluations=9")
    run(pool3, tmp_path / "parts", "method.evaluations=6")
    resumed = run(pool3, tmp_path / "parts", "method.evaluations=9", "resume=last", "export.overwrite=true")
    assert resumed["archive"] == whole["archive"] and resumed["best"] == whole["best"]
    assert len(whole["archive"]) == 4 and whole["evaluations"] == 9
    assert whole["best"]["share"] == max(whole["archive_shares"])
    report = json.loads((tmp_path / "whole" / "export" / "coefficients.json").read_text())
    exported = torch.tensor(report["coefficients"]).flatten()
    torch.testing.assert_close(exported, torch.tensor(whole["best"]["coefficients"], dtype=torch.float32))
