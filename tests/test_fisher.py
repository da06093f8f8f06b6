"""Fisher merging: the weighting rule, the Fisher against a direct per-example computation, train.py end to end."""

from __future__ import annotations

import json

import torch

import helpers
from adamerge.methods import get_method
from adamerge.methods.fisher import fisher_combine_step
from adamerge.pool.config import pool_from_config
from adamerge.run.data import load_tokenizer, read_jsonl

N_EX, MAX_LEN = 4, 16


def fm_cfg(**kw) -> dict:
    cfg = {"name": "fisher_merging", "id": "fisher_merging", "num_examples": N_EX, "max_length": MAX_LEN,
           "batch_size": 3, "normalize": False, "floor": 1e-6, "seed": 0}
    cfg.update(kw)
    return cfg


def test_equal_fishers_give_the_average_and_weights_follow_fisher():
    torch.manual_seed(0)
    taus = [{"w": torch.randn(5, 3)}, {"w": torch.randn(5, 3)}]
    f = torch.rand(5, 3)
    for normalize in (False, True):
        num, den = {}, {}
        for tau in taus:
            fisher_combine_step(num, den, {"w": f.clone()}, tau, 1e-6, normalize)
        torch.testing.assert_close(num["w"] / den["w"], (taus[0]["w"] + taus[1]["w"]) / 2)
    # unequal: entrywise (F1 τ1 + F2 τ2) / (F1 + F2), F+ε; normalize divides each F_i by ‖F_i‖ first
    f1, f2 = torch.rand(5, 3), 3 * torch.rand(5, 3)
    num, den = {}, {}
    fisher_combine_step(num, den, {"w": f1}, taus[0], 1e-6, False)
    fisher_combine_step(num, den, {"w": f2}, taus[1], 1e-6, False)
    ref = ((f1 + 1e-6) * taus[0]["w"] + (f2 + 1e-6) * taus[1]["w"]) / (f1 + f2 + 2e-6)
    torch.testing.assert_close(num["w"] / den["w"], ref)
    num, den = {}, {}
    fisher_combine_step(num, den, {"w": f1}, taus[0], 1e-6, True)
    fisher_combine_step(num, den, {"w": f2}, taus[1], 1e-6, True)
    c1, c2 = 1 / (f1.norm() + 1e-6), 1 / (f2.norm() + 1e-6)
    ref = (c1 * (f1 + 1e-6) * taus[0]["w"] + c2 * (f2 + 1e-6) * taus[1]["w"]) / (c1 * (f1 + 1e-6) + c2 * (f2 + 1e-6))
    torch.testing.assert_close(num["w"] / den["w"], ref)


def direct_fisher(pool, tiny_pool_cfg, task: str, seed: int) -> dict[str, torch.Tensor]:
    """Mean squared per-example gradient of log p(ŷ|x) in the real expert, ŷ ~ its own prediction."""
    from transformers import BertForSequenceClassification

    spec = tiny_pool_cfg["tasks"][task]
    model = BertForSequenceClassification.from_pretrained(spec["expert"]).eval()
    texts = read_jsonl(spec["calibration"], task)[0][:N_EX]
    tok = load_tokenizer(pool.base_path)
    params = dict(model.named_parameters())
    out = {n: torch.zeros_like(p) for n, p in params.items() if not n.startswith("classifier.")}
    for i, text in enumerate(texts):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        enc = tok([text], return_tensors="pt", truncation=True, max_length=MAX_LEN)
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        logp = torch.log_softmax(model(**enc).logits, -1)
        y = torch.multinomial(logp.detach().exp(), 1, generator=g)
        model.zero_grad()
        (-logp.gather(1, y).sum()).backward()
        for n in out:
            out[n] += params[n].grad ** 2
    return {n: v / len(texts) for n, v in out.items()}


