"""Task vectors sharded across DDP processes (``task_vectors.shard=true``): the same coefficients and export
as one unsharded process, an exact resume, uneven slices, 1/N of the bytes per process, clear refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_pool, run_inprocess, run_train, write_pool_config

ODD = "bert.encoder.layer.0.intermediate.dense.bias"  # 63 entries: 32 + 31 over 2 processes


@pytest.fixture(scope="module")
def odd_pool(tmp_path_factory):
    """Two experts of a tiny BERT whose FFN width (63) is odd, so some tensors do not split evenly in 2."""
    return make_pool(tmp_path_factory.mktemp("pool_odd"), k=2, intermediate_size=63)


@pytest.fixture(scope="module")
def conf(tmp_path_factory, odd_pool):
    d = tmp_path_factory.mktemp("conf_odd")
    write_pool_config(d, "odd", odd_pool)
    return d


def train(conf: Path, out: Path, *extra: str, method: str = "adamerging_layerwise", **kw):
    # a few steps move the coefficients; diversity's batch-mean prediction is each process's own (documented), so
    # the processes compare on the entropy alone
    lr = ["method.lr=0.05", "method.diversity=0"] if method.startswith("adamerging") else []
    # attention key biases have a zero gradient in exact arithmetic (softmax is shift-invariant): their Adam
    # steps are rounding noise (~1e-6 apart between any two summation orders, unsharded DDP included)
    return run_train(["--config-dir", str(conf), "pool=odd", f"out_dir={out}", f"method={method}", *lr,
                      "data.batch_size=8", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1",
                      "evaluate.reference_rows=false", "task_vectors.exclude=[attention.self.key.bias]",
                      # every calibration text trained on, the end exported: runs with different checkpoint
                      # intervals compare their training, not a held-out choice among their checkpoints
                      "data.holdout_fraction=0", *extra], **kw)


SHARDED = ("trainer=ddp", "trainer.devices=2", "task_vectors.shard=true")


def coefs(run: Path) -> torch.Tensor:
    return torch.tensor(json.loads((run / "export" / "coefficients.json").read_text())["coefficients"])


@pytest.fixture(scope="module")
def sharded5(conf, tmp_path_factory):
    """2 gloo processes, sharded task vectors, 5 steps (evaluation and export on rank 0)."""
    out = tmp_path_factory.mktemp("sharded5") / "run"
    train(conf, out, *SHARDED, "trainer.max_steps=5", "checkpoint.every_n_steps=1", timeout=300)
    return out


def test_local_slices_cover_uneven_tensors():
    from adamerge.core.sharded import local_slice

    for numel in (1, 2, 5, 63, 64):
        for world in (1, 2, 3, 4):
            flat = torch.arange(2 * numel, dtype=torch.float32).view(2, numel) + 1
            parts = [local_slice(flat, r, world) for r in range(world)]
            assert len({p.shape for p in parts}) == 1  # equal slices, the last ones zero-padded
            torch.testing.assert_close(torch.cat(parts, 1)[:, :numel], flat, rtol=0, atol=0)
            assert (torch.cat(parts, 1)[:, numel:] == 0).all()


def test_sharded_step_in_one_process_equals_the_unsharded_step(odd_pool):
    """Without a process group the slice is the whole tensor: the same value and coefficient gradient."""
    from adamerge.methods import get_method
    from adamerge.pool.config import pool_from_config
    from adamerge.run.data import StepBatches
    from adamerge.run.datamodule import CalibrationDataModule

    pool = pool_from_config(odd_pool)
    cfg = {"name": "adamerging", "granularity": "layer", "init": 0.3}
    plain, sharded = (get_method("adamerging")(pool, cfg, {"shard": s}) for s in (False, True))
    sharded.setup("fit")
    assert sharded.merged.sharded and not plain.merged.sharded
    dm = CalibrationDataModule.from_pool(pool, batch_size=4, max_length=32, seed=0, size=None)
    batch = StepBatches(dm.encoded, 4, 0).batch(0)
    (va, sa), (vb, sb) = plain.step_loss(batch), sharded.step_loss(batch)
    ga, gb = (torch.autograd.grad(s, m.merged.coefficients.raw)[0] for s, m in ((sa, plain), (sb, sharded)))
    torch.testing.assert_close(vb, va, rtol=0, atol=1e-6)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-7)
    pa, pb = plain.merged.merged_params(), sharded.merged.merged_params()
    for n in pa:
        torch.testing.assert_close(pb[n], pa[n], rtol=0, atol=0)


def test_two_sharded_processes_equal_one_unsharded(conf, sharded5, tmp_path):
    one = tmp_path / "one"
    train(conf, one, "trainer.max_steps=5", timeout=300)
    rep = json.loads((sharded5 / "export" / "coefficients.json").read_text())
    assert ODD in rep["tensors"]  # an odd-sized tensor is merged and sharded
    torch.testing.assert_close(coefs(sharded5), coefs(one), atol=1e-6, rtol=0)
    assert not torch.allclose(coefs(one), torch.full_like(coefs(one), 0.3))  # the coefficients moved
    # rank 0 evaluated and exported the merge gathered from both processes' slices
    a, b = (load_file(run / "export" / "model" / "model.safetensors") for run in (sharded5, one))
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=0)
    assert (sharded5 / "eval.json").exists()


def test_each_process_holds_half_the_task_vectors(odd_pool, sharded5):
    from adamerge.core.task_vectors import TaskVectors
    from adamerge.pool.config import pool_from_config

    tv = TaskVectors.from_pool(pool_from_config(odd_pool), exclude=["attention.self.key.bias"])  # as train()
    full = tv.nbytes()  # K·P fp32
    assert tv[ODD].shape[1:].numel() % 2 == 1
    logs = list(sharded5.glob("*.log"))
    held = {}
    for f in logs:  # rank 0 logs to train.log, rank 1 to train_ddp_process_1.log
        for m in re.finditer(r"sharded over 2 processes: rank (\d) holds (\d+) of (\d+) bytes \((\d+) padding", f.read_text()):
            held[int(m[1])] = (int(m[2]), int(m[3]), int(m[4]))
    assert set(held) == {0, 1}, [f.name for f in logs]
    for nbytes, total, _ in held.values():
        assert total == full
        assert nbytes <= 1.05 * full / 2 + tv.K * 4 * len(tv)  # at most one padded entry per tensor and task
        assert nbytes >= full / 2
    assert held[0][2] == 0 and held[1][2] > 0  # the odd tensors are padded on the last rank only
    # each process read its slices from the expert files: no process built the whole task vectors first
    assert not any("task vectors: 2 experts" in f.read_text() for f in logs)


def test_sharded_resume_is_exact(conf, sharded5, tmp_path):
    """Resuming the 2-process sharded run from its step-3 checkpoint ends where the uninterrupted run did."""
    part = tmp_path / "part"
    step3 = sharded5 / "checkpoints" / "step000003.ckpt"
    train(conf, part, *SHARDED, "trainer.max_steps=5", f"resume={step3}", "evaluate.enabled=false", timeout=300)
    torch.testing.assert_close(coefs(part), coefs(sharded5), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method, extra, words", [
    ("adamerging_layerwise", (), "needs a multi-process DDP trainer"),
    ("adamerging_layerwise", ("trainer=ddp", "trainer.devices=1"), "needs a multi-process DDP trainer"),
    ("concrete_adamerging_layerwise", ("trainer=ddp",), "is not supported"),
    ("task_arithmetic", ("trainer=ddp",), "is not supported"),
    ("adamerging_layerwise", ("trainer=ddp", "method.granularity=chunk"), "only task or layer can be sharded"),
    ("adamerging_layerwise", ("trainer=ddp", "task_vectors.lora=factorized"), "lora=factorized refused"),
])
def test_bad_shard_config_is_one_line_and_writes_nothing(odd_pool, tmp_path, capsys, method, extra, words):
    # in this process (train.py's cli): every refusal comes before any process is started
    code = run_inprocess([f"method={method}", f"out_dir={tmp_path / 'run'}", "task_vectors.shard=true", *extra],
                         odd_pool)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert err.strip().count("\n") == 0 and words in err
    assert not (tmp_path / "run" / "export").exists()


def test_shard_must_be_a_bool(odd_pool, tmp_path, capsys):
    code = run_inprocess([f"out_dir={tmp_path / 'run'}", "task_vectors.shard=maybe"], odd_pool)
    assert code == 2 and "config key 'task_vectors.shard' must be true or false" in capsys.readouterr().err
    assert not (tmp_path / "run" / "export").exists()


@pytest.mark.parametrize("env, devices, nodes, expected", [
    ({}, 2, 1, (0, 2)),                                          # Lightning's first process
    ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, 2, 1, (1, 2)),       # the process it starts
    ({"LOCAL_RANK": "3", "NODE_RANK": "1"}, 4, 2, (7, 8)),       # second node
    ({"RANK": "5", "WORLD_SIZE": "6", "LOCAL_RANK": "1"}, 2, 3, (5, 6)),  # torchrun
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, 2, 2, (3, 4)),  # srun
    ({}, "auto", 1, None),                                       # unknown: read whole, slice at setup
])
def test_launch_rank_world(monkeypatch, env, devices, nodes, expected):
    from adamerge.run.distributed import launch_rank_world

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launch_rank_world(devices, nodes) == expected
