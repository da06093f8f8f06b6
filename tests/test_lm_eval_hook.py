"""``evaluate.lm_eval_tasks`` (adamerge/lm_eval_hook.py): refused in one line before any work when it cannot run, and
what the harness returns lands in export/lm_eval.json. The harness itself is replaced by a recording stand-in here
(it needs its datasets from the hub); what is tested is the hook's checks and its call."""

from __future__ import annotations

import json
import sys
import types

import pytest
from peer_pool import make_seeded_llama_pool

import helpers


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_seeded_llama_pool(tmp_path_factory.mktemp("llama"), k=2)


def run(pool, out, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = helpers.run_inprocess([f"out_dir={out}", "method=task_arithmetic", "evaluate.enabled=false",
                                  "evaluate.lm_eval_tasks=[arc_easy]", "evaluate.lm_eval_limit=5"], pool)
    return code, capsys.readouterr().err.strip()


def test_without_the_package_or_with_the_hub_off_it_is_refused_before_any_work(llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed
    code, err = run(llama, tmp_path / "a", capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "pip install lm-eval" in err, err
    monkeypatch.setitem(sys.modules, "lm_eval", types.ModuleType("lm_eval"))
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    code, err = run(llama, tmp_path / "b", capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "HF_HUB_OFFLINE=1" in err and "HF_DATASETS_OFFLINE=1" in err, err
    assert not (tmp_path / "a" / "export").exists() and not (tmp_path / "b" / "export").exists()


def test_the_harness_runs_on_the_exported_model_and_its_results_are_kept(llama, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    calls = []

    def simple_evaluate(**kwargs):
        path = kwargs["model_args"].removeprefix("pretrained=")
        AutoModelForCausalLM.from_pretrained(path)  # the harness's hf model loads the export as it is
        calls.append(kwargs)
        return {"results": {"arc_easy": {"acc,none": 0.25, "alias": "arc_easy"}}}

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code, err = run(llama, tmp_path / "run", capsys)
    assert code == 0, err
    assert calls and calls[0]["model"] == "hf" and calls[0]["tasks"] == ["arc_easy"] and calls[0]["limit"] == 5
    assert calls[0]["model_args"] == f"pretrained={tmp_path / 'run' / 'export' / 'model'}"
    kept = json.loads((tmp_path / "run" / "export" / "lm_eval.json").read_text())
    assert kept == {"arc_easy": {"acc,none": 0.25, "alias": "arc_easy"}}
