"""The export: a merged model loadable with ``from_pretrained`` that equals the in-memory merge, and an interrupted
export that leaves the previous one whole."""

from __future__ import annotations

import json

import pytest
import torch
from torch.func import functional_call

from adamerge.export import export_merged, load_task_model
from adamerge.methods import get_method
from adamerge.pool.config import pool_from_config


def task_arithmetic(pool_cfg: dict):
    pool = pool_from_config(pool_cfg)
    return pool, get_method("static")(pool, {"name": "static", "id": "task_arithmetic", "scale": 0.3}, {})


def test_export_roundtrip_from_pretrained(tiny_pool_cfg, tmp_path):
    from transformers import AutoModel

    pool, m = task_arithmetic(tiny_pool_cfg)
    out = export_merged(m, tmp_path / "export")
    ids = torch.randint(1000, 2000, (2, 5))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        merged = m.merged.merged_params()
        for task in pool.task_names:
            served = load_task_model(out, task)
            ref = functional_call(pool.base_model, {**merged, **pool.head(task)}, args=(), kwargs=inputs).logits
            torch.testing.assert_close(served(**inputs).logits, ref, atol=1e-5, rtol=1e-5)
        enc = AutoModel.from_pretrained(str(out / "model")).eval()
        hid = functional_call(pool.base_model.bert, {k[5:]: v for k, v in merged.items()}, args=(), kwargs=inputs)
        torch.testing.assert_close(enc(**inputs).last_hidden_state, hid.last_hidden_state, atol=1e-5, rtol=1e-5)
    rep = json.loads((out / "coefficients.json").read_text())
    assert rep["tasks"] == pool.task_names and len(rep["coefficients"]) == len(m.merged.names)
    assert (out / "coefficients.png").stat().st_size > 1000
    assert (out / "model" / "tokenizer_config.json").exists()


@pytest.mark.parametrize("family", ["sequence_classification", "causal_lm_tied", "causal_lm"])
def test_export_writes_what_save_pretrained_writes_one_tensor_at_a_time(tiny_pool_cfg, tmp_path, monkeypatch, family):
    """export/model holds the tensors (names, values, dtype) that ``save_pretrained`` writes for the merged model
    (a classifier's backbone; a Llama with tied or untied embeddings), without the merged model ever being whole:
    the dict-building merges are not called."""
    import copy

    from safetensors.torch import load_file

    import helpers
    from adamerge.core.merged_model import MergedModel

    cfg = tiny_pool_cfg if family == "sequence_classification" else \
        helpers.make_llama_pool(tmp_path / "pool", vocab=300, tie=family == "causal_lm_tied")
    pool, m = task_arithmetic(cfg)
    merged = m.merged.merged_state_dict()
    module = pool.family.exported_module(pool.base_model)
    prefix = pool.base_model.base_model_prefix + "." if module is not pool.base_model else ""
    reference = copy.deepcopy(module)  # the merged model as a module (tied weights stay tied), saved as transformers does
    reference.load_state_dict({n[len(prefix):]: v for n, v in merged.items() if n.startswith(prefix)})
    reference.save_pretrained(tmp_path / "reference")

    def whole(*args, **kwargs):
        raise AssertionError("the export built the whole merged model")

    monkeypatch.setattr(MergedModel, "merged_params", whole)
    monkeypatch.setattr(MergedModel, "merged_state_dict", whole)
    out = export_merged(m, tmp_path / "export", dtype="bfloat16")
    want, got = load_file(tmp_path / "reference" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert sorted(got) == sorted(want)
    for n, v in want.items():
        assert torch.equal(got[n], v.to(torch.bfloat16) if v.is_floating_point() else v), n


def test_interrupted_export_leaves_previous_export_intact(tiny_pool_cfg, tmp_path, monkeypatch):
    import adamerge.export as ex

    pool, m = task_arithmetic(tiny_pool_cfg)
    out = export_merged(m, tmp_path / "export")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(ValueError, match="not empty"):
        export_merged(m, out)  # refused without overwrite

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ex, "plot_coefficients", boom)
    with pytest.raises(OSError, match="disk full"):
        export_merged(m, out, overwrite=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp dir left behind
    with pytest.raises(OSError):
        export_merged(m, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_export_dtype_halves_the_bytes_and_a_sharded_export_reloads(tiny_pool_cfg, tmp_path):
    """export.dtype=bfloat16 writes half the bytes of the float32 export; export.max_shard_size splits the model
    into files with an index that from_pretrained reloads to the same weights."""
    from transformers import AutoModel

    import helpers

    runs = {}
    for name, extra in [("fp32", []), ("bf16", ["export.dtype=bfloat16"]), ("sharded", ["export.max_shard_size=100KB"])]:
        runs[name] = tmp_path / name
        helpers.train_here(tiny_pool_cfg, runs[name], "method=task_arithmetic", "evaluate.enabled=false", *extra)

    def size(run, sub):
        return sum(f.stat().st_size for f in (run / "export" / sub).glob("*.safetensors"))

    for sub in ("model", "tasks/task0"):
        assert abs(size(runs["bf16"], sub) / size(runs["fp32"], sub) - 0.5) < 0.01, sub
    sharded = runs["sharded"] / "export" / "model"
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 1
    whole = AutoModel.from_pretrained(runs["fp32"] / "export" / "model").state_dict()  # the backbone alone
    for n, v in AutoModel.from_pretrained(sharded).state_dict().items():
        torch.testing.assert_close(v, whole[n], rtol=0, atol=0)
    half = AutoModel.from_pretrained(runs["bf16"] / "export" / "model", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_a_task_without_num_labels_exports_its_heads_size(tiny_pool_cfg, tmp_path):
    """num_labels is optional in a pool (the head's output size counts): the per-task model still gets its size."""
    from transformers import AutoModelForSequenceClassification

    import helpers

    cfg = json.loads(json.dumps(tiny_pool_cfg))
    for t in cfg["tasks"].values():
        t.pop("num_labels", None)
        t.pop("label_names", None)
    helpers.train_here(cfg, tmp_path / "run", "method=task_arithmetic", "evaluate.enabled=false")
    served = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "export" / "tasks" / "task1")
    assert served.config.num_labels == 3


def test_a_sentence_transformers_base_exports_a_sentence_transformer(tmp_path):
    """The real all-MiniLM-L6-v2 (a sentence-transformers model) merged with its committed LoRA experts:
    SentenceTransformer("export/model") loads the merged backbone with the base's pooling and normalisation."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    import helpers

    out = tmp_path / "run"
    assert helpers.run_inprocess([f"out_dir={out}", "pool=minilm_lora", "method=task_arithmetic",
                                  "evaluate.enabled=false", "export.task_models=false"]) == 0
    model_dir = out / "export" / "model"
    assert AutoModel.from_pretrained(model_dir).config.architectures == ["BertModel"]  # no head to mistake
    texts = ["the match ended in a draw", "el gato duerme"]
    embedded = SentenceTransformer(str(model_dir), device="cpu").encode(texts, convert_to_tensor=True)
    tok, enc = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = enc(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # MiniLM's pooling
    torch.testing.assert_close(embedded, mean, atol=1e-5, rtol=1e-4)
    base = SentenceTransformer(helpers.minilm_dir(), device="cpu").encode(texts, convert_to_tensor=True)
    assert (embedded - base).abs().max() > 1e-3  # the merge, not the base
