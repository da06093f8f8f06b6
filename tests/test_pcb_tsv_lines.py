"""PCB, TSV-M and LiNeS against small direct computations; each through train.py once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import helpers
from adamerge.core.lines import apply_lines, layer_index, lines_config, lines_scales
from adamerge.core.task_vectors import TaskVectors
from adamerge.core.transforms import Lines, run_stages
from adamerge.methods import get_method
from adamerge.methods.pcb import pcb_direction
from adamerge.methods.tsv import tsv_direction, tsv_matrix
from adamerge.pool.config import pool_from_config


def small_tv(K: int = 3, seed: int = 0) -> TaskVectors:
    g = torch.Generator().manual_seed(seed)
    shapes = {"enc.layer.0.w": (6, 5), "enc.layer.1.b": (7,), "emb.w": (4, 3)}
    return TaskVectors({n: torch.randn((K, *s), generator=g) * 0.5 for n, s in shapes.items()},
                       [f"t{k}" for k in range(K)])


# -- PCB ---------------------------------------------------------------------------------------------
def pcb_reference(flat: torch.Tensor, ratio: float) -> torch.Tensor:
    """The authors' PCB_merge on a flat [K, d] matrix (full sorts, as written in pcb-merging.py)."""
    n, d = flat.shape
    srt = flat.abs().sort(1).values
    a = torch.clamp(flat.abs(), srt[:, int(d * 1e-4)][:, None], srt[:, int(d * (1 - 1e-4) - 1)][:, None])
    clamped = torch.sign(flat) * a
    mn, mx = a.min(1, keepdim=True).values, a.max(1, keepdim=True).values
    score = torch.exp(n * ((a - mn) / (mx - mn)) ** 2) * torch.tanh(flat * flat.sum(0))
    srt = score.sort(1).values
    c = torch.clamp(score, srt[:, int(d * (1 - ratio))][:, None], srt[:, d - 1][:, None])
    scale = (c - c.min(1, keepdim=True).values) / (c.max(1, keepdim=True).values - c.min(1, keepdim=True).values)
    return (clamped * scale).sum(0) / scale.sum(0).clamp(min=1e-12)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 1.0])
def test_pcb_matches_the_reference_on_the_flattened_model(ratio):
    tv = small_tv()
    got = pcb_direction(tv, pcb_ratio=ratio)
    flat = torch.cat([t.flatten(1) for _, t in tv.items()], 1)
    ref = pcb_reference(flat, ratio)
    torch.testing.assert_close(torch.cat([got[n].flatten() for n in tv.names]), ref, atol=1e-6, rtol=1e-5)
    if ratio < 1:  # entries every task drops are zero
        kept = sum(int((g != 0).sum()) for g in got.values())
        assert kept < flat.shape[1]


# -- TSV-M -------------------------------------------------------------------------------------------
def test_tsv_reconstructs_the_sum_of_already_orthogonal_low_rank_task_vectors():
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(8, 6, generator=g)).Q  # orthonormal columns
    v = torch.linalg.qr(torch.randn(6, 6, generator=g)).Q
    s = torch.tensor([3.0, 2.0, 1.0])
    t1 = u[:, :3] @ torch.diag(s) @ v[:, :3].T
    t2 = u[:, 3:] @ torch.diag(s * 0.5) @ v[:, 3:].T
    torch.testing.assert_close(tsv_matrix(torch.stack([t1, t2])), t1 + t2, atol=1e-5, rtol=1e-5)


def tsv_numpy(taus: np.ndarray) -> np.ndarray:
    K, m, n = taus.shape
    r = min(m, n) // K
    svds = [np.linalg.svd(t, full_matrices=False) for t in taus]
    U = np.concatenate([u[:, :r] for u, _, _ in svds], 1)
    S = np.concatenate([s[:r] for _, s, _ in svds])
    V = np.concatenate([vh[:r] for _, _, vh in svds], 0)
    pu, _, qu = np.linalg.svd(U, full_matrices=False)
    pv, _, qv = np.linalg.svd(V, full_matrices=False)
    return (pu @ qu) @ np.diag(S) @ (pv @ qv)


def test_tsv_against_numpy_and_averages_other_tensors():
    tv = small_tv(K=2)
    got = tsv_direction(tv)
    ref = tsv_numpy(tv["enc.layer.0.w"].double().numpy())
    np.testing.assert_allclose(got["enc.layer.0.w"].numpy(), ref, atol=1e-5)
    torch.testing.assert_close(got["enc.layer.1.b"], tv["enc.layer.1.b"].mean(0))
    excluded = tsv_direction(tv, exclude=["emb"])
    torch.testing.assert_close(excluded["emb.w"], tv["emb.w"].mean(0))
    assert not torch.allclose(got["emb.w"], tv["emb.w"].mean(0))