def test_fisher_against_direct_computation(pool, tiny_pool_cfg):
    m = get_method("fisher_merging")(pool, fm_cfg())
    merged = m.merged.merged_params()
    fishers = [direct_fisher(pool, tiny_pool_cfg, t, seed=k) for k, t in enumerate(pool.task_names)]
    checked = 0
    for n in ("bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.output.dense.bias",
              "bert.embeddings.LayerNorm.weight", "bert.pooler.dense.weight"):
        f = [fk[n] + 1e-6 for fk in fishers]
        taus = [pool.task_vector(t, n) for t in pool.task_names]
        ref = pool.base_tensor(n) + (f[0] * taus[0] + f[1] * taus[1]) / (f[0] + f[1])
        torch.testing.assert_close(merged[n], ref, atol=1e-5, rtol=1e-4)
        # the Fisher weighting really moves away from the plain average here
        checked += int((ref - pool.base_tensor(n) - (taus[0] + taus[1]) / 2).abs().max() > 1e-3)
    assert checked >= 2


def test_fisher_end_to_end_through_train(tiny_pool_cfg, tmp_path):
    out = tmp_path / "run"
    code = helpers.run_inprocess(["method=fisher_merging", f"out_dir={out}", "method.num_examples=4",
                                  "data.max_length=16", "evaluate.reference_rows=false"], tiny_pool_cfg)
    assert code == 0
    rep = json.loads((out / "export" / "coefficients.json").read_text())
    assert rep["method"] == "fisher_merging" and rep["num_trainable"] == 0
    assert "fisher_merging" in (out / "eval.json").read_text()
    assert (out / "export" / "model" / "model.safetensors").exists()


# -- DDP: statistics of each process's slice are all-reduced -----------------------------------------
def _ddp_worker(rank: int, world: int, pool_cfg: dict, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pool = pool_from_config(pool_cfg)
        res = {"fisher": get_method("fisher_merging")(pool, fm_cfg(num_examples=5)).merged.deltas(),
               "regmean_pp": get_method("regmean_pp")(pool, {"name": "regmean_pp", "id": "regmean_pp", "num_examples": 6,
                                                             "batch_size": 2, "max_length": MAX_LEN}).merged.deltas()}
        if rank == 0:
            torch.save(res, out)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(pool, tiny_pool_cfg, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the workers inherit the imported modules (a spawn re-imports torch and transformers)
    mp.start_processes(_ddp_worker, args=(2, tiny_pool_cfg, port, str(tmp_path / "ddp.pt")), nprocs=2, join=True,
                       start_method="fork")
    got = torch.load(tmp_path / "ddp.pt")
    one = {"fisher": get_method("fisher_merging")(pool, fm_cfg(num_examples=5)).merged.deltas(),
           "regmean_pp": get_method("regmean_pp")(pool, {"name": "regmean_pp", "id": "regmean_pp", "num_examples": 6,
                                                         "batch_size": 2, "max_length": MAX_LEN}).merged.deltas()}
    for key in one:
        for n in one[key]:
            torch.testing.assert_close(got[key][n], one[key][n], atol=1e-5, rtol=1e-4, msg=f"{key} {n}")


def test_train_py_ddp_closed_form_equals_one_process(tiny_conf_dir, tiny_pool_cfg, tmp_path):
    """``trainer=ddp`` reaches closed-form methods through train.py: 2 CPU processes over gloo, statistics
    all-reduced, one export (rank 0) equal to the single-process one."""
    from safetensors.torch import load_file

    args = ["method=regmean_pp", "method.num_examples=6", "method.batch_size=2", f"method.max_length={MAX_LEN}",
            "evaluate.enabled=false"]
    helpers.train_here(tiny_pool_cfg, tmp_path / "one", *args)  # in this process: no interpreter start-up
    proc = helpers.run_train(["--config-dir", str(tiny_conf_dir), "pool=tiny", *args, f"out_dir={tmp_path / 'two'}",
                              "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])
    assert "Initializing distributed: GLOBAL_RANK: 1" in proc.stdout + proc.stderr  # really two processes
    one = load_file(tmp_path / "one" / "export" / "model" / "model.safetensors")
    two = load_file(tmp_path / "two" / "export" / "model" / "model.safetensors")
    assert one.keys() == two.keys()
    for n in one:
        torch.testing.assert_close(two[n], one[n], atol=1e-5, rtol=1e-4, msg=n)
