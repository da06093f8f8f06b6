"""LoRA in, LoRA out: a merge of LoRA experts exported as one PEFT adapter that peft loads and that equals the
dense export; merges that are not one LoRA write none and say why."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import helpers


@pytest.fixture(scope="module")
def lora_cfg(tmp_path_factory):
    return helpers.make_pool(tmp_path_factory.mktemp("lora_pool"), k=2, form="lora")


@pytest.mark.parametrize("method", ["adamerging_layerwise", "adamerging_taskwise"])
def test_the_lora_export_equals_the_dense_export(lora_cfg, tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    helpers.train_here(lora_cfg, out, f"method={method}", "method.lr=0.2", "trainer.max_steps=3",
                       "data.batch_size=4", "data.max_length=16", "evaluate.enabled=false")
    coefficients = torch.tensor(json.loads((out / "export" / "coefficients.json").read_text())["coefficients"])
    assert coefficients.std() > 0  # trained away from the uniform start, so the test sees the coefficients
    config = json.loads((out / "export" / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 2 * 4 and config["lora_alpha"] == config["r"]  # two experts of rank 4, stacked
    base = AutoModelForSequenceClassification.from_pretrained(lora_cfg["base"])
    merged = PeftModel.from_pretrained(base, str(out / "export" / "lora")).merge_and_unload().state_dict()
    dense = helpers.exported_backbone(out)
    compared = 0
    for name, value in dense.items():  # heads stay per task (heads/), outside either
        err = (merged[name] - value).norm() / value.norm().clamp_min(1e-12)
        assert err <= 1e-5, (name, float(err))
        compared += int(".attention.self." in name)
    assert compared >= 4  # query and value of both layers went through the adapter


def test_a_merge_that_is_not_one_lora_writes_none_and_says_why(lora_cfg, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="adamerge"):
        helpers.train_here(lora_cfg, tmp_path / "ties", "method=ties_merging", "evaluate.enabled=false")
    assert not (tmp_path / "ties" / "export" / "lora").exists()
    assert "no export/lora: " in caplog.text
