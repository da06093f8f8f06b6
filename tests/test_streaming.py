"""Streamed data-free merges (adamerge/streaming.py): the same export as the in-memory merge, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch
from peer_pool import PEER_CASES, make_seeded_llama_pool, model_tensors

import helpers
from adamerge.core.task_vectors import TaskVectors
from adamerge.core.topk import topk_thresholds
from adamerge.core.transforms import apply_transforms, build_stages, fit_stages, streamed
from adamerge.errors import ExportError
from adamerge.safetensors_writer import StreamedCheckpoint


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_threshold_is_the_kth_largest_magnitude_over_the_whole_model(dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": (torch.randn(3, 40 + i, 20, generator=g) * 0.01).to(dtype) for i in range(4)}
    tensors["t1"][:, :10] = 0  # ties among zeros
    tensors["t2"][0, :5] = 0.5  # and among equal large values
    for density in (1e-6, 0.01, 0.2, 0.5, 1.0):
        got = topk_thresholds(lambda: tensors.items(), 3, density)
        for k in range(3):
            flat = torch.cat([t[k].abs().flatten().float() for t in tensors.values()])
            n_keep = max(1, round(density * flat.numel()))
            assert got[k] == flat.kthvalue(flat.numel() - n_keep + 1).values, (density, k)


CONFIGS = {
    "ties": NS(dare=None, ties=NS(density=0.2, merge="sum"), consensus=None, lines=None),
    "ties_mean": NS(dare=None, ties=NS(density=0.3, merge="mean"), consensus=None, lines=None),
    "dare_ties": NS(dare=NS(p=0.5, seed=3), ties=NS(density=0.2, merge="sum"), consensus=None, lines=None),
    "consensus_lines": NS(dare=None, ties=None, consensus=NS(k=2, lam=0.4), lines={"alpha": 0.5, "beta": 0.5}),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_stages_fitted_over_passes_of_a_stream_equal_the_in_memory_transforms(name):
    g = torch.Generator().manual_seed(1)
    tensors = {f"enc.layer.{i}.w": torch.randn(3, 30, 7, generator=g) for i in range(3)}
    want = apply_transforms(TaskVectors(tensors, ["a", "b", "c"]), CONFIGS[name])
    passes = []

    def source():  # what the files give: a fresh read each pass (the stages change it in place), in order
        passes.append(1)
        yield from ((n, t.clone()) for n, t in tensors.items())

    stages = build_stages(CONFIGS[name])
    fit_stages(source, stages, 3)
    got = dict(streamed(source, stages)())
    assert all(torch.equal(got[n], want[n]) for n in tensors)
    assert len(passes) == {"ties": 4, "ties_mean": 4, "dare_ties": 4, "consensus_lines": 2}[name]


def test_streamed_checkpoint_takes_tensors_in_any_order_and_refuses_a_missing_one(tmp_path):
    sd = {"a": torch.randn(50, 30), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(7), "d": torch.randn(900)}
    plan = {n: (tuple(t.shape), t.dtype) for n, t in sd.items()}
    writer = StreamedCheckpoint(tmp_path / "m", plan, max_shard_size="4KB")
    for n in reversed(list(sd)):
        writer.write(n, sd[n])
    writer.close()
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    got = model_tensors(tmp_path / "m")
    assert all(torch.equal(got[n], sd[n]) for n in sd)
    writer = StreamedCheckpoint(tmp_path / "n", plan)
    writer.write("a", sd["a"])
    with pytest.raises(ExportError, match="written twice"):
        writer.write("a", sd["a"])
    with pytest.raises(ExportError, match="never written"):
        writer.close()


@pytest.fixture(scope="module")
def llama_pool(tmp_path_factory):
    return helpers.make_llama_pool(tmp_path_factory.mktemp("llama"), k=3, vocab=200, tie=False)


def merge(pool: dict, out: Path, method: str, stream: str, *extra: str) -> Path:
    helpers.train_here(pool, out, f"method={method}", "evaluate.enabled=false", f"task_vectors.stream={stream}",
                       f"export.dir={out}/export", *extra)
    return out / "export"


@pytest.mark.parametrize("method, extra", [
    ("task_arithmetic", ()),
    ("task_arithmetic", ("method.scale=[0.25,0.5,1.0]",)),  # one λ per task
    ("ties_merging", ("export.max_shard_size=40KB",)),
    ("dare_ties", ("task_vectors.dtype=bfloat16", "export.dtype=bfloat16")),
    ("weight_average", ("task_vectors.exclude=[norm]",)),
    ("knots_ties", ()),  # the stack changes shape (to the shared basis' coordinates) and back
    ("opcm", ()),
    ("wudi_merging", ("method.wudi.iterations=20",)),
])
def test_streamed_merge_writes_the_in_memory_merge_bit_for_bit(llama_pool, tmp_path, method, extra):
    from transformers import AutoModelForCausalLM

    streamed_dir = merge(llama_pool, tmp_path / "s", method, "true", *extra)
    memory_dir = merge(llama_pool, tmp_path / "m", method, "false", *extra)
    got, want = model_tensors(streamed_dir / "model"), model_tensors(memory_dir / "model")
    assert set(got) == set(want)
    assert all(torch.equal(got[n], want[n]) for n in want)
    loaded = AutoModelForCausalLM.from_pretrained(streamed_dir / "model")  # a model transformers loads as it is
    assert next(loaded.parameters()).dtype == next(iter(want.values())).dtype
    report = json.loads((streamed_dir / "coefficients.json").read_text())
    assert report["streamed"] and report["tensors"] == json.loads((memory_dir / "coefficients.json").read_text())["tensors"]
    if "export.max_shard_size=40KB" in extra:
        assert (streamed_dir / "model" / "model.safetensors.index.json").is_file()


def test_streamed_opcm_reads_one_expert_at_a_time(llama_pool, tmp_path, monkeypatch):
    """OPCM's stage reads the experts' rows one at a time: streamed, it never reads a K-row stack of a tensor, so its
    memory does not grow with K (its merge equals the in-memory one: above)."""
    import adamerge.core.tensor_stream as tensor_stream

    def stacked(*args, **kwargs):
        raise AssertionError("a K-row stack was read")

    monkeypatch.setattr(tensor_stream, "read_stack", stacked)
    export = merge(llama_pool, tmp_path / "s", "opcm", "true")
    assert json.loads((export / "coefficients.json").read_text())["opcm"]["experts"]
    with pytest.raises(AssertionError, match="K-row stack"):  # the stacked reader is what other merges use
        merge(llama_pool, tmp_path / "t", "task_arithmetic", "true")


def test_a_classifier_pool_streams_its_backbone_and_serves_each_task(tmp_path):
    from adamerge.export import load_task_model

    pool = helpers.make_pool(tmp_path / "pool", k=2)
    streamed_dir = merge(pool, tmp_path / "s", "ties_merging", "auto")
    memory_dir = merge(pool, tmp_path / "m", "ties_merging", "false")
    got, want = model_tensors(streamed_dir / "model"), model_tensors(memory_dir / "model")
    assert set(got) == set(want) and not any(n.startswith(("bert.", "classifier.")) for n in got)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert json.loads((streamed_dir / "coefficients.json").read_text())["streamed"]  # auto: evaluation was off
    served, reference = load_task_model(streamed_dir, "task1"), load_task_model(memory_dir, "task1")
    for (n, a), (_, b) in zip(served.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), n


def test_stream_auto_keeps_the_merge_in_memory_when_the_run_evaluates(llama_pool, tmp_path):
    helpers.train_here(llama_pool, tmp_path / "run", "method=task_arithmetic", f"export.dir={tmp_path}/export")
    assert "streamed" not in json.loads((tmp_path / "export" / "coefficients.json").read_text())


@pytest.mark.parametrize("args, why", [
    (("method=adamerging_layerwise", "evaluate.enabled=false"), "method adamerging_layerwise is not a per-tensor"),
    (("method=task_arithmetic",), "evaluation needs the merged model in memory"),
    (("method=emr_merging", "evaluate.enabled=false"), "a model per task .method.task_masks. is evaluated"),
])
def test_stream_true_that_cannot_stream_is_refused_in_one_line(llama_pool, tmp_path, capsys, args, why):
    code = helpers.run_inprocess([f"out_dir={tmp_path / 'run'}", "task_vectors.stream=true", *args], llama_pool)
    helpers.assert_refused_in_one_line(code, capsys, "task_vectors.stream=true: " + why, tmp_path / "run")


def test_stream_auto_keeps_lora_and_hub_experts_in_memory(tmp_path):
    """LoRA in, LoRA out: a pool with an adapter (or a hub expert, which may be one) merges in memory under auto."""
    from adamerge.streaming import should_stream

    full = tmp_path / "full"
    full.mkdir()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")

    def run(expert: str, stream="auto") -> dict:
        return {"method": {"name": "static", "id": "task_arithmetic"}, "evaluate": {"enabled": False}, "trainer": {},
                "task_vectors": {"stream": stream}, "pool": {"model_class": "causal_lm", "tasks": {"a": {"expert": expert}}}}

    assert should_stream(run(str(full)))
    assert not should_stream(run(str(adapter))) and not should_stream(run("hf://org/expert"))
    assert should_stream(run(str(adapter), stream=True))  # insisted on: streamed densely


def test_a_nan_found_while_streaming_is_one_line_and_writes_nothing(llama_pool, tmp_path, capsys):
    """Streamed, an expert's values are checked as they are first read: a NaN stops the merge with one line naming the
    expert and tensor, and neither the export nor a temporary directory is left."""
    cfg = json.loads(json.dumps(llama_pool))
    expert = helpers.copy_expert(cfg, "lm1", tmp_path)
    helpers.edit_weights(expert, lambda sd: sd["model.layers.1.mlp.up_proj.weight"].view(-1)[3].fill_(float("nan")))
    out = tmp_path / "run"
    code = helpers.run_inprocess([f"out_dir={out}", "method=ties_merging", "evaluate.enabled=false",
                                  "task_vectors.stream=true", f"export.dir={tmp_path}/export"], cfg)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "lm1" in err and "model.layers.1.mlp.up_proj.weight" in err and "NaN" in err
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export.tmp-*"))


@pytest.mark.parametrize("case", sorted(c for c in PEER_CASES if PEER_CASES[c].streams))
@pytest.mark.parametrize("stream", ["true", "false"])
def test_per_tensor_merges_equal_the_peers_own_output(tmp_path, case, stream):
    """Each merge on the seeded pool equals its peer's output there (mergekit 0.1.5, FusionBench 0.2.33, the authors'
    MergeLLM code for WIDEN; committed
    by bench/crosscheck.py; the cases: tests/peer_pool.py): to the last bit where the case says ``exact``, else to
    float rounding (the peers divide or interpolate sums of entries or whole models, adamerge rewrites each τ and
    adds them)."""
    from safetensors.torch import load_file

    pool = make_seeded_llama_pool(tmp_path / "pool")
    pool["tasks"] = dict(list(pool["tasks"].items())[:PEER_CASES[case].experts])
    merge_dir = tmp_path / "run"
    helpers.train_here(pool, merge_dir, *PEER_CASES[case].adamerge, "evaluate.enabled=false", f"task_vectors.stream={stream}",
                       f"export.dir={merge_dir}/export")
    got = model_tensors(merge_dir / "export" / "model")
    fixtures = helpers.ROOT / "tests" / "fixtures"
    fixture = {n: t for peer in ("mergekit", "fusionbench", "mergellm", "ota")
               for n, t in load_file(str(fixtures / f"{peer}_merges.safetensors")).items()}
    want = {n.split("/", 1)[1]: t for n, t in fixture.items() if n.split("/", 1)[0] == case}
    assert len(want) == 5
    for n, t in want.items():
        if PEER_CASES[case].exact:
            assert torch.equal(got[n], t), (n, (got[n] - t).abs().max())
        else:
            # relative to the tensor's largest entry, as bench/crosscheck.py measures it
            torch.testing.assert_close(got[n], t, rtol=0, atol=PEER_CASES[case].rtol * float(t.abs().max()))


def test_a_streamed_merge_judges_each_expert_once_however_many_passes(llama_pool, tmp_path, caplog):
    """Values are checked on the first pass; TIES makes four, and the 'not a fine-tune' warning is given once."""
    cfg = json.loads(json.dumps(llama_pool))
    cfg["check_fine_tuned"] = "warn"
    expert = helpers.copy_expert(cfg, "lm2", tmp_path)
    helpers.edit_weights(expert, lambda sd: sd["model.layers.0.mlp.up_proj.weight"].normal_())  # foreign weights
    caplog.set_level("WARNING")
    merge(cfg, tmp_path / "run", "ties_merging", "true")
    assert caplog.text.count("is not a fine-tune of the base") == 1
