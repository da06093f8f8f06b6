"""What bench/speed.py relies on: memory per added expert is the task vector's own bytes, counted in
tensor bytes (never wall time); the bench's tensor counter, per-configuration runner and results file."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from adamerge.methods import get_method
from adamerge.pool.config import pool_from_config

ROOT = Path(__file__).resolve().parents[1]


def load_speed():
    """bench/speed.py as a module; its sibling modules (speed_setups, speed_report) import as they do when it runs."""
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "bench" / "speed.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


speed = load_speed()
import speed_setups  # noqa: E402 (importable once load_speed put bench/ on sys.path)


def test_tensor_bytes_counts_storages_once_and_forgets_freed_ones():
    tb = speed.TensorBytes()
    base = torch.zeros(1000)  # 4000 bytes, registered before
    tb.track([base])
    with tb:
        a = torch.ones(2000)  # +8000
        v = a[10:].view(-1)  # a view: no new storage
        b = base + 1  # +4000
        del a, v, b
        c = torch.empty(500, dtype=torch.bfloat16).fill_(1)  # +1000, after the others were freed
    assert tb.peak == 4000 + 8000 + 4000
    assert tb.current == 4000 + 1000
    del c
    assert tb.current == 4000
    with tb:  # a sparse tensor has no storage: its indices and values are counted
        sp = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.ones(2, 3), (5, 3)) * 2
    assert tb.current == 4000 + 2 * 8 + 6 * 4
    del sp


@pytest.fixture(scope="module")
def pool4(tmp_path_factory):
    import helpers

    return helpers.make_pool(tmp_path_factory.mktemp("pool4"), k=4, n_cal=4, n_test=4)


def step_peak(pool_cfg: dict, k: int, dtype: str) -> tuple[int, int]:
    """(peak live tensor bytes over two AdaMerging steps, task vectors' bytes) with the first k experts."""
    cfg = {**pool_cfg, "tasks": dict(list(pool_cfg["tasks"].items())[:k])}
    method = get_method("adamerging")(pool_from_config(cfg), dict(speed_setups.METHOD_CFG), {"dtype": dtype})
    opt = method.configure_optimizers()
    ids = torch.randint(1000, 2000, (4, 16), generator=torch.Generator().manual_seed(0))
    batch = {"task0": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}}
    mm = method.merged
    tb = speed.TensorBytes()
    tb.track([*mm.base.parameters(), *mm.base.buffers(), *mm.task_vectors.tensors.values(),
              *(v for h in mm.heads.values() for v in h.values()), *method.parameters()])
    with tb:
        for _ in range(2):  # the second step also holds Adam's state
            _, surrogate = method.step_loss(batch)
            surrogate.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return tb.peak, mm.task_vectors.nbytes()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: τ is converted a column block at a time
def test_peak_memory_grows_by_the_task_vector_bytes_per_expert(pool4, dtype):
    """Goal 2: adding experts adds their task vectors (in the storage dtype, ×1.05) and nothing else:
    no K-fold graphs, no per-step copies that scale with K."""
    peak2, tv2 = step_peak(pool4, 2, dtype)
    peak4, tv4 = step_peak(pool4, 4, dtype)
    added_tv = tv4 - tv2
    assert added_tv > 2**20  # a real amount (the embedding alone is 30522 x 32 per expert)
    assert peak4 - peak2 >= 0.95 * added_tv  # the task vectors themselves are counted
    assert peak4 - peak2 <= 1.05 * added_tv, f"{(peak4 - peak2) / added_tv:.2f}x the added task vector bytes"


def test_bench_runs_each_column_and_reports_ratios(tmp_path):
    """The child runner on a tiny pool (in process), then the tables from its results."""
    spec = speed.build_pool(tmp_path / "pool", "tiny", 3)
    assert len(spec["experts"]) == 3 and speed.build_pool(tmp_path / "pool", "tiny", 2) == spec  # reused
    args = argparse.Namespace(pool_dir=str(tmp_path / "pool"), device="cpu", threads=torch.get_num_threads(),
                              batch=2, seq=8, warmup=1, repeats=2, fusionbench_path=None, tensor_bytes=True)
    results = [speed.run_one(impl, k, args) for k in (2, 3) for impl in ("floor", "adamerge", "adamerge-bf16")]
    results.append(speed.run_one("adamerge-hosttv", 2, args))  # the --device cuda column's code path, on CPU
    by = {(r["impl"], r["k"]): r for r in results}
    for r in results:
        assert r["step_s"] > 0 and len(r["step_s_all"]) == 2 and r["rss_peak_mib"] > 0 and r["tensor_peak_mib"] > 0
    assert by[("floor", 2)]["tv_mib"] == 0
    torch.testing.assert_close(by[("adamerge", 3)]["tv_mib"], 1.5 * by[("adamerge", 2)]["tv_mib"])
    torch.testing.assert_close(by[("adamerge-bf16", 2)]["tv_mib"], 0.5 * by[("adamerge", 2)]["tv_mib"])
    assert by[("adamerge-hosttv", 2)]["tv_mib"] == by[("adamerge", 2)]["tv_mib"]
    results.append({"impl": "fusionbench", "k": 2, "error": "fusion_bench is not importable"})
    # the embedding table is looked up by rows, so a step streams less than all of τ
    assert 0 < by[("adamerge", 2)]["tv_streamed_mib"] < by[("adamerge", 2)]["tv_mib"]
    text = speed.tables(results, ["floor", "adamerge", "adamerge-bf16", "fusionbench"], cuda=False, bandwidth=10.0)
    bound = text.split("Lower bound")[1].split("\n")
    assert len([ln for ln in bound if ln.startswith("| 2 |") or ln.startswith("| 3 |")]) == 2
    header = text.split("\n")[0]
    assert "adamerge / floor" in header and "adamerge / fusionbench" in header
    main = text.split("Lower bound")[0]
    assert main.count("\n| 2 |") == 1 and main.count("\n| 3 |") == 1
    assert "fusionbench K=2: fusion_bench is not importable" in text
    inc = [ln for ln in text.split("\n") if ln.startswith("| adamerge |")][0].split(" | ")
    assert float(inc[1]) > 0  # τ MiB per expert column is filled (inc[2] on: RSS slopes, noisy on a toy model)


def test_results_file_appends_under_speed_and_keeps_other_sections(tmp_path):
    path = tmp_path / "RESULTS.md"
    speed.append_results(path, "### run 1\n\n| a |")
    assert path.read_text().startswith("# Benchmark results\n\n## Speed\n\n### run 1")
    path.write_text(path.read_text() + "\n## Quality\n\nquality table\n")
    speed.append_results(path, "### run 2\n\n| b |")
    text = path.read_text()
    assert text.index("### run 1") < text.index("### run 2") < text.index("## Quality")
    assert text.rstrip().endswith("quality table")
    other = tmp_path / "OTHER.md"
    other.write_text("# Results\n\n## Quality\n\nq\n")
    speed.append_results(other, "### run")
    assert other.read_text() == "# Results\n\n## Quality\n\nq\n\n## Speed\n\n### run\n"
