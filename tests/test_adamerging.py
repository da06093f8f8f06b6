"""AdaMerging end to end through the real train.py: learning, resume, DDP, bf16, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import helpers
from helpers import logged_losses as losses
from helpers import run_train


def coefs(run: Path) -> torch.Tensor:
    return torch.tensor(json.loads((run / "export" / "coefficients.json").read_text())["coefficients"])


def train(where, out, *extra, **kw):
    """``where``: a pool config (train.py's cli in this process) or a config dir holding pool/tiny.yaml (a
    ``python train.py`` subprocess, e.g. for DDP)."""
    # a larger lr than the authors' 1e-3 so a few steps on a tiny model move the coefficients visibly
    lr = ["method.lr=0.05"] if any("method=adamerging" in a for a in extra) else []
    args = ["data.batch_size=8", "trainer.log_every_n_steps=1", *lr, *extra]
    if isinstance(where, dict):
        return helpers.train_here(where, out, *args)
    return run_train(["--config-dir", str(where), "pool=tiny", f"out_dir={out}", *args], **kw)


def test_layerwise_entropy_goes_down_and_coefficients_move(tiny_pool_cfg, tmp_path, capsys):
    train(tiny_pool_cfg, tmp_path / "run", "method=adamerging_layerwise", "trainer.max_steps=15")
    printed = capsys.readouterr().out
    ls = losses(tmp_path / "run")
    assert len(ls) == 15
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3  # entropy decreases
    c = coefs(tmp_path / "run")
    assert c.shape[1] == 2 and c.shape[0] > 30  # [L, K] layer-wise
    assert (c - 0.3).abs().max() > 0.1  # moved from the init
    assert ((c >= 0) & (c <= 1)).all()  # clamped
    assert "adamerging_layerwise" in printed and "| expert |" in printed  # the table is printed
    assert (tmp_path / "run" / "export" / "coefficients.png").exists()


def test_taskwise_pp_uses_trimmed_vectors(tiny_pool_cfg, tmp_path):
    train(tiny_pool_cfg, tmp_path / "run", "method=adamerging_taskwise_pp", "trainer.max_steps=3")
    rep = json.loads((tmp_path / "run" / "export" / "coefficients.json").read_text())
    assert rep["granularity"] == "task" and rep["num_trainable"] == 2
    c = torch.tensor(rep["coefficients"])
    assert torch.allclose(c, c[0].expand_as(c))  # one coefficient per task for every tensor


def test_resume_continues_exactly(tiny_pool_cfg, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["method=adamerging_layerwise", "checkpoint.every_n_steps=4"]
    train(tiny_pool_cfg, full, *args, "trainer.max_steps=10")
    train(tiny_pool_cfg, part, *args, "trainer.max_steps=6", "evaluate.enabled=false")
    assert (part / "checkpoints" / "step000004.ckpt").exists()
    train(tiny_pool_cfg, part, *args, "trainer.max_steps=10", "resume=last", "export.overwrite=true",
          "evaluate.enabled=false")
    torch.testing.assert_close(coefs(part), coefs(full), atol=1e-6, rtol=0)
    assert not torch.allclose(coefs(full), torch.full_like(coefs(full), 0.3))


def test_resume_refuses_checkpoint_of_another_method_or_pool(tiny_pool_cfg, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_pool_cfg, run, "method=adamerging_layerwise", "trainer.max_steps=2", "evaluate.enabled=false")
    # the refusals come before any work: train.py's cli in this process, on the same pool
    args = [f"out_dir={run}", "data.batch_size=8", "trainer.max_steps=4", "resume=last", "export.overwrite=true"]
    assert helpers.run_inprocess(["method=adamerging_taskwise", *args], tiny_pool_cfg) == 2
    assert "made by method 'adamerging_layerwise', this run is 'adamerging_taskwise'" in capsys.readouterr().err
    assert helpers.run_inprocess(["method=adamerging_layerwise", *args, "task_vectors.exclude=[embeddings]"],
                                 tiny_pool_cfg) == 2
    err = capsys.readouterr().err
    assert "different pool" in err and "merged_tensors" in err


def test_ddp_two_processes_equals_one(tiny_conf_dir, tiny_pool_cfg, tmp_path):
    # diversity's batch-mean prediction is each process's own (docs): the entropy alone is the same objective
    args = ["method=adamerging_layerwise", "method.diversity=0", "trainer.max_steps=4", "evaluate.enabled=false",
            "trainer.accelerator=cpu"]
    train(tiny_pool_cfg, tmp_path / "one", *args)
    train(tiny_conf_dir, tmp_path / "two", *args, "trainer=ddp", "trainer.devices=2", timeout=600)
    torch.testing.assert_close(coefs(tmp_path / "two"), coefs(tmp_path / "one"), atol=1e-5, rtol=1e-4)


def test_bf16_mixed_runs_and_stays_finite(tiny_pool_cfg, tmp_path):
    train(tiny_pool_cfg, tmp_path / "run", "method=adamerging_layerwise", "trainer.max_steps=4",
          "trainer.precision=bf16-mixed", "evaluate.enabled=false")
    c = coefs(tmp_path / "run")
    assert torch.isfinite(c).all() and (c - 0.3).abs().max() > 0
    assert all(map(lambda v: v == v, losses(tmp_path / "run")))


@pytest.mark.parametrize("method", ["adamerging_layerwise", "ties_merging"])
def test_export_reproduces_evaluation_accuracy(tiny_pool_cfg, tmp_path, method):
    from adamerge.export import load_task_model
    from adamerge.run.data import encode, load_tokenizer, read_jsonl

    run = tmp_path / "run"
    train(tiny_pool_cfg, run, f"method={method}", "trainer.max_steps=3")
    report = json.loads((run / "export" / "eval.json").read_text())
    tok = load_tokenizer(run / "export" / "model")
    for task, spec in tiny_pool_cfg["tasks"].items():
        model = load_task_model(run / "export", task)
        texts, labels = read_jsonl(spec["test"], task, need_labels=True)
        with torch.no_grad():
            pred = model(**encode(tok, texts, 64)).logits.argmax(-1)
        acc = (pred == torch.tensor(labels)).float().mean().item()
        assert acc == pytest.approx(report["rows"][method][task], abs=1e-6)


@pytest.mark.parametrize("start", ["ties_merging", "regmean"])
def test_learned_method_starts_from_another_merge(tiny_pool_cfg, tmp_path, start):
    """method.init=<merge>: W = W_start + Σ c_k (θ_k − θ_start), c = 0 at the start."""
    import helpers
    from adamerge.methods import get_method
    from adamerge.pool.config import pool_from_config

    pool = pool_from_config(tiny_pool_cfg)
    start_cfg = helpers.compose([f"method={start}"]).method
    from omegaconf import OmegaConf

    start_cfg = OmegaConf.to_container(start_cfg, resolve=True)
    ref = get_method(start_cfg["name"])(pool, start_cfg, {}).merged.merged_state_dict()
    m = get_method("adamerging")(pool, {"name": "adamerging", "id": "am", "init": start_cfg}, {})
    got = m.merged.merged_state_dict()
    for n in m.merged.names:
        torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # c = e_k gives expert k
        m.merged.coefficients.raw.zero_()
        m.merged.coefficients.raw[:, 1] = 1
    n = m.merged.names[3]
    torch.testing.assert_close(m.merged.merged_state_dict()[n], pool.expert_tensor("task1", n), atol=1e-5, rtol=1e-5)
    rows = torch.tensor([3, 1000])  # the training step's merge (buffers, looked-up rows) adds the start too
    fast = {n: v.detach().clone() for n, v in m.merged.merged_params(reuse_buffers=True, rows=rows).items()}
    for n, v in m.merged.merged_params().items():
        r = rows if n == m.merged.lookup_name else slice(None)
        torch.testing.assert_close(fast[n][r], v[r], atol=1e-6, rtol=1e-5)
    out = tmp_path / "run"
    code = helpers.run_inprocess(["method=adamerging_layerwise", f"method.init={start}", f"out_dir={out}",
                                  "trainer.max_steps=3", "data.batch_size=8", "method.lr=0.05",
                                  "evaluate.enabled=false"], tiny_pool_cfg)
    assert code == 0
    assert json.loads((out / "export" / "coefficients.json").read_text())["coefficients"][0][0] != 0.3


def test_diversity_term_penalizes_collapse_onto_one_class(pool):
    """method.diversity subtracts the entropy of the batch's mean prediction (information maximisation)."""
    import math

    from adamerge.core.objectives import entropy, marginal_entropy
    from adamerge.methods import get_method

    confident_one_class = torch.tensor([[5.0, 0.0, 0.0]] * 4)
    confident_spread = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    assert entropy(confident_one_class) == pytest.approx(float(entropy(confident_spread)))  # entropy can't tell
    assert marginal_entropy(confident_spread) > marginal_entropy(confident_one_class) + 0.5
    assert float(marginal_entropy(torch.zeros(4, 3))) == pytest.approx(math.log(3))
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # masked positions do not count
    logits = torch.tensor([[[5.0, 0.0], [5.0, 0.0], [0.0, 9.0]]])
    assert float(marginal_entropy(logits, mask)) == pytest.approx(float(marginal_entropy(logits[0, :2])))

    cfg = {"name": "adamerging", "id": "adamerging_layerwise", "granularity": "layer", "init": 0.3}
    plain = get_method("adamerging")(pool, cfg)
    im = get_method("adamerging")(pool, {**cfg, "diversity": 0.5})
    task = pool.task_names[0]
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, 2000, (6, 8), generator=g), "attention_mask": torch.ones(6, 8, dtype=torch.long)}
    logits, _ = plain.task_logits(task, inputs)
    torch.testing.assert_close(im.task_loss(task, inputs), plain.task_loss(task, inputs) - 0.5 * marginal_entropy(logits))


def test_the_learned_base_has_no_objective_of_its_own(pool):
    """MergeMethod carries no method's objective: a learned method mixes one in (EntropyObjective) or defines
    task_loss itself (Expert Merging); one that does neither fails at its first loss, naming what to do."""
    from adamerge.methods import get_method
    from adamerge.methods.base import MergeMethod
    from adamerge.methods.objectives import EntropyObjective

    class NoObjective(MergeMethod):
        name = "no_objective_test"

    m = NoObjective(pool, {"name": "no_objective_test", "granularity": "task", "init": 0.3})
    with pytest.raises(NotImplementedError, match="chooses no objective"):
        m.task_loss("task0", {})
    entropy_methods = {get_method(n) for n in ("adamerging", "concrete_adamerging", "projective", "fw_merging")}
    assert all(issubclass(c, EntropyObjective) for c in entropy_methods)
    assert not issubclass(get_method("expert_merging"), EntropyObjective)