# -- LiNeS ------------------------------------------------------------------------------------------
def test_lines_scales_per_layer():
    names = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
             "bert.encoder.layer.1.output.dense.bias", "bert.encoder.layer.2.output.LayerNorm.weight",
             "bert.pooler.dense.weight", "layers.3.mlp.weight"]
    assert [layer_index(n) for n in names] == [None, 0, 1, 2, None, 3]
    s = lines_scales(names[:5], alpha=0.2, beta=0.6)
    assert s == pytest.approx({names[0]: 0.2, names[1]: 0.2, names[2]: 0.5, names[3]: 0.8, names[4]: 0.2})
    assert lines_config(True) == {"alpha": "auto", "beta": 0.5} and lines_config(False) is None
    with pytest.raises(ValueError, match="unknown key"):
        lines_config({"gamma": 1})
    # auto α: shallow layers move as far as the average of the task vectors
    tv = small_tv(K=2)
    d = {n: 3 * t.sum(0) for n, t in tv.items()}  # an unscaled merge direction D = 3·Σ τ
    out = apply_lines(d, tv, {"alpha": "auto", "beta": 1.0})
    torch.testing.assert_close(out["emb.w"], tv["emb.w"].sum(0) / 2)  # α·D = Σ τ / K, α = 1/6
    torch.testing.assert_close(out["enc.layer.0.w"], tv["enc.layer.0.w"].sum(0) / 2)  # block 0 of 2: α
    torch.testing.assert_close(out["enc.layer.1.b"], d["enc.layer.1.b"] * (1 / 6 + 1.0))  # deepest: α + β
    scaled = run_stages(tv, [Lines({"alpha": 0.5, "beta": 0.25})])
    torch.testing.assert_close(scaled["enc.layer.1.b"], tv["enc.layer.1.b"] * 0.75)


def test_lines_on_a_merge_scales_each_layer(tiny_pool_cfg):
    pool = pool_from_config(tiny_pool_cfg)
    cfg = {"name": "tsv_merging", "id": "tsv_merging"}
    plain = get_method("tsv_merging")(pool, cfg).merged.deltas()
    lined = get_method("tsv_merging")(pool, {**cfg, "lines": {"alpha": 0.3, "beta": 0.6}}).merged.deltas()
    for n, want in (("bert.embeddings.word_embeddings.weight", 0.3), ("bert.encoder.layer.0.output.dense.weight", 0.3),
                    ("bert.encoder.layer.1.attention.self.key.weight", 0.9), ("bert.pooler.dense.weight", 0.3)):
        torch.testing.assert_close(lined[n], want * plain[n], atol=1e-7, rtol=1e-5)


# -- end to end -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method,extra", [("pcb_merging", []), ("tsv_merging", ["method.lines=true"])])
def test_end_to_end_through_train(tiny_pool_cfg, tmp_path, method, extra):
    out = tmp_path / "run"
    code = helpers.run_inprocess([f"method={method}", f"out_dir={out}", "data.max_length=16",
                                  "evaluate.reference_rows=false", *extra], tiny_pool_cfg)
    assert code == 0
    rep = json.loads((out / "export" / "coefficients.json").read_text())
    assert rep["method"] == method and rep["num_trainable"] == 0
    assert ("LiNeS" in rep["note"]) == bool(extra)
    assert method in (out / "eval.json").read_text()


def test_lines_applies_on_top_of_any_merge(tiny_pool_cfg):
    """method.lines on task arithmetic scales each layer's task vectors by α + β·(l−1)/(L−1)."""
    from adamerge.methods import get_method
    from adamerge.pool.config import pool_from_config

    pool = pool_from_config(tiny_pool_cfg)
    ta = get_method("static")(pool, {"name": "static", "scale": 0.3}, {})
    ln = get_method("static")(pool, {"name": "static", "scale": 0.3, "lines": {"alpha": 0.2, "beta": 0.6}}, {})
    for n, want in (("bert.encoder.layer.0.output.dense.weight", 0.2),
                       ("bert.encoder.layer.1.output.dense.weight", 0.8)):
        torch.testing.assert_close(ln.merged.task_vectors[n], want * ta.merged.task_vectors[n])
