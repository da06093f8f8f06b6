"""ModelPool: formats (HF dir, sharded, .safetensors, .bin, LoRA), the real MiniLM, and clear errors."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import helpers
from adamerge.core.task_vectors import TaskVectors
from adamerge.pool.config import pool_from_config
from adamerge.pool.model_pool import PoolError


def with_expert(pool_cfg: dict, task: str, path) -> dict:
    cfg = json.loads(json.dumps(pool_cfg))
    cfg["tasks"][task]["expert"] = str(path)
    return cfg


def copy_expert(pool_cfg, task, tmp_path) -> Path:
    dst = tmp_path / f"{task}_copy"
    shutil.copytree(pool_cfg["tasks"][task]["expert"], dst)
    return dst


def edit_weights(expert_dir: Path, fn) -> None:
    f = expert_dir / "model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def test_formats_give_the_same_task_vectors(tiny_pool_cfg, tmp_path):
    from transformers import BertForSequenceClassification

    ref = TaskVectors.from_pool(pool_from_config(tiny_pool_cfg))
    src = tiny_pool_cfg["tasks"]["task0"]["expert"]
    model = BertForSequenceClassification.from_pretrained(src)
    # sharded safetensors with an index, a .bin checkpoint, a single .safetensors state dict
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    (tmp_path / "bin").mkdir()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    shutil.copy(tmp_path / "bin" / "pytorch_model.bin", tmp_path / "bin" / "x")  # noise next to it is ignored
    shutil.copy(Path(src) / "config.json", tmp_path / "bin" / "config.json")
    single = tmp_path / "expert.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(single))
    for path in (tmp_path / "sharded", tmp_path / "bin", single):
        tv = TaskVectors.from_pool(pool_from_config(with_expert(tiny_pool_cfg, "task0", path)))
        for n in ref.names:
            torch.testing.assert_close(tv[n], ref[n])


def test_lora_task_vector_equals_peft_merge_and_unload(tmp_path):
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    cfg = helpers.make_pool(tmp_path, k=2, form="lora")
    pool = pool_from_config(cfg)
    tv = TaskVectors.from_pool(pool)
    for k, task in enumerate(pool.task_names):
        spec = cfg["tasks"][task]
        base = BertForSequenceClassification.from_pretrained(cfg["base"], num_labels=spec["num_labels"],
                                                             ignore_mismatched_sizes=True)
        merged = PeftModel.from_pretrained(base, spec["expert"]).merge_and_unload().state_dict()
        base_sd = BertForSequenceClassification.from_pretrained(cfg["base"]).state_dict()
        changed = 0
        for n in tv.names:
            expect = merged[n] - base_sd[n]
            torch.testing.assert_close(tv[n][k], expect, atol=1e-6, rtol=1e-5)
            changed += int(expect.abs().sum() > 0)
        assert changed == 4  # query and value of 2 layers
        # the adapter's modules_to_save classifier is the expert's own head
        torch.testing.assert_close(pool.head(task)["classifier.weight"], merged["classifier.weight"])


def test_real_minilm_base_with_prefixed_experts(tmp_path):
    """The real all-MiniLM-L6-v2 (a BertModel checkpoint, no 'bert.' prefix) with classifier experts."""
    from transformers import AutoModelForSequenceClassification

    base = helpers.minilm_dir()
    tasks = {}
    for i in range(2):
        torch.manual_seed(i)
        m = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2 + i)
        with torch.no_grad():
            m.bert.encoder.layer[0].output.dense.weight.add_(0.01 * (i + 1))
        m.save_pretrained(tmp_path / f"e{i}")
        tasks[f"t{i}"] = {"expert": str(tmp_path / f"e{i}"), "num_labels": 2 + i}
    pool = pool_from_config({"base": base, "tasks": tasks})
    assert pool.base_model.config.hidden_size == 384
    tv = TaskVectors.from_pool(pool)
    n = "bert.encoder.layer.0.output.dense.weight"
    assert len(pool.shared_names()) > 100
    assert tv.names == [n]  # tensors no expert changed are not merged ...
    torch.testing.assert_close(tv[n][1], torch.full_like(tv[n][1], 0.02), atol=1e-6, rtol=0)
    kept = TaskVectors.from_pool(pool, keep_unchanged=True)  # ... unless asked
    assert len(kept) == len(pool.shared_names())
    assert kept["bert.encoder.layer.1.output.dense.weight"].abs().max() == 0
    assert pool.head("t1")["classifier.weight"].shape == (3, 384)


# -- bad inputs: each its own clear message ----------------------------------------------------
def _bad(tiny_pool_cfg, tmp_path, edit):
    d = copy_expert(tiny_pool_cfg, "task1", tmp_path)
    edit(d)
    return with_expert(tiny_pool_cfg, "task1", d)


def _drop(name):
    return lambda d: edit_weights(d, lambda sd: sd.pop(name))


def _add(name):
    return lambda d: edit_weights(d, lambda sd: sd.__setitem__(name, torch.zeros(3)))


def _set(name, fn):
    return lambda d: edit_weights(d, lambda sd: sd.__setitem__(name, fn(sd[name])))


def _truncate(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _nan(t):
    t = t.clone()
    t[0, 0] = float("nan")
    return t


W = "bert.encoder.layer.0.attention.self.query.weight"
CASES = {
    "missing": (_drop(W), rf"expert 'task1'.*missing tensor '{W}'"),
    "extra": (_add("bert.encoder.layer.9.foo.weight"), r"expert 'task1'.*extra tensor 'bert.encoder.layer.9.foo.weight'"),
    "shape": (_set(W, lambda t: t[:, :-1].contiguous()), rf"expert 'task1'.*tensor '{W}': shape \(32, 31\) does not match"),
    "vocab": (_set("bert.embeddings.word_embeddings.weight", lambda t: torch.cat([t, t[:5]])),
              r"word_embeddings.weight.*vocabulary size differs: expert 30527 vs base 30522"),
    "nan": (_set(W, _nan), rf"'{W}': contains NaN or Inf"),
    "truncated": (_truncate, r"task1_copy/model.safetensors: unreadable or truncated safetensors"),
    "not_a_model": (lambda d: (d / "model.safetensors").unlink(), r"expert 'task1'.*not a model directory"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_expert_gives_clear_error(tiny_pool_cfg, tmp_path, case):
    edit, pattern = CASES[case]
    with pytest.raises(PoolError, match=pattern):
        pool_from_config(_bad(tiny_pool_cfg, tmp_path, edit))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_an_expert_saved_in_half_precision_is_read_in_the_base_dtype(tiny_pool_cfg, tmp_path, caplog, dtype):
    """Fine-tunes are often saved in fp16/bf16 beside an fp32 base: the expert is read in the base's dtype, its
    task vector is (stored value in float32) − base, and the log says once what was cast."""
    half = _bad(tiny_pool_cfg, tmp_path, lambda d: edit_weights(
        d, lambda sd: sd.update({n: v.to(dtype) for n, v in sd.items() if v.is_floating_point()})))
    with caplog.at_level(logging.INFO, logger="adamerge"):
        pool = pool_from_config(half)
    name = str(dtype).removeprefix("torch.")
    lines = [r.getMessage() for r in caplog.records if "are read as the base's" in r.getMessage()]
    assert len(lines) == 1 and "expert 'task1'" in lines[0] and f"stored as {name}" in lines[0]
    stored = load_file(str(Path(half["tasks"]["task1"]["expert"]) / "model.safetensors"))[W]
    tau = pool.task_vector("task1", W)
    assert tau.dtype == torch.float32
    torch.testing.assert_close(tau, stored.float() - pool.base_tensor(W), rtol=0, atol=0)
    assert pool.expert_tensor("task1", W).dtype == torch.float32 and pool.head("task1")["classifier.weight"].dtype \
        == torch.float32
    assert "task0" not in pool.cast_dtypes  # the fp32 expert: nothing cast
    out = tmp_path / "run"  # through train.py: the merge is exported in the base's dtype
    assert helpers.run_inprocess([f"out_dir={out}", "method=task_arithmetic", "evaluate.enabled=false"], half) == 0
    merged = load_file(str(out / "export" / "model" / "model.safetensors"))
    assert {v.dtype for v in merged.values() if v.is_floating_point()} == {torch.float32}


def test_missing_paths_and_foreign_lora(tiny_pool_cfg, tmp_path):
    with pytest.raises(PoolError, match=r"expert 'task0'.*/nowhere: path does not exist"):
        pool_from_config(with_expert(tiny_pool_cfg, "task0", tmp_path / "nowhere"))
    bad_base = dict(tiny_pool_cfg, base=str(tmp_path / "nobase"))
    with pytest.raises(PoolError, match=r"base model .*nobase: path does not exist"):
        pool_from_config(bad_base)
    # a LoRA adapter made for a wider model: A/B shapes do not fit this base
    lora = helpers.make_pool(tmp_path / "other", k=1, form="lora")
    from transformers import BertForSequenceClassification

    wide = BertForSequenceClassification(helpers.tiny_config(hidden_size=48, num_attention_heads=2))
    wide.save_pretrained(tmp_path / "widebase")
    with pytest.raises(PoolError, match=r"expert 'task0'.*LoRA delta shape \(32, 32\) does not match the base's \(48, 48\)"
                       r".*another base model"):
        pool_from_config(dict(lora, base=str(tmp_path / "widebase")))


def test_task_labels_must_match_the_head(tiny_pool_cfg, tmp_path):
    """task1's expert has a 3-class head: 2 label names (or num_labels 2) for it is refused at load."""
    cfg = json.loads(json.dumps(tiny_pool_cfg))
    cfg["tasks"]["task1"]["label_names"] = ["a", "b"]
    with pytest.raises(PoolError, match=r"task 'task1': label_names gives 2 labels but its expert \(.*/task1\) "
                                        r"has 3 outputs \('classifier.bias'\); set num_labels: 3"):
        pool_from_config(cfg)
    cfg["tasks"]["task1"]["label_names"] = ["a", "b", "c"]
    assert pool_from_config(cfg).tasks["task1"].label_names == ["a", "b", "c"]
    cfg["tasks"]["task1"]["num_labels"] = 2
    with pytest.raises(PoolError, match=r"task 'task1': num_labels gives 2 labels .* has 3 outputs"):
        pool_from_config(cfg)


