"""FW-Merging: the LMO (true linear term), convergence on a quadratic, memory flat in the pool size,
and the real train.py with resume between iterations."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import helpers
from adamerge.methods.frank_wolfe import FrankWolfeMerging
from adamerge.methods.frank_wolfe_state import lmo
from helpers import ROOT, tiny_config


def method_cfg(name: str, **over) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "method" / f"{name}.yaml").read_text())
    cfg.update(over)
    return cfg


def write_candidates(pool_cfg: dict, out: Path, n: int, noise: float = 0.05, seed: int = 1,
                     directions: list[dict] | None = None) -> list[str]:
    """``n`` candidates (base + noise, or base + given directions) as .safetensors state dicts."""
    out.mkdir(parents=True, exist_ok=True)
    base = load_file(str(Path(pool_cfg["base"]) / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        if directions:
            sd = {k: (v + directions[i][k]) if k in directions[i] else v for k, v in base.items()}
        else:
            sd = {k: v + noise * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                  for k, v in base.items()}
        p = out / f"cand{i:02d}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
        paths.append(str(p))
    return paths


def write_mismatched(out: Path) -> str:
    from transformers import BertForSequenceClassification

    BertForSequenceClassification(tiny_config(hidden_size=16, intermediate_size=32)).save_pretrained(out)
    return str(out)


def theta(m: FrankWolfeMerging) -> dict[str, torch.Tensor]:
    return {n: m.state.theta(n).clone() for n in m.names}


def dist(a: dict, b: dict) -> float:
    return sum(((a[n] - b[n].float()) ** 2).sum() for n in a).sqrt().item()


def test_lmo_picks_the_smallest_true_linear_term(pool, tiny_pool_cfg, tmp_path):
    names = pool.shared_names()
    g = torch.Generator().manual_seed(0)
    grad = {n: torch.randn(pool.base_tensor(n).shape, generator=g) for n in names}
    # A: a tiny step exactly along -∇ (cosine -1, linear term -0.01‖∇‖²);
    # B: a long step mostly sideways (cosine ~ -0.3, linear term -‖∇‖²). The true FW oracle picks B.
    side = {n: 3 * torch.randn(v.shape, generator=g) for n, v in grad.items()}
    dirs = [{k: -0.01 * grad[k] for k in names}, {k: -grad[k] + side[k] for k in names}]
    paths = write_candidates(tiny_pool_cfg, tmp_path / "ab", 2, directions=dirs)
    paths += write_candidates(tiny_pool_cfg, tmp_path / "noise", 4, noise=0.1)
    paths.append(write_mismatched(tmp_path / "other_arch"))
    m = FrankWolfeMerging(pool, method_cfg("fw_merging_hard", start="task_arithmetic", candidates=paths))
    assert "other_arch" in m.candidates.skipped and "shape" in m.candidates.skipped["other_arch"]
    assert m.state.vertex_names == ["cand00", "cand01", "cand00_2", "cand01_2", "cand02", "cand03", "initial"]

    scores = m.state.linear_terms([grad])[0]  # [V, L]
    th = theta(m)
    cands = [load_file(p) for p in paths[:-1]]
    direct = torch.tensor([[float((grad[n] * (c[n].float() - th[n])).sum()) for n in m.names] for c in cands]
                          + [[float((grad[n] * (m.state.vertex_tensor(6, n) - th[n])).sum()) for n in m.names]],
                          dtype=torch.float64)
    torch.testing.assert_close(scores, direct, rtol=1e-4, atol=1e-3)
    assert int(lmo(scores, "task")[0]) == int(direct.sum(1).argmin())
    assert torch.equal(lmo(scores, "layer"), direct.argmin(0))
    # at θ = pretrained, B wins on the true linear term while a cosine score would prefer A
    m0 = FrankWolfeMerging(pool, method_cfg("fw_merging_hard", start="pretrained", init_vertex=False,
                                            candidates=paths[:2]))
    s0 = m0.state.linear_terms([grad])[0]
    assert int(lmo(s0, "task")[0]) == 1
    cos = [sum(float(torch.nn.functional.cosine_similarity(grad[n].flatten(), d[n].flatten(), 0)) for n in names)
           for d in dirs]
    assert cos[0] < cos[1]
    excluded = torch.zeros_like(s0, dtype=torch.bool)
    excluded[1] = True
    assert int(lmo(s0, "task", excluded)[0]) == 0


def test_cross_entropy_objective_reads_calibration_labels(pool, tiny_pool_cfg):
    from torch.func import functional_call

    from adamerge.run.data import encode, load_tokenizer, read_jsonl

    m = FrankWolfeMerging(pool, method_cfg("fw_merging_soft", objective="cross_entropy", labelled_size=10,
                                           labelled_batch_size=4))
    value, per_task = m.objective_grads({}, per_task=True)
    _, total = m.objective_grads({}, per_task=False)
    assert len(per_task) == 2
    for n in m.names:  # the per-task gradients (soft LMOs) add up to the objective's gradient
        torch.testing.assert_close(per_task[0][n] + per_task[1][n], total[0][n], atol=1e-6, rtol=1e-4)
    tok = load_tokenizer(pool.base_path)
    expected = 0.0
    for task, spec in tiny_pool_cfg["tasks"].items():
        texts, labels = read_jsonl(spec["calibration"], task, need_labels=True)
        params = {**{n: m.state.theta(n) for n in m.names}, **pool.head(task)}
        logits = functional_call(pool.base_model, params, args=(), kwargs=encode(tok, texts[:10], 64)).logits
        expected += float(torch.nn.functional.cross_entropy(logits, torch.tensor(labels[:10])))
    assert float(value) == pytest.approx(expected, rel=1e-4)


class Quadratic(FrankWolfeMerging):
    """ℓ(θ) = ½‖θ − p‖² with p outside the hull, whose closest point in the hull is a known vertex."""

    target: dict[str, torch.Tensor] = {}

    def objective_grads(self, batch, per_task):
        diff = {n: self.state.theta(n) - self.target[n] for n in self.names}
        return 0.5 * sum((d ** 2).sum() for d in diff.values()), [diff]


@pytest.mark.parametrize("granularity,step_size,merge_scale", [("task", 1.0, 1.0), ("layer", 1.0, 1.0),
                                                                ("task", 0.1, 0.3)])
def test_hard_variant_converges_to_the_optimal_vertex(pool, tiny_pool_cfg, tmp_path, granularity, step_size,
                                                      merge_scale):
    paths = write_candidates(tiny_pool_cfg, tmp_path / "c", 5, noise=0.05)
    cands = [load_file(p) for p in paths]
    names = pool.shared_names()
    # task-wise: vertex 2 everywhere; layer-wise: a different candidate per tensor (a vertex of the product)
    best = {n: 2 if granularity == "task" else i % 5 for i, n in enumerate(names)}
    opt = {n: cands[best[n]][n] for n in names}
    centroid = {n: sum(c[n] for c in cands) / len(cands) for n in names}
    # ⟨θ* − p, θ_i − θ*⟩ = ½⟨centroid − θ*, θ_i − θ*⟩ > 0 for every other vertex: θ* is optimal
    Quadratic.target = {n: opt[n] + 0.5 * (opt[n] - centroid[n]) for n in names}
    m = Quadratic(pool, method_cfg("fw_merging_hard", candidates=paths, granularity=granularity,
                                   step_size=step_size, merge_scale=merge_scale))
    d = [dist(theta(m), opt)]
    for _ in range(6):
        rec = m.iterate({})
        d.append(dist(theta(m), opt))
    w = torch.tensor(m.report()["coefficients"])  # [L, 1 + N]: weight of each checkpoint in θ_T
    if step_size == 1.0:  # the classic γ_t = 2/(t+2): reaches the vertex
        assert d[-1] < 1e-4 * d[0], d
        torch.testing.assert_close(w[:, 1:].argmax(1), torch.tensor([best[n] for n in names]))
        torch.testing.assert_close(w.max(1).values, torch.ones(len(names), dtype=w.dtype), atol=1e-4, rtol=0)
    else:  # the authors' small steps: every iteration moves toward it
        assert all(b < a for a, b in zip(d, d[1:])), d
        assert rec["selected"]["all"] == {"cand02": len(names)}


RSS_SCRIPT = textwrap.dedent("""
    import gc, json, resource, sys
    import torch
    torch.set_num_threads(1)
    from adamerge.run.datamodule import CalibrationDataModule
    from adamerge.methods.frank_wolfe import FrankWolfeMerging
    from adamerge.pool.config import pool_from_config
    pool_cfg, cands = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    pool = pool_from_config(pool_cfg)
    batch = CalibrationDataModule.from_pool(pool, batch_size=4, max_length=16).train_dataloader().dataset.batch(0)
    for n in (4, 16):  # memory freed after 4 is reused: the peak grows only if 16 candidates need more
        m = FrankWolfeMerging(pool, {"variant": "hard", "granularity": "layer", "merge_fn": "ties",
                                     "candidates": cands[:n], "step_size": 1.0})
        m.iterate(batch)
        del m
        gc.collect()
        print("RSS", n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")


def test_peak_memory_does_not_grow_with_the_number_of_candidates(tiny_pool_cfg, tmp_path):
    import shutil

    from transformers import BertForSequenceClassification

    # a wider tiny BERT than the shared fixture, so that one model (~16 MiB) stands out of the noise
    base = tmp_path / "base"
    shutil.copytree(tiny_pool_cfg["base"], base)  # tokenizer
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_config(hidden_size=128, intermediate_size=256)).save_pretrained(base)
    pool_cfg = {**tiny_pool_cfg, "base": str(base)}
    model_bytes = sum(v.numel() * 4 for v in load_file(str(base / "model.safetensors")).values())
    paths = write_candidates(pool_cfg, tmp_path / "cands", 16, noise=0.02)
    # the candidates are noisy copies of the base, whose head has 2 outputs: every task reads 2 labels
    pool_cfg["tasks"] = {t: {**spec, "expert": paths[i], "num_labels": 2, "label_names": None}
                         for i, (t, spec) in enumerate(pool_cfg["tasks"].items())}
    # glibc's malloc keeps freed blocks in per-thread arenas and raises its mmap threshold as it goes, so
    # the peak RSS also measured where frees happened to land: one arena, and every large block its own
    # mmap (returned on free), make it follow what is live
    env = dict(os.environ, MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, json.dumps(pool_cfg), json.dumps(paths)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rss = {int(line.split()[1]): int(line.split()[2]) for line in out.stdout.splitlines() if line.startswith("RSS")}
    print(f"model {model_bytes / 2**20:.1f} MiB, peak RSS 4: {rss[4] / 2**20:.0f} MiB, 16: {rss[16] / 2**20:.0f} MiB")
    # stacking the 12 extra candidates would cost 12 models; 4 leaves room for what the allocator keeps
    assert rss[16] - rss[4] < 4 * model_bytes, (rss, model_bytes)


def read_metrics(run: Path) -> list[dict]:
    rows = []
    for f in sorted((run / "logs").glob("*/metrics.csv")):
        with f.open() as fh:
            rows += [r for r in csv.DictReader(fh) if r.get("loss")]
    return rows


def train(pool_cfg: dict, out, *extra) -> None:
    helpers.train_here(pool_cfg, out, "data.batch_size=8", "trainer.log_every_n_steps=1", "evaluate.reference_rows=false",
                       *extra)


def test_soft_end_to_end_resumes_between_iterations(tiny_pool_cfg, pool, tmp_path, capsys, caplog):
    from adamerge.run.datamodule import CalibrationDataModule

    cdir = tmp_path / "cands"
    write_candidates(tiny_pool_cfg, cdir, 2, noise=0.05)
    write_mismatched(cdir / "zz_other_arch")
    cands = [spec["expert"] for spec in tiny_pool_cfg["tasks"].values()]
    over = {"candidates": cands, "candidates_dir": str(cdir), "inner_steps": 2, "inner_lr": 0.05}
    args = ["method=fw_merging_soft", f"method.candidates=[{','.join(cands)}]", f"method.candidates_dir={cdir}",
            "method.inner_steps=2", "method.inner_lr=0.05", "checkpoint.every_n_steps=1"]
    run = tmp_path / "run"
    train(tiny_pool_cfg, run, *args, "trainer.max_steps=2", "evaluate.enabled=false")
    assert (run / "checkpoints" / "step000001.ckpt").exists()
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="adamerge"):
        train(tiny_pool_cfg, run, *args, "trainer.max_steps=3", "resume=last", "export.overwrite=true")
    printed = capsys.readouterr()
    assert "| fw_merging_soft |" in printed.out
    assert "candidate 'zz_other_arch' skipped" in printed.out + printed.err + caplog.text

    # the same three iterations in one go, in this process
    ref = FrankWolfeMerging(pool, method_cfg("fw_merging_soft", **over))
    dm = CalibrationDataModule.from_pool(pool, batch_size=8, max_length=64, seed=0,
                                         holdout_fraction=0.2)  # train.py's default data.holdout_fraction
    ref.use_data(dm)
    stream = dm.train_dataloader().dataset
    for t in range(3):
        ref.iterate(stream.batch(t))
    exported = helpers.exported_backbone(run)
    for n in ref.names:
        torch.testing.assert_close(exported[n], ref.state.theta(n), atol=1e-6, rtol=0)
    assert dist(theta(ref), {n: pool.base_tensor(n) for n in ref.names}) > 0  # it moved

    rep = json.loads((run / "export" / "coefficients.json").read_text())
    fw = rep["frank_wolfe"]
    assert fw["iterations"] == 3 and [h["iteration"] for h in fw["history"]] == [0, 1, 2]
    assert "zz_other_arch" in fw["skipped"]
    assert rep["tasks"] == ["pretrained", "task0", "task1", "cand00", "cand01"]
    assert set(fw["history"][0]["selected"]) == {"task0", "task1"}  # one vertex per task
    chosen = [next(iter(s)) for s in fw["history"][0]["selected"].values()]
    assert len(set(chosen)) == 2  # distinct
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert all(r["fw/coef_mean"] and r["fw/selected/task0"] and r["fw/gap"] for r in rows)


def test_hard_layerwise_ties_through_train(tiny_pool_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_pool_cfg, run, "method=fw_merging_hard", "method.granularity=layer", "method.merge_fn=ties",
          "method.step_size=1.0", "trainer.max_steps=2", "evaluate.enabled=false")
    rep = json.loads((run / "export" / "coefficients.json").read_text())
    fw = rep["frank_wolfe"]
    assert fw["iterations"] == 2 and not fw["coefficients_exact"]
    assert sum(fw["history"][0]["selected"]["all"].values()) <= len(rep["tensors"])
    rows = read_metrics(run)
    assert [float(r["fw/gamma"]) for r in rows] == pytest.approx([1.0, 2 / 3])
    assert all(r["fw/selected"] != "" and 0 < float(r["fw/selected_share"]) <= 1 for r in rows)
