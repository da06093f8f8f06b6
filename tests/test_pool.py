"""ModelPool: formats (HF dir, sharded, .safetensors, .bin, LoRA), the real MiniLM, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import helpers
from adamerge.core.task_vectors import TaskVectors
from adamerge.pool.config import pool_from_config
from adamerge.pool.model_pool import PoolError


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
        tv = TaskVectors.from_pool(pool_from_config(helpers.with_expert(tiny_pool_cfg, "task0", path)))
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
    cfg = json.loads(json.dumps(tiny_pool_cfg))
    edit(helpers.copy_expert(cfg, "task1", tmp_path))
    return cfg


def _drop(name):
    return lambda d: helpers.edit_weights(d, lambda sd: sd.pop(name))


def _add(name):
    return lambda d: helpers.edit_weights(d, lambda sd: sd.__setitem__(name, torch.zeros(3)))


def _set(name, fn):
    return lambda d: helpers.edit_weights(d, lambda sd: sd.__setitem__(name, fn(sd[name])))


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


def test_missing_paths_and_foreign_lora(tiny_pool_cfg, tmp_path):
    with pytest.raises(PoolError, match=r"expert 'task0'.*/nowhere: path does not exist"):
        pool_from_config(helpers.with_expert(tiny_pool_cfg, "task0", tmp_path / "nowhere"))
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
