"""``task_vectors.device=disk``: task vectors written once beside the run and memory-mapped back."""

from __future__ import annotations

import json

import pytest
import torch

import helpers

STEPS = ("trainer.max_steps=3", "data.batch_size=4", "evaluate.enabled=false", "checkpoint.every_n_steps=3")


@pytest.mark.parametrize("method", ["adamerging_layerwise", "adamerging_layerwise_pp"])
def test_a_learned_merge_from_disk_equals_the_merge_from_memory(tiny_pool_cfg, tmp_path, method):
    helpers.train_here(tiny_pool_cfg, tmp_path / "mem", f"method={method}", *STEPS, f"export.dir={tmp_path}/mem/export")
    helpers.train_here(tiny_pool_cfg, tmp_path / "disk", f"method={method}", *STEPS, "task_vectors.device=disk",
                       f"export.dir={tmp_path}/disk/export")
    assert torch.equal(helpers.exported_coefficients(tmp_path / "disk"), helpers.exported_coefficients(tmp_path / "mem"))
    written = list((tmp_path / "disk" / "task_vectors").glob("*/index.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["files"]  # one file per merged tensor
    if method.endswith("_pp"):  # the TIES-trimmed vectors are what was written: most entries zero
        from safetensors.torch import load_file

        first = next(iter(json.loads(written[0].read_text())["files"].values()))
        stack = next(iter(load_file(str(written[0].parent / first)).values()))
        assert (stack == 0).float().mean() > 0.5


def test_a_second_run_with_the_same_pool_maps_the_written_task_vectors(tiny_pool_cfg, tmp_path, caplog):
    caplog.set_level("INFO")
    shared = f"task_vectors.disk_dir={tmp_path}/tv"
    helpers.train_here(tiny_pool_cfg, tmp_path / "a", "method=adamerging_layerwise", *STEPS, "task_vectors.device=disk",
                       shared, f"export.dir={tmp_path}/a/export")
    caplog.clear()
    helpers.train_here(tiny_pool_cfg, tmp_path / "b", "method=adamerging_layerwise", *STEPS, "task_vectors.device=disk",
                       shared, f"export.dir={tmp_path}/b/export")
    assert "task vectors written" not in caplog.text and "memory-mapped from disk" in caplog.text
    assert len(list((tmp_path / "tv").iterdir())) == 1


@pytest.mark.parametrize("args, why", [
    (("task_vectors.shard=true", "trainer=ddp", "trainer.devices=2"), "exclude each other"),
    (("+method.start_from=regmean",), "re-expresses them in memory"),
])
def test_disk_with_what_it_cannot_serve_is_refused_in_one_line(tiny_pool_cfg, tmp_path, capsys, args, why):
    code = helpers.run_inprocess([f"out_dir={tmp_path / 'run'}", "method=adamerging_layerwise", "evaluate.enabled=false",
                                  "task_vectors.device=disk", *args], tiny_pool_cfg)
    helpers.assert_refused_in_one_line(code, capsys, ".*" + why, tmp_path / "run")
