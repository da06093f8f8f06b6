"""Bad inputs (pool, calibration data, config values, paths) give one clear line naming the file, task or key
and the fix — exit code 2, no traceback, before any work; a library bug still shows its traceback."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest

import helpers
from helpers import assert_clear_error, inprocess, train_conf


def _truncate(cfg, tmp):
    f = helpers.copy_expert(cfg, "task1", tmp) / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])


def _other_arch(cfg, tmp):
    from transformers import BertForSequenceClassification

    m = BertForSequenceClassification(helpers.tiny_config(num_hidden_layers=3))
    m.save_pretrained(tmp / "deeper")
    cfg["tasks"]["task1"]["expert"] = str(tmp / "deeper")


def _empty_calibration(cfg, tmp):
    (tmp / "empty.jsonl").write_text("")
    cfg["tasks"]["task0"]["calibration"] = str(tmp / "empty.jsonl")


BAD_POOLS = {
    "missing expert path": (lambda c, t: c["tasks"]["task0"].__setitem__("expert", str(t / "nope")),
                            r"error: expert 'task0'.*nope: path does not exist"),
    "not a model directory": (lambda c, t: c["tasks"]["task0"].__setitem__("expert", str(t)),
                              r"error: expert 'task0'.*not a model directory"),
    "truncated safetensors": (_truncate, r"error: .*task1_copy/model.safetensors: unreadable or truncated"),
    "different architecture": (_other_arch, r"error: expert 'task1'.*extra tensor 'bert.encoder.layer.2"),
    "empty calibration data": (_empty_calibration, r"error: task 'task0': .*empty.jsonl has no examples"),
    "no tasks": (lambda c, t: c.__setitem__("tasks", {}), r"error: pool config: key 'tasks' is required"),
    "num_labels larger than the head": (lambda c, t: c["tasks"]["task0"].__setitem__("num_labels", 5),
                                        r"error: task 'task0': num_labels gives 5 labels but its expert "
                                        r"\(.*/task0\) has 2 outputs .*set num_labels: 2"),
}


@pytest.mark.parametrize("case", sorted(BAD_POOLS))
def test_bad_pool_inputs(tiny_pool_cfg, tmp_path, capsys, case):
    edit, pattern = BAD_POOLS[case]
    cfg = json.loads(json.dumps(tiny_pool_cfg))
    edit(cfg, tmp_path)
    assert inprocess(tmp_path, cfg, "method=adamerging_layerwise") == 2
    assert re.search(pattern, capsys.readouterr().err)
    assert not (tmp_path / "run" / "export").exists()


def _bad_line(key: str, line: int, text: str, task: str = "task0"):
    """Edit: the task's ``key`` file copied with its ``line``-th line replaced by ``text``."""
    def edit(cfg, tmp):
        src = Path(cfg["tasks"][task][key])
        rows = src.read_text().splitlines()
        rows[line - 1] = text
        dst = tmp / f"bad_{key}.jsonl"
        dst.write_text("\n".join(rows) + "\n")
        cfg["tasks"][task][key] = str(dst)
    return edit


def _bad_bytes(key: str, line: int, raw: bytes, task: str = "task0"):
    """Edit: the task's ``key`` file copied with its ``line``-th line replaced by the bytes ``raw``."""
    def edit(cfg, tmp):
        rows = Path(cfg["tasks"][task][key]).read_bytes().splitlines()
        rows[line - 1] = raw
        dst = tmp / f"bad_{key}.jsonl"
        dst.write_bytes(b"\n".join(rows) + b"\n")
        cfg["tasks"][task][key] = str(dst)
    return edit


def _all_texts(key: str, text: str, task: str = "task0"):
    """Edit: the task's ``key`` file with every text replaced by ``text``."""
    def edit(cfg, tmp):
        rows = [json.loads(r) for r in Path(cfg["tasks"][task][key]).read_text().splitlines() if r.strip()]
        dst = tmp / "empty_texts.jsonl"
        dst.write_text("".join(json.dumps({**r, "text": text}) + "\n" for r in rows))
        cfg["tasks"][task][key] = str(dst)
    return edit


def _with_validation(edit):
    """Give task0 a validation file (a copy of its test file), then apply ``edit``."""
    def both(cfg, tmp):
        cfg["tasks"]["task0"]["validation"] = cfg["tasks"]["task0"]["test"]
        edit(cfg, tmp)
    return both