def test_recipe_pool_config_chooses_the_head_tensors(tiny_pool_cfg, tmp_path):
    """``head_prefixes`` in a recipe pool config overrides the recipe's: those tensors stay per task."""
    from adamerge.pool.config import resolve_recipe

    recipe = tmp_path / "recipe.py"
    (tmp_path / "spec.json").write_text(json.dumps(tiny_pool_cfg))
    recipe.write_text(f"import json\ndef build(cfg):\n    return json.load(open({str(tmp_path / 'spec.json')!r}))\n")
    spec = resolve_recipe({"recipe": "recipe.py", "head_prefixes": ["classifier.", "bert.pooler."]}, tmp_path)
    assert spec["head_prefixes"] == ["classifier.", "bert.pooler."]
    pool = pool_from_config(spec)
    assert "bert.pooler.dense.weight" not in pool.shared_names()
    assert set(pool.head(pool.task_names[0])) == {n for n in pool.head_names() if n.startswith(("classifier.", "bert.pooler."))}
    torch.testing.assert_close(pool.head(pool.task_names[1])["bert.pooler.dense.weight"],
                               pool.expert_tensor(pool.task_names[1], "bert.pooler.dense.weight"))
    assert resolve_recipe({"recipe": "recipe.py"}, tmp_path)["head_prefixes"] == tiny_pool_cfg.get("head_prefixes")


