"""The benchmark recipe (data/benchmark.py): committed experts are current, the frozen-head probe fits
the head alone on the pretrained features."""

from __future__ import annotations

import json

import torch

import helpers
from adamerge.pool.config import load_recipe

bm = load_recipe(helpers.ROOT / "data" / "benchmark.py")


def test_committed_experts_match_their_recipe_version():
    """A RECIPE_VERSION bump without rebuilding the committed adapters would retrain them on every demo."""
    for form, folder in bm.COMMITTED_DIRS.items():
        key = bm.cache_key(form, 120, 0, 64)
        for task in bm.TASKS:
            info = json.loads((folder / task / "expert_info.json").read_text())
            assert info["cache_key"] == key, f"{folder / task}: rebuild with --form {form} --export-lora"
            assert info["form"] == form and info["task"] == task


def test_frozen_head_lora_adapters_carry_the_probe_head():
    """The committed frozen-head adapters hold their head (modules_to_save), trained nowhere but in the probe fit."""
    from safetensors.torch import load_file

    for task in bm.TASKS:
        folder = bm.COMMITTED_DIRS["frozen_head_lora"] / task
        info = json.loads((folder / "expert_info.json").read_text())
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        head = [n for n in tensors if "classifier" in n]
        assert head and any(tensors[n].shape[0] == info["num_labels"] for n in head)
        assert 0 < info["probe_train_accuracy"] <= 1


def test_fit_probe_changes_only_the_head(tmp_path):
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(helpers.tiny_config(num_labels=3))
    helpers.save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    rows = helpers.make_texts(60, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    acc = bm.fit_probe(model, tok, [t for t, _ in rows], [y for _, y in rows], max_length=16)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"classifier.weight", "classifier.bias"}
    assert acc > 0.6  # three topics of distinct words: far above chance (1/3) on the encoder's features


def test_calibrate_on_test_hands_the_test_texts_as_calibration(tmp_path):
    """``calibrate_on: test`` is the papers' test-time protocol: the merge adapts on the texts it is scored on."""
    import pytest

    cfg = {"form": "frozen_head_lora", "tasks": ["chatterbot_topic"], "cache_dir": str(tmp_path)}
    held_out = bm.build(cfg)["tasks"]["chatterbot_topic"]
    test_time = bm.build({**cfg, "calibrate_on": "test"})["tasks"]["chatterbot_topic"]
    assert held_out["calibration"] != held_out["test"]
    assert test_time["calibration"] == test_time["test"] == held_out["test"]
    with pytest.raises(ValueError, match="calibrate_on"):
        bm.build({**cfg, "calibrate_on": "train"})


def test_built_experts_are_cached_in_the_checkout_or_the_users_cache_never_in_site_packages(monkeypatch, tmp_path):
    monkeypatch.delenv("ADAMERGE_CACHE", raising=False)
    assert bm.default_cache_dir() == bm.HERE / "cache"  # a checkout (this one)
    monkeypatch.setattr(bm, "HERE", tmp_path / "lib" / "python3.11" / "site-packages" / "adamerge" / "data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bm.default_cache_dir() == tmp_path / "xdg" / "adamerge"  # an installed package: the user's cache
    monkeypatch.setenv("ADAMERGE_CACHE", str(tmp_path / "mine"))
    assert bm.default_cache_dir() == tmp_path / "mine"