BAD_DATA = {  # task0 has 2 labels
    "label out of range": (_bad_line("test", 3, '{"text": "goal", "label": 2}'),
                           r"task 'task0': test file .*bad_test.jsonl line 3: label 2 is outside \[0, 2\); fix the label"),
    "negative validation label": (_with_validation(_bad_line("validation", 5, '{"text": "goal", "label": -1}')),
                                  r"task 'task0': validation file .*bad_validation.jsonl line 5: label -1 is outside "
                                  r"\[0, 2\)"),
    "string label": (_bad_line("test", 2, '{"text": "goal", "label": "sports"}'),
                     r"task 'task0': test file .*bad_test.jsonl line 2: label 'sports' is not an integer"),
    "missing test file": (lambda c, t: c["tasks"]["task0"].__setitem__("test", str(t / "nope.jsonl")),
                          r"task 'task0': test file .*nope.jsonl does not exist; fix the path under pool tasks.task0.test"),
    "calibration line without text": (_bad_line("calibration", 4, '{"label": 1}'),
                                      r"task 'task0': calibration file .*bad_calibration.jsonl line 4 is not a JSON "
                                      r"object with a string 'text' field"),
    "calibration line not json": (_bad_line("calibration", 2, "goal match"),
                                  r"task 'task0': calibration file .*bad_calibration.jsonl line 2 is not valid JSON"),
    "calibration line not utf-8": (_bad_bytes("calibration", 3, b'{"text": "caf\xe9 \xff"}'),
                                   r"task 'task0': calibration file .*bad_calibration.jsonl line 3 is not valid UTF-8 "
                                   r"\(byte 0xe9 at column 14\); save the file as UTF-8"),
    "calibration texts all empty": (_all_texts("calibration", ""),
                                    r"task 'task0': calibration file .*empty_texts.jsonl: every 'text' is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_named_before_training(tiny_pool_cfg, tmp_path, capsys, case):
    """Every data file is read before step 0: one line naming task, file, line and the fix."""
    edit, pattern = BAD_DATA[case]
    cfg = json.loads(json.dumps(tiny_pool_cfg))
    edit(cfg, tmp_path)
    assert inprocess(tmp_path, cfg, "method=adamerging_layerwise", "trainer.max_steps=2") == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: " + pattern + r".*", err.splitlines()[-1]), err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


BAD_CONFIGS = {
    "negative lr": (["method=adamerging_layerwise", "method.lr=-1"], r"'method.lr' must be > 0, got -1"),
    "string lr": (["method=adamerging_layerwise", "method.lr=fast"], r"'method.lr' must be a number, got 'fast'"),
    "zero steps": (["method=adamerging_layerwise", "trainer.max_steps=0"], r"max_steps.*must be > 0"),
    "reversed clamp": (["method=adamerging_layerwise", "method.clamp=[1,0]"], r"'method.clamp' bounds are reversed"),
    "init outside clamp": (["method=adamerging_layerwise", "method.init=2.0", "method.clamp=[0,1]"],
                           r"^error: config key 'method.init' = 2.0 lies outside 'method.clamp' \[0, 1\]: nothing would"),
    "init list outside clamp": (["method=adamerging_taskwise", "method.init=[0.3,-0.5]"],
                                r"'method.init' = \[0.3, -0.5\] lies outside 'method.clamp' \[0.0, 1.0\]"),
    "zero batch": (["method=adamerging_layerwise", "data.batch_size=0"], r"'data.batch_size' must be >= 1"),
    "bad dtype": (["method=task_arithmetic", "task_vectors.dtype=int8"], r"'task_vectors.dtype' must be one of"),
    "unknown trainer key": (["method=adamerging_layerwise", "+trainer.foo=1"], r"config group 'trainer'.*foo"),
    # every group has one typed schema: an unknown key anywhere is refused, naming the nearest valid one
    "unknown data key": (["method=adamerging_layerwise", "+data.batchsize=8"],
                         r"unknown config key 'data.batchsize'.*did you mean 'data.batch_size'"),
    "unknown evaluate key": (["method=task_arithmetic", "+evaluate.max_example=5"],
                             r"unknown config key 'evaluate.max_example'.*did you mean 'evaluate.max_examples'"),
    "bad monitor": (["method=adamerging_layerwise", "checkpoint.monitor=accuracy"],
                    r"config key 'checkpoint.monitor' must be one of 'auto', 'val_acc', 'val_norm', "
                    r"'holdout_objective' or null, got 'accuracy'"),
    "string export flag": (["method=task_arithmetic", "export.overwrite=maybe"],
                           r"config key 'export.overwrite' must be true or false, got 'maybe'"),
    # a key is declared only by the methods that read it: the entropy objective's diversity, the calibration
    # keys of the closed forms that gather statistics
    "entropy key on a distillation method": (["method=expert_merging", "+method.diversity=1"],
                                             r"unknown config key 'method.diversity' for this method"),
    "calibration key on a data-free closed form": (["method=pcb_merging", "+method.num_examples=8"],
                                                   r"unknown config key 'method.num_examples' for this method"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_values(tiny_pool_cfg, tmp_path, capsys, case):
    args, pattern = BAD_CONFIGS[case]
    assert inprocess(tmp_path, tiny_pool_cfg, *args) == 2
    assert re.search(pattern, capsys.readouterr().err)


def test_clear_error_from_the_command_line(conf, tmp_path):
    """The real entry point: exit code 2, one line, no traceback wall."""
    p = train_conf(conf, tmp_path / "run", "method=adamerging_layerwise", "method.lr=-1", check=False)
    assert_clear_error(p, r"^error: config key 'method.lr' must be > 0, got -1\n$")


def test_unknown_method_and_existing_export(conf, tmp_path):
    p = train_conf(conf, tmp_path / "run", "method=no_such_method", check=False)
    assert_clear_error(p, r"^error: In 'config': Could not find 'method/no_such_method'")  # not an out_dir error
    assert "adamerging_layerwise" in p.stderr  # Hydra lists the available methods
    (conf / "pool" / "dup.yaml").write_text("base: x\ntasks:\n  a: {expert: p}\n  a: {expert: q}\n")
    p = train_conf(conf, tmp_path / "run", "method=task_arithmetic", "pool=dup", check=False)
    assert_clear_error(p, r"(?s)error: .*dup.yaml.*found duplicate key a")  # duplicate task names
    (tmp_path / "run" / "export").mkdir(parents=True)
    (tmp_path / "run" / "export" / "keep.txt").write_text("mine")
    p = train_conf(conf, tmp_path / "run", "method=task_arithmetic", check=False)
    assert_clear_error(p, r"export directory .* exists and is not empty; set export.overwrite=true")
    assert (tmp_path / "run" / "export" / "keep.txt").read_text() == "mine"


def _a_file(tmp_path: Path) -> Path:
    f = tmp_path / "a_file"
    f.write_text("not a directory")
    return f


UNWRITABLE = {  # a path under a regular file: mkdir fails, even for root
    "out_dir under a file": (lambda t: [f"out_dir={_a_file(t) / 'sub'}"], r"config key 'out_dir': cannot write to "
                             r".*a_file/sub: Not a directory"),
    "export.dir under a file": (lambda t: [f"export.dir={_a_file(t) / 'sub' / 'export'}"],
                                r"config key 'export.dir': cannot write to .*a_file/sub: Not a directory"),
    "read-only out_dir": (lambda t: [f"out_dir={t / 'ro' / 'run'}"], r"config key 'out_dir': cannot write to "
                          r".*ro/run: Permission denied"),
}


@pytest.mark.parametrize("case", sorted(UNWRITABLE))
def test_unwritable_dirs_are_named_before_work(tiny_pool_cfg, tmp_path, capsys, case):
    if case == "read-only out_dir":
        if os.geteuid() == 0:
            pytest.skip("root writes into a 0555 directory anyway")
        (tmp_path / "ro").mkdir(mode=0o555)
    args, pattern = UNWRITABLE[case]
    assert inprocess(tmp_path, tiny_pool_cfg, "method=task_arithmetic", *args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: " + pattern + r"\n", err), err


def test_no_pool_chosen(tmp_path, capsys):
    assert helpers.run_inprocess([f"out_dir={tmp_path}", "~pool"]) == 2
    assert capsys.readouterr().err == "error: no pool chosen (pool=<name>; see configs/pool/)\n"
    from adamerge.run import cli as entry

    assert entry.hydra_argv(["train.py", "pool=null", "method=x"]) == ["train.py", "~pool", "method=x"]


def test_out_dir_hydra_cannot_create(conf, tmp_path):
    """Through Hydra, which creates out_dir before train.py's own check runs."""
    p = train_conf(conf, _a_file(tmp_path) / "sub", "method=task_arithmetic", check=False)
    assert_clear_error(p, r"^error: config key 'out_dir': cannot write the run directory: .*Not a directory: "
                          r"'.*a_file/sub'\n$")


def test_verbose_shows_the_traceback(conf, tmp_path):
    p = train_conf(conf, tmp_path / "run", "method=adamerging_layerwise", "method.lr=-1", "verbose=true", check=False)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_a_bug_raising_value_error_shows_its_traceback(tiny_pool_cfg, tmp_path, monkeypatch, capsys):
    """A user's mistake is one of adamerge's error classes (one line); a plain ValueError from inside the library
    is a bug: it is raised with its traceback, not printed as if the user could fix it."""
    from adamerge.methods import static

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(static.StaticMerge, "__init__", broken)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        inprocess(tmp_path, tiny_pool_cfg, "method=task_arithmetic", "task_vectors.stream=false")
    assert "error: an internal invariant broke" not in capsys.readouterr().err
    monkeypatch.undo()
    code = inprocess(tmp_path, tiny_pool_cfg, "method=task_arithmetic", "task_vectors.dtype=float8")
    assert code == 2 and "task_vectors.dtype" in capsys.readouterr().err  # the user's: one line


def test_one_expert_given_for_two_tasks_is_a_warning_naming_both(tiny_pool_cfg, tmp_path, caplog):
    cfg = json.loads(json.dumps(tiny_pool_cfg))
    cfg["tasks"]["task1"]["expert"] = cfg["tasks"]["task0"]["expert"] + "/"  # the same directory, spelt otherwise
    cfg["tasks"]["task1"]["num_labels"] = cfg["tasks"]["task0"].get("num_labels")
    from adamerge.pool.config import pool_from_config

    with caplog.at_level(logging.WARNING, logger="adamerge"):
        pool_from_config(cfg)
    assert re.search(r"tasks 'task0' and 'task1' all use the expert .*task0: it is merged once per task", caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adamerge"):
        pool_from_config(tiny_pool_cfg)
    assert "all use the expert" not in caplog.text
