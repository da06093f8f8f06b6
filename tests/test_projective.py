"""DOGE (projective gradient merging): projection, Δ optimization, identical experts, train.py end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import helpers
from adamerge.core.task_vectors import TaskVectors
from adamerge.core.transforms import TiesTrim
from adamerge.methods.projective import (
    DeltaProblem,
    ProjectiveMerge,
    delta_loss,
    doge_transform,
    layer_lambdas,
    optimize_delta,
    shared_subspace,
)
from adamerge.methods.static import StaticMerge
from adamerge.pool.config import pool_from_config
from adamerge.run.config import ConfigError
from helpers import make_pool

QUERY0 = "bert.encoder.layer.0.attention.self.query.weight"


def random_tau(G=3, K=4, R=24, C=16, seed=0) -> torch.Tensor:
    return torch.randn(G, K, R, C, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("per_task", [False, True])
def test_projected_gradient_is_orthogonal_to_shared_subspace(per_task):
    tau = random_tau()
    lam = torch.rand(3, 4, generator=torch.Generator().manual_seed(1)) + 0.1
    U = shared_subspace(tau, 2)
    assert U.shape == (3, 24, 8)  # min(24, 16) / 2 directions
    torch.testing.assert_close(U.transpose(-1, -2) @ U, torch.eye(8).expand(3, 8, 8), atol=1e-5, rtol=0)
    problem = DeltaProblem(tau, lam, per_task)
    delta = (torch.randn(problem.shape, generator=torch.Generator().manual_seed(2)) * 0.01).requires_grad_(True)
    delta_loss(tau, lam, delta).backward()
    loss, grad = problem.loss_and_grad(delta.detach())
    torch.testing.assert_close(loss, delta_loss(tau, lam, delta.detach()), atol=0, rtol=1e-5)
    torch.testing.assert_close(grad, delta.grad, atol=1e-7, rtol=1e-4)  # the regrouped form = autograd
    g = problem.loss_and_grad(delta.detach(), U)[1]
    Ut = U.transpose(-1, -2) if not per_task else U.transpose(-1, -2).unsqueeze(1)
    assert (Ut @ delta.grad).abs().max() > 0.1 * delta.grad.abs().max()  # the raw gradient has a shared part
    assert (Ut @ g).abs().max() < 1e-5 * g.abs().max()  # ... that the projection removes


@pytest.mark.parametrize("per_task", [False, True])
def test_loss_decreases_and_batched_layers_equal_one_by_one(per_task):
    tau = random_tau(K=3)
    lam = torch.full((3, 3), 0.3)
    U = shared_subspace(tau, 6)
    delta, losses = optimize_delta(tau, lam, U, steps=40, lr=1e-3, per_task=per_task)
    assert len(losses) == 41 and losses[-1] < 0.5 * losses[0]
    assert abs(losses[-1] - delta_loss(tau, lam, delta).item()) < 1e-4 * losses[0]
    for g in range(3):  # Adam is element-wise and the layers' losses independent: stacking changes nothing
        alone, _ = optimize_delta(tau[g:g + 1], lam[g:g + 1], U[g:g + 1], steps=40, lr=1e-3, per_task=per_task)
        torch.testing.assert_close(alone[0], delta[g], atol=1e-6, rtol=1e-4)


def test_identical_task_vectors_keep_delta_zero():
    tau = random_tau(K=1).expand(3, 2, 24, 16).contiguous()
    U = shared_subspace(tau, 6)
    # Σλτ = τ when λ = 1/K: every expert is already reproduced, so Δ = 0 is the optimum
    delta, losses = optimize_delta(tau, torch.full((3, 2), 0.5), U, steps=30, lr=1e-3)
    assert max(losses) == 0 and delta.abs().max() == 0
    delta, losses = optimize_delta(tau, torch.full((3, 2), 0.3), U, steps=30, lr=1e-3)  # not vacuous
    assert losses[0] > 0 and delta.abs().max() > 0


def test_lambdas_and_mask():
    t = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))
    tv = TaskVectors({"a": t, "b": torch.stack([torch.zeros(8, 4), t[1]])}, ["x", "y"])
    lam = layer_lambdas(tv, 0.07)
    torch.testing.assert_close(lam[0], 0.07 / t.flatten(1).norm(dim=1))
    assert lam[1, 0] == 0 and lam[1, 1] > 0  # a tensor a task leaves unchanged gets λ = 0, not inf
    # DOGE's mask and TIES' trim: top 30% of |τ| per task over all tensors (values distinct here)
    tv = TaskVectors({"a": t, "b": torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(1))}, ["x", "y"])
    trim = TiesTrim(0.3)
    trim.fit(lambda: tv.items(), tv.K)
    for k in range(tv.K):
        kept = torch.cat([trim.mask(tv[n])[k].flatten() for n in tv.names])
        mags = torch.cat([tv[n][k].abs().flatten() for n in tv.names])
        assert int(kept.sum()) == round(0.3 * mags.numel())
        assert mags[kept].min() >= mags[~kept].max()


def test_identical_experts_give_task_arithmetic_with_eta_coefficients(tmp_path):
    cfg = make_pool(tmp_path, k=1)
    cfg["tasks"]["task1"] = dict(cfg["tasks"]["task0"])  # the same expert twice
    pool = pool_from_config(cfg)
    norm = pool.task_vector("task0", QUERY0).float().norm().item()
    only = [f"^{re.escape(QUERY0)}$"]
    eta = 0.5 * norm  # λ = η/‖τ‖ = 1/2 exactly, so λτ + λτ = τ and the loss is 0 at Δ = 0
    method = ProjectiveMerge(pool, {"name": "projective", "id": "doge", "eta": eta, "merge_include": only,
                                    "delta_steps": 20, "delta_lr": 1e-3})
    assert method.merged.names == [QUERY0] and not ProjectiveMerge.trains(method.cfg)
    assert method.doge["groups"][0]["loss_end"] == 0
    torch.testing.assert_close(method.merged.coefficients.table(), torch.full((1, 2), 0.5))
    ta = StaticMerge(pool, {"name": "static", "scale": 0.5, "ties": {"density": 0.3}}, {"include": only})
    torch.testing.assert_close(method.merged.merged_params()[QUERY0], ta.merged.merged_params()[QUERY0],
                               atol=0, rtol=0)


def train(pool_cfg: dict, out: Path, *extra: str) -> None:
    helpers.train_here(pool_cfg, out, "data.batch_size=8", "trainer.log_every_n_steps=1", "evaluate.reference_rows=false",
                       "method.delta_steps=5", *extra)


def test_train_py_task_arithmetic_is_data_free_and_keeps_other_tensors(tiny_pool_cfg, tmp_path, capsys):
    train(tiny_pool_cfg, tmp_path / "run", "method=projective_task_arithmetic")
    export = tmp_path / "run" / "export"
    rep = json.loads((export / "coefficients.json").read_text())
    assert rep["num_trainable"] == 0 and not (tmp_path / "run" / "checkpoints").exists()
    assert all(re.search(r"encoder\.layer\.\d+\..*weight$", n) for n in rep["tensors"])
    assert len(rep["tensors"]) == 12  # 2 layers x (q, k, v, attention out, intermediate, out)
    assert rep["doge"]["delta_steps"] == 5 and len(rep["doge"]["groups"]) == 3  # batched by shape
    assert all(g["loss_end"] < g["loss_start"] for g in rep["doge"]["groups"])
    pool = pool_from_config(tiny_pool_cfg)
    lam = torch.tensor([[0.07 / pool.task_vector(t, n).norm().item() for t in pool.task_names]
                        for n in rep["tensors"]])
    torch.testing.assert_close(torch.tensor(rep["coefficients"]), lam)
    merged = helpers.exported_backbone(export.parent)
    base = pool.base_model.state_dict()
    emb = "bert.embeddings.word_embeddings.weight"
    torch.testing.assert_close(merged[emb], base[emb], atol=0, rtol=0)  # not a DOGE tensor: pretrained
    assert not torch.equal(merged[QUERY0], base[QUERY0])
    assert "projective_task_arithmetic" in capsys.readouterr().out


def test_train_py_adamerging_on_modified_vectors(tiny_pool_cfg, tmp_path):
    train(tiny_pool_cfg, tmp_path / "run", "method=projective_adamerging", "trainer.max_steps=3", "method.lr=0.05",
          "evaluate.enabled=false")
    rep = json.loads((tmp_path / "run" / "export" / "coefficients.json").read_text())
    c = torch.tensor(rep["coefficients"])
    assert c.shape == (12, 2) and rep["num_trainable"] == 24
    assert (c - 0.3).abs().max() > 0.01 and ((c >= 0) & (c <= 1)).all()  # learned, clamped
    assert rep["doge"]["per_task_delta"] and rep["doge"]["subspace"] == 2  # null: number of tasks


def test_batches_are_an_implementation_detail():
    g = torch.Generator().manual_seed(3)
    tv = TaskVectors({f"w{i}": torch.randn(2, *s, generator=g) * 0.05 for i, s in enumerate([(8, 6), (6, 8), (8, 6)])},
                     ["x", "y"])
    a, _ = doge_transform(tv, steps=10, lr=1e-3, device="cpu")
    b, summary = doge_transform(tv, steps=10, lr=1e-3, device="cpu", batch=1)
    assert len(summary["groups"]) == 3
    for n in tv.names:
        torch.testing.assert_close(a[n], b[n], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("key,value", [("eta", -0.1), ("density", 1.5), ("delta_steps", 2.5), ("subspace", 0),
                                       ("delta_batch", 0), ("coefficients", "fixed"), ("delta_lr", "big")])
def test_bad_config_names_its_key(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}"):
        ProjectiveMerge(None, {"name": "projective", key: value})