def test_missing_recipe_file_is_named(tmp_path):
    from adamerge.pool.config import resolve_recipe

    with pytest.raises(PoolError, match=r"pool recipe .*nope\.py does not exist"):
        resolve_recipe({"recipe": "data/nope.py"}, tmp_path)


def test_unknown_pool_or_task_key_names_the_nearest(tiny_pool_cfg):
    first = next(iter(tiny_pool_cfg["tasks"]))
    task = dict(tiny_pool_cfg["tasks"][first])
    task["calib"] = task.pop("calibration")
    cfg = {**tiny_pool_cfg, "tasks": {**tiny_pool_cfg["tasks"], first: task}}
    with pytest.raises(PoolError, match=rf"unknown config key 'pool.tasks.{first}.calib'.*did you mean "
                                        rf"'pool.tasks.{first}.calibration'"):
        pool_from_config(cfg)
    with pytest.raises(PoolError, match="unknown config key 'pool.head_prefix'.*did you mean 'pool.head_prefixes'"):
        pool_from_config({**tiny_pool_cfg, "head_prefix": ["classifier."]})


def merge_lock(sd: dict, heads: int, seed: int = 0) -> dict:
    """MergeLock: per layer and head, a random invertible A on the query/key branch (Q·A, K·A⁻ᵀ) and B on the
    value/output branch (V·B, O·B⁻¹): every attention score and output is unchanged, the weights are not."""
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    layers = sorted({n.split(".")[3] for n in sd if ".encoder.layer." in n})
    for layer in layers:
        pre = f"bert.encoder.layer.{layer}.attention."
        d = sd[pre + "self.query.weight"].shape[0]
        dh = d // heads
        a = torch.block_diag(*[torch.randn(dh, dh, generator=g) for _ in range(heads)])
        b = torch.block_diag(*[torch.randn(dh, dh, generator=g) for _ in range(heads)])
        for name, m in (("query", a.T), ("key", torch.linalg.inv(a)), ("value", b.T)):  # rows of head h: M·W_h
            out[pre + f"self.{name}.weight"] = m @ sd[pre + f"self.{name}.weight"]
            out[pre + f"self.{name}.bias"] = m @ sd[pre + f"self.{name}.bias"]
        out[pre + "output.dense.weight"] = sd[pre + "output.dense.weight"] @ torch.linalg.inv(b).T
    return out


@pytest.mark.parametrize("case", ["re-initialised", "MergeLock"])
def test_an_expert_that_is_not_a_fine_tune_of_the_base_is_refused(tiny_pool_cfg, tmp_path, caplog, case):
    """An expert of the right shapes that is not a fine-tune of this base (trained from another initialisation,
    or re-parametrised so that it cannot be merged, function unchanged) is refused at pool load, naming the expert
    and the worst tensors; ``check_fine_tuned: warn`` merges it with a warning."""
    from transformers import BertForSequenceClassification

    d = copy_expert(tiny_pool_cfg, "task1", tmp_path)
    model = BertForSequenceClassification.from_pretrained(d).eval()
    if case == "re-initialised":
        torch.manual_seed(123)
        other = BertForSequenceClassification(model.config)
        other.classifier.load_state_dict(model.classifier.state_dict())
        model = other
    else:
        ids = torch.randint(0, 1000, (3, 7))
        before = model(input_ids=ids).logits
        model.load_state_dict(merge_lock(model.state_dict(), model.config.num_attention_heads))
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-4, rtol=1e-4)  # same function
    model.save_pretrained(d)
    cfg = with_expert(tiny_pool_cfg, "task1", d)
    worst = r"bert\.encoder\.layer\.\d\.attention\.(self\.(query|key|value)|output\.dense)" if case == "MergeLock" else r"bert\..*"
    with pytest.raises(PoolError, match=rf"expert 'task1' .* is not a fine-tune of the base .*: \d+ weight matrices "
                                        rf"point elsewhere .* e\.g\. '{worst}\.weight' \(cos -?0\.\d\d\)"):
        pool_from_config(cfg)
    with caplog.at_level(logging.WARNING, logger="adamerge"):
        pool = pool_from_config(dict(cfg, check_fine_tuned="warn"))
    assert "is not a fine-tune of the base" in caplog.text and pool.task_names == ["task0", "task1"]
    pool_from_config(tiny_pool_cfg)  # the real fine-tunes pass


def test_embedding_lora_task_vector_equals_peft_merge_and_unload(tiny_pool_cfg, tmp_path):
    """A PEFT adapter on word_embeddings (lora_embedding_A [r, vocab], lora_embedding_B [dim, r]) beside a Linear
    one: its task vector is (B @ A)ᵀ·scaling, equal to peft's merge_and_unload tensor by tensor."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import BertForSequenceClassification

    base_dir = tiny_pool_cfg["base"]
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(base_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["word_embeddings", "query"], modules_to_save=["classifier"],
                      init_lora_weights=False)  # random A and B: a non-zero delta
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # peft's random init moves the embeddings far more than fine-tuning does: scale down
        for n, p in peft_model.named_parameters():
            if "lora_embedding_B" in n:
                p.mul_(0.01)
    peft_model.save_pretrained(tmp_path / "adapter")
    cfg = json.loads(json.dumps(tiny_pool_cfg))
    cfg["tasks"] = {"t": {"expert": str(tmp_path / "adapter"), "num_labels": 2}}
    pool = pool_from_config(cfg)
    merged = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base_dir),
                                       tmp_path / "adapter").merge_and_unload().state_dict()
    emb = "bert.embeddings.word_embeddings.weight"
    for n in (emb, "bert.encoder.layer.0.attention.self.query.weight"):
        expect = merged[n] - pool.base_tensor(n)
        assert expect.abs().sum() > 0
        torch.testing.assert_close(pool.task_vector("t", n), expect, atol=1e-6, rtol=1e-5)
    assert pool.lora_factors("t", emb)[1].shape == (30522, 4)  # B' = Aᵀ: the delta keeps its rank in this layout
