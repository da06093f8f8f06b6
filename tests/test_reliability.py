"""Bad inputs give one clear line (exit code 2, no traceback); interrupted runs resume exactly;
outputs are never half-written; config fuzzing never produces an unhandled exception."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import helpers
from helpers import ROOT, run_train


def train(conf, out, *extra, **kw):
    return run_train(["--config-dir", str(conf), "pool=tiny", f"out_dir={out}", "data.batch_size=8",
                      "evaluate.enabled=false", *extra], **kw)


def assert_clear_error(proc, pattern: str):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    import re

    assert re.search(pattern, proc.stderr), proc.stderr[-3000:]


@pytest.fixture
def conf(tmp_path, tiny_pool_cfg):
    """A config dir where each test may write its own broken pool."""
    d = tmp_path / "conf"
    helpers.write_pool_config(d, "tiny", tiny_pool_cfg)
    return d


def broken_pool(conf: Path, tiny_pool_cfg: dict, tmp_path: Path, edit) -> None:
    cfg = json.loads(json.dumps(tiny_pool_cfg))
    edit(cfg, tmp_path)
    helpers.write_pool_config(conf, "tiny", cfg)


def _copy_expert(cfg, tmp, task="task1"):
    dst = tmp / "copied"
    shutil.copytree(cfg["tasks"][task]["expert"], dst)
    cfg["tasks"][task]["expert"] = str(dst)
    return dst


def _truncate(cfg, tmp):
    f = _copy_expert(cfg, tmp) / "model.safetensors"
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
    "truncated safetensors": (_truncate, r"error: .*copied/model.safetensors: unreadable or truncated"),
    "different architecture": (_other_arch, r"error: expert 'task1'.*extra tensor 'bert.encoder.layer.2"),
    "empty calibration data": (_empty_calibration, r"error: task 'task0': .*empty.jsonl has no examples"),
    "no tasks": (lambda c, t: c.__setitem__("tasks", {}), r"error: pool config: key 'tasks' is required"),
    "num_labels larger than the head": (lambda c, t: c["tasks"]["task0"].__setitem__("num_labels", 5),
                                        r"error: task 'task0': num_labels gives 5 labels but its expert "
                                        r"\(.*/task0\) has 2 outputs .*set num_labels: 2"),
}


def inprocess(tmp_path, pool, *args) -> int:
    return helpers.run_inprocess([f"out_dir={tmp_path / 'run'}", "data.batch_size=8", "evaluate.enabled=false",
                                  *args], pool)


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
    p = train(conf, tmp_path / "run", "method=adamerging_layerwise", "method.lr=-1", check=False)
    assert_clear_error(p, r"^error: config key 'method.lr' must be > 0, got -1\n$")


def test_unknown_method_and_existing_export(conf, tmp_path):
    p = train(conf, tmp_path / "run", "method=no_such_method", check=False)
    assert_clear_error(p, r"error: .*Could not find 'method/no_such_method'")
    assert "adamerging_layerwise" in p.stderr  # Hydra lists the available methods
    (conf / "pool" / "dup.yaml").write_text("base: x\ntasks:\n  a: {expert: p}\n  a: {expert: q}\n")
    p = train(conf, tmp_path / "run", "method=task_arithmetic", "pool=dup", check=False)
    assert_clear_error(p, r"(?s)error: .*dup.yaml.*found duplicate key a")  # duplicate task names
    (tmp_path / "run" / "export").mkdir(parents=True)
    (tmp_path / "run" / "export" / "keep.txt").write_text("mine")
    p = train(conf, tmp_path / "run", "method=task_arithmetic", check=False)
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
    import train as entry  # on sys.path now (run_inprocess)

    assert entry.hydra_argv(["train.py", "pool=null", "method=x"]) == ["train.py", "~pool", "method=x"]


def test_out_dir_hydra_cannot_create(conf, tmp_path):
    """Through Hydra, which creates out_dir before train.py's own check runs."""
    p = train(conf, _a_file(tmp_path) / "sub", "method=task_arithmetic", check=False)
    assert_clear_error(p, r"^error: config key 'out_dir': cannot write the run directory: .*Not a directory: "
                          r"'.*a_file/sub'\n$")


def test_export_has_a_servable_model_per_task_and_a_model_card(tiny_pool_cfg, tmp_path):
    """export/model has the base's head; export/tasks/<task> is that task's model, from_pretrained as is."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adamerge.export import load_task_model

    assert helpers.run_inprocess([f"out_dir={tmp_path / 'run'}", "method=task_arithmetic",
                                  "evaluate.reference_rows=false"], tiny_pool_cfg) == 0
    export = tmp_path / "run" / "export"
    for task, n_labels in (("task0", 2), ("task1", 3)):
        served = AutoModelForSequenceClassification.from_pretrained(str(export / "tasks" / task)).eval()
        assert served.config.num_labels == n_labels
        batch = AutoTokenizer.from_pretrained(str(export / "tasks" / task))(["goal match team"], return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(served(**batch).logits, load_task_model(export, task)(**batch).logits)
    card = (export / "README.md").read_text()
    assert "task_arithmetic" in card and "task0" in card and "task1" in card, card
    assert "## Evaluation" in card and 'from_pretrained("export/tasks/task0")' in card, card


def test_verbose_shows_the_traceback(conf, tmp_path):
    p = train(conf, tmp_path / "run", "method=adamerging_layerwise", "method.lr=-1", "verbose=true", check=False)
    assert p.returncode != 0 and "Traceback" in p.stderr


def _spawn(conf, out, *extra):
    cmd = [sys.executable, str(ROOT / "train.py"), "--config-dir", str(conf), "pool=tiny", f"out_dir={out}",
           "data.batch_size=8", "evaluate.enabled=false", "method=adamerging_layerwise", "method.lr=0.05",
           "checkpoint.every_n_steps=2", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))


def _wait_for(path_glob: Path, pattern: str, timeout: float = 300) -> None:
    t0 = time.time()
    while not list(path_glob.glob(pattern)):
        if time.time() - t0 > timeout:
            raise TimeoutError(f"no {pattern} in {path_glob}")
        time.sleep(0.2)


def _coefs(run: Path) -> torch.Tensor:
    return torch.tensor(json.loads((run / "export" / "coefficients.json").read_text())["coefficients"])


@pytest.fixture(scope="module")
def uninterrupted12(tiny_conf_dir, tmp_path_factory):
    """The 12-step run both kill tests must reproduce after their resume (the pool is tiny_conf_dir's, as conf's)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "full"
    train(tiny_conf_dir, out, "method=adamerging_layerwise", "method.lr=0.05", "checkpoint.every_n_steps=2",
          "trainer.max_steps=12")
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_result(conf, uninterrupted12, tmp_path, sig):
    steps = "trainer.max_steps=12"
    run = tmp_path / "killed"
    p = _spawn(conf, run, steps)
    _wait_for(run / "checkpoints", "step000004.ckpt")
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert p.returncode == 143, err[-2000:]
        assert "resume=last" in err
        assert (run / "checkpoints" / "last.ckpt").exists()
    else:
        assert p.returncode == -9
    assert not (run / "export").exists()  # nothing half-written
    train(conf, run, "method=adamerging_layerwise", "method.lr=0.05", "checkpoint.every_n_steps=2", steps,
          "resume=last")
    torch.testing.assert_close(_coefs(run), _coefs(uninterrupted12), atol=1e-6, rtol=0)


def test_every_checkpoint_names_a_best_checkpoint_that_still_exists(tmp_path, tiny_pool_cfg):
    """A kill can land between any two checkpoint writes, and the run then resumes from whichever checkpoint
    is newest. So each checkpoint's record of the best (held-out objective) checkpoint must name a file that
    is still there — and resuming from a middle checkpoint exports the uninterrupted run's merge."""
    run = tmp_path / "run"
    common = ["method=adamerging_layerwise", "method.lr=0.5", "data.batch_size=4", "data.max_length=16",
              "evaluate.enabled=false", "checkpoint.every_n_steps=2", "trainer.max_steps=8"]
    helpers.train_here(tiny_pool_cfg, run, *common)
    held = dict(helpers.logged(run, "holdout_objective"))
    assert len({round(held[s], 6) for s in (2, 4, 6, 8)}) > 1  # the best moved during the run
    saved = sorted((run / "checkpoints").glob("step*.ckpt"))
    assert [p.name for p in saved] == [f"step{s:06d}.ckpt" for s in (2, 4, 6, 8)]
    for ckpt in saved:
        recorded = [v["best_model_path"] for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items()
                    if k.startswith("ModelCheckpoint")]
        assert recorded and all(Path(r).is_file() for r in recorded), (ckpt.name, recorded)
    exported, coefs = json.loads((run / "export" / "selection.json").read_text())["exported"], _coefs(run)
    for later in ("step000006.ckpt", "step000008.ckpt", "last.ckpt"):
        (run / "checkpoints" / later).unlink()  # as if killed just after step 4's checkpoint
    helpers.train_here(tiny_pool_cfg, run, *common, "resume=last", "export.overwrite=true")
    assert json.loads((run / "export" / "selection.json").read_text())["exported"] == exported
    torch.testing.assert_close(_coefs(run), coefs, atol=1e-6, rtol=0)


def test_truncated_newest_checkpoint_falls_back_to_previous(tmp_path, tiny_pool_cfg, capsys, caplog):
    run = tmp_path / "run"
    common = ["method=adamerging_layerwise", "data.batch_size=8", "evaluate.enabled=false", "checkpoint.every_n_steps=2"]
    helpers.train_here(tiny_pool_cfg, run, *common, "trainer.max_steps=4")
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:200])
    os.utime(last)  # newest
    with caplog.at_level(logging.WARNING, logger="adamerge"):
        helpers.train_here(tiny_pool_cfg, run, *common, "trainer.max_steps=6", "resume=last", "export.overwrite=true")
    assert "last.ckpt is unreadable or truncated" in caplog.text + capsys.readouterr().err
    bad = run / "checkpoints" / "bad.ckpt"
    bad.write_bytes(last.read_bytes()[:200])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    # refused before any work: train.py's cli in this process (the same pool as conf's)
    args = ["method=adamerging_layerwise", f"out_dir={run}", "data.batch_size=8", "evaluate.enabled=false",
            "trainer.max_steps=8", "export.overwrite=true"]
    for ckpt, words in ((bad, "bad.ckpt: checkpoint is unreadable or truncated"), (foreign, "not an adamerge checkpoint")):
        assert helpers.run_inprocess([*args, f"resume={ckpt}"], tiny_pool_cfg) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_nonfinite_loss_stops_or_skips(tmp_path, tiny_pool_cfg, capsys, caplog):
    def huge_head(cfg, tmp):
        from safetensors.torch import load_file, save_file

        d = _copy_expert(cfg, tmp, "task0")
        sd = load_file(str(d / "model.safetensors"))
        # pooled output = tanh(huge) = 1 exactly, so every logit = Σ 3e38 overflows to inf -> NaN entropy
        sd["bert.pooler.dense.bias"] = torch.full_like(sd["bert.pooler.dense.bias"], 3e38)
        sd["classifier.weight"] = torch.full_like(sd["classifier.weight"], 3e38)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})

    cfg = json.loads(json.dumps(tiny_pool_cfg))
    huge_head(cfg, tmp_path)
    args = ["method=adamerging_layerwise", "trainer.max_steps=3", "data.batch_size=8", "evaluate.enabled=false"]
    assert helpers.run_inprocess([*args, f"out_dir={tmp_path / 'run'}"], cfg) == 2
    err = capsys.readouterr().err
    assert "non-finite loss nan at step 0; nothing was exported" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "export").exists()
    with caplog.at_level(logging.WARNING, logger="adamerge"):
        assert helpers.run_inprocess([*args, f"out_dir={tmp_path / 'run2'}", "+method.nonfinite=skip"], cfg) == 0
    assert "step skipped" in caplog.text
    assert torch.allclose(_coefs(tmp_path / "run2"), torch.tensor(0.3))  # no step was taken


def _nudge_one_element(cfg, tmp):
    """task1's expert with one element of one tensor changed (as if fine-tuned a little further)."""
    from safetensors.torch import load_file, save_file

    d = _copy_expert(cfg, tmp, "task1")
    sd = load_file(str(d / "model.safetensors"))
    sd["bert.encoder.layer.1.attention.self.value.weight"].view(-1)[1] += 1e-3
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_resume_refuses_a_pool_that_differs_in_one_element(tiny_pool_cfg, tmp_path, capsys):
    args = ("method=adamerging_layerwise", "export.overwrite=true")
    assert inprocess(tmp_path, tiny_pool_cfg, *args, "trainer.max_steps=2") == 0
    other = json.loads(json.dumps(tiny_pool_cfg))
    _nudge_one_element(other, tmp_path)
    capsys.readouterr()
    assert inprocess(tmp_path, other, *args, "trainer.max_steps=4", "resume=last") == 2
    assert re.search(r"error: checkpoint was made from a different pool: experts: .*'task1'", capsys.readouterr().err)


def test_resume_refuses_swapped_lora_experts(tmp_path, capsys):
    """LoRA experts differ only in their target modules; swapping two of them is another pool."""
    lora = helpers.make_pool(tmp_path / "lora", k=3, form="lora")  # task0 and task2: both 2 labels
    args = ("method=adamerging_layerwise", "export.overwrite=true")
    assert inprocess(tmp_path, lora, *args, "trainer.max_steps=2") == 0
    swapped = json.loads(json.dumps(lora))
    t = swapped["tasks"]
    t["task0"]["expert"], t["task2"]["expert"] = t["task2"]["expert"], t["task0"]["expert"]
    capsys.readouterr()
    assert inprocess(tmp_path, swapped, *args, "trainer.max_steps=4", "resume=last") == 2
    assert re.search(r"error: checkpoint was made from a different pool: experts: ", capsys.readouterr().err)


def test_rerun_into_a_run_dir_with_checkpoints_is_refused(tiny_pool_cfg, tmp_path, capsys):
    """Without resume=, a learned method would overwrite the run's last.ckpt: refused before training."""
    args = ("method=adamerging_layerwise", "export.overwrite=true")
    assert inprocess(tmp_path, tiny_pool_cfg, *args, "trainer.max_steps=2") == 0
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    capsys.readouterr()
    assert inprocess(tmp_path, tiny_pool_cfg, *args, "trainer.max_steps=4") == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: .*/run/checkpoints already holds checkpoints of a run; continue it with "
                        r"resume=last or give a new out_dir\n", err), err
    assert last.read_bytes() == before
    assert inprocess(tmp_path, tiny_pool_cfg, *args, "trainer.max_steps=4", "resume=last") == 0
    assert inprocess(tmp_path, tiny_pool_cfg, "method=task_arithmetic", "export.overwrite=true") == 0  # trains nothing


def test_refused_rerun_keeps_the_old_runs_hydra_files(conf, tiny_pool_cfg, tmp_path, capsys):
    """Hydra would write .hydra/ before any check: a rerun refused for its out_dir must not overwrite them."""
    run = tmp_path / "run"
    train(conf, run, "method=adamerging_layerwise", "trainer.max_steps=2")  # through Hydra: its train.log
    hydra_before = {f.name: f.read_bytes() for f in (run / ".hydra").iterdir()}
    assert b"max_steps: 2" in hydra_before["config.yaml"]
    log_before = (run / "train.log").read_bytes()
    assert log_before
    p = train(conf, run, "method=adamerging_layerwise", "trainer.max_steps=4", "export.overwrite=true",
              check=False)  # through Hydra
    assert_clear_error(p, r"already holds checkpoints of a run")
    assert {f.name: f.read_bytes() for f in (run / ".hydra").iterdir()} == hydra_before
    assert (run / "train.log").read_bytes() == log_before  # the old run's log is not appended to


def test_resume_for_a_method_that_does_not_train(tiny_pool_cfg, tmp_path, capsys, caplog):
    """Nothing to resume: a missing checkpoint path is still named; an existing one or last only warns."""
    assert inprocess(tmp_path, tiny_pool_cfg, "method=task_arithmetic", f"resume={tmp_path / 'nope.ckpt'}") == 2
    assert re.search(r"error: resume=.*/nope.ckpt: checkpoint file does not exist", capsys.readouterr().err)
    assert not (tmp_path / "run" / "export").exists()
    (tmp_path / "some.ckpt").write_bytes(b"")
    for resume in ("last", str(tmp_path / "some.ckpt")):
        caplog.clear()
        assert inprocess(tmp_path, tiny_pool_cfg, "method=task_arithmetic", f"resume={resume}",
                         "export.overwrite=true") == 0
        assert f"method task_arithmetic does not train, so it has nothing to resume: resume={resume} ignored" \
            in caplog.text


def test_stale_export_temporaries_are_removed(tiny_pool_cfg, tmp_path, caplog):
    """A kill -9 during export leaves ``.export.tmp-*``: the next run into the out_dir removes it, says so."""
    run = tmp_path / "run"
    stale = run / ".export.tmp-abc123"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "model.safetensors").write_bytes(b"half written")
    other = run / ".other.tmp-1"  # not a temporary of this export dir: left alone
    other.mkdir()
    assert inprocess(tmp_path, tiny_pool_cfg, "method=task_arithmetic") == 0
    assert not stale.exists() and other.exists()
    assert (run / "export" / "coefficients.json").exists()
    lines = [r.getMessage() for r in caplog.records if "interrupted export" in r.getMessage()]
    assert lines == ["removed 1 temporary directory left by an interrupted export: .export.tmp-abc123"], lines


def test_importing_the_package_leaves_the_hub_alone_and_the_cli_switches_it_off():
    """A notebook that imports adamerge keeps its hub access; train.py (the CLI) is offline unless told."""
    code = ("import os, sys; import adamerge, adamerge.methods, adamerge.pool.config; "
            "assert 'HF_HUB_OFFLINE' not in os.environ, 'import switched the hub off'; "
            f"sys.path.insert(0, {str(helpers.ROOT)!r}); import train; print(os.environ['HF_HUB_OFFLINE'])")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "1", proc.stderr[-2000:]


def test_a_bug_raising_value_error_shows_its_traceback(tiny_pool_cfg, tmp_path, monkeypatch, capsys):
    """A user's mistake is one of adamerge's error classes (one line); a plain ValueError from inside the library
    is a bug: it is raised with its traceback, not printed as if the user could fix it."""
    from adamerge.methods import static

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(static.StaticMerge, "__init__", broken)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        inprocess(tmp_path, tiny_pool_cfg, "method=task_arithmetic")
    assert "error: an internal invariant broke" not in capsys.readouterr().err
    monkeypatch.undo()
    code = inprocess(tmp_path, tiny_pool_cfg, "method=task_arithmetic", "task_vectors.dtype=float8")
    assert code == 2 and "task_vectors.dtype" in capsys.readouterr().err  # the user's: one line


def test_the_first_process_of_a_second_node_does_no_rank_zero_start_up_work(tiny_pool_cfg, tmp_path, monkeypatch):
    """On a 2-node run each node's first process has LOCAL_RANK 0; only node 0's is rank 0. The other must
    neither clean the export target's temporaries (rank 0's export may be writing them) nor write .hydra/."""
    run = tmp_path / "run"
    stale = run / ".export.tmp-abc123"
    stale.mkdir(parents=True)
    for key in ("RANK", "SLURM_PROCID", "SLURM_NTASKS", "GROUP_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")
    assert inprocess(tmp_path, tiny_pool_cfg, "method=task_arithmetic") == 0
    assert stale.exists() and not (run / ".hydra").exists()
    monkeypatch.setenv("NODE_RANK", "0")  # node 0's first process: rank 0
    assert inprocess(tmp_path, tiny_pool_cfg, "method=task_arithmetic", "export.overwrite=true") == 0
    assert not stale.exists() and (run / ".hydra" / "config.yaml").exists()


@pytest.mark.parametrize("env, zero", [
    ({}, True),                                                   # one process, or Lightning's first
    ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),               # a process Lightning starts
    ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),               # the first process of the second node
    ({"RANK": "0", "LOCAL_RANK": "0"}, True),                     # torchrun
    ({"RANK": "4", "LOCAL_RANK": "0"}, False),                    # torchrun, second node
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "LOCAL_RANK": "0"}, False),  # srun
])
def test_launch_is_rank_zero(monkeypatch, env, zero):
    from adamerge.run.distributed import launch_is_rank_zero

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launch_is_rank_zero() is zero


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


def test_export_killed_between_renames_keeps_the_previous_export(tmp_path):
    """Killed after the old export was moved aside and before the new one took its place: put it back."""
    from adamerge.atomic import remove_stale_temporaries

    (tmp_path / ".export.old-x1").mkdir()
    (tmp_path / ".export.old-x1" / "eval.md").write_text("previous")
    (tmp_path / ".export.tmp-x2").mkdir()
    assert [p.name for p in remove_stale_temporaries(tmp_path / "export")] == [".export.tmp-x2"]
    assert (tmp_path / "export" / "eval.md").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_outputs_honour_the_umask(tiny_pool_cfg, tmp_path, umask):
    """export/ and checkpoints get the modes a plain mkdir/open would give (not mkdtemp's 0700, mkstemp's 0600)."""
    old = os.umask(umask)
    try:
        assert inprocess(tmp_path, tiny_pool_cfg, "method=adamerging_layerwise", "trainer.max_steps=2",
                         "checkpoint.every_n_steps=1") == 0
    finally:
        os.umask(old)
    run = tmp_path / "run"

    def mode(p):
        return p.stat().st_mode & 0o777

    assert mode(run / "export") == 0o777 & ~umask
    assert mode(run / "export" / "model") == 0o777 & ~umask
    assert mode(run / "export" / "coefficients.json") == 0o666 & ~umask
    for ckpt in ("last.ckpt", "step000001.ckpt"):
        assert mode(run / "checkpoints" / ckpt) == 0o666 & ~umask, ckpt


def test_ctrl_c_checkpoints_and_resumes(conf, tiny_pool_cfg, tmp_path):
    """SIGINT during training does what SIGTERM does: last.ckpt, the resume hint, exit code 130."""
    run = tmp_path / "run"
    p = _spawn(conf, run, "trainer.max_steps=200")  # many steps: still training when the signal comes
    try:
        _wait_for(run / "checkpoints", "step000004.ckpt", timeout=120)
        assert p.poll() is None, "training ended before the signal"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-2000:]
    assert re.search(rf"(?m)^interrupted \(SIGINT\): last checkpoint written; continue with out_dir={run} "
                     r"resume=last$", err), err[-2000:]
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 4 <= step < 200
    assert not (run / "export").exists()
    # the checkpoint goes on: two more steps (the 200 only kept the first process busy), in this process
    helpers.train_here(tiny_pool_cfg, run, "data.batch_size=8", "evaluate.enabled=false", "method=adamerging_layerwise",
                       "method.lr=0.05", "checkpoint.every_n_steps=2", f"trainer.max_steps={step + 2}", "resume=last")
    assert json.loads((run / "export" / "coefficients.json").read_text())["num_trainable"] > 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step + 2


def test_progress_lines_in_the_log_file(conf, tmp_path):
    """stdout is not a terminal here: progress still reaches train.log, a line per N steps and the last."""
    run = tmp_path / "run"
    train(conf, run, "method=adamerging_layerwise", "trainer.max_steps=12", "progress.every_n_steps=5",
          "progress.every_s=1000")
    lines = re.findall(r"step (\d+)/12  loss -?\d+\.\d+  s/step \d+\.\d+  ETA \d+s  "
                       r"coef mean/min/max -?\d\.\d+/-?\d\.\d+/-?\d\.\d+$", (run / "train.log").read_text(), re.M)
    assert lines == ["5", "10", "12"], (run / "train.log").read_text()


def test_progress_lines_every_n_steps_and_after_every_s_seconds(caplog, monkeypatch):
    """10 s a step, a line every 5 steps or after 30 s without one, and the last step."""
    import logging
    from types import SimpleNamespace

    import adamerge.run.progress as progress

    clock = {"t": 0.0}
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock["t"])
    cb = progress.ProgressLog(every_n_steps=5, every_s=30)
    trainer = SimpleNamespace(global_step=0, max_steps=12, is_global_zero=True,
                              callback_metrics={"loss": torch.tensor(0.5)})
    cb.on_train_start(trainer, None)
    with caplog.at_level(logging.INFO, logger="adamerge"):
        for s in range(1, 13):
            clock["t"], trainer.global_step = 10.0 * s, s
            cb.on_train_batch_end(trainer, None, None, None, s)
    assert [r.getMessage().split("  ")[0] for r in caplog.records] == [
        "step 3/12", "step 5/12", "step 8/12", "step 10/12", "step 12/12"]


def test_quiet_start_up(conf, tmp_path):
    """No Lightning tips or accelerator lines, no third-party deprecation warnings; verbose=true shows them.
    Output to a file or pipe gets no progress bar (its redrawn lines would fill the log): progress lines."""
    args = ("method=adamerging_layerwise", "trainer.max_steps=2")
    p = train(conf, tmp_path / "run", *args)
    out = p.stdout + p.stderr
    assert "it/s" not in out and "step 2/2  loss" in out, out
    for noise in ("Tip", "deprecated", "GPU available", "TPU available", "Loading weights"):
        assert noise not in out, out
    assert "exported merged model" in out
    assert sorted(f.name for f in (tmp_path / "run" / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml",
                                                                              "overrides.yaml"]
    p = train(conf, tmp_path / "verbose", *args, "verbose=true")
    assert "GPU available" in p.stdout + p.stderr


def test_progress_bar_counts_steps_also_after_a_resume(conf, tmp_path):
    """The bar reads "step … k/max_steps", not Lightning's "Epoch 0/-2" of an endless stream."""
    run = tmp_path / "run"
    p = train(conf, run, "method=adamerging_layerwise", "trainer.max_steps=4", "checkpoint.every_n_steps=2",
              "trainer.enable_progress_bar=true")  # on (stdout is a pipe here, where the default is off)
    out = p.stdout + p.stderr  # Lightning draws its bar on stdout
    assert re.search(r"step: 100%.*\b4/4\b", out) and "Epoch" not in out, out[-2000:]
    (run / "export").rename(tmp_path / "first_export")
    p = train(conf, run, "method=adamerging_layerwise", "trainer.max_steps=6", "checkpoint.every_n_steps=2",
              "resume=last", "trainer.enable_progress_bar=true")
    out = p.stdout + p.stderr
    assert re.search(r"step: 100%.*\b6/6\b", out) and "Epoch" not in out, out[-2000:]


def test_tensorboard_logger_writes_events_and_keeps_the_csv_log(conf, tmp_path):
    pytest.importorskip("tensorboardX")
    run = tmp_path / "run"
    p = train(conf, run, "method=adamerging_layerwise", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
              "logger=tensorboard")
    assert p.returncode == 0, p.stderr[-2000:]
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert helpers.logged_losses(run)  # the CSV log the export's loss curve reads


def test_unknown_or_unavailable_logger_is_one_line_before_any_work(tiny_pool_cfg, tmp_path, capsys):
    import importlib.util

    def refused(out: Path, logger: str, pattern: str) -> None:
        code = helpers.run_inprocess(["method=adamerging_layerwise", f"out_dir={out}", f"logger={logger}",
                                      "data.batch_size=8", "evaluate.enabled=false"], tiny_pool_cfg)
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert re.search(pattern, err), err
        assert not (out / "checkpoints").exists()

    refused(tmp_path / "a", "tensorbord", r"unknown config key 'logger.tensorbord'.*did you mean 'logger.tensorboard'")
    missing = next((n for n in ("wandb", "mlflow") if importlib.util.find_spec(n) is None), None)
    if missing:
        refused(tmp_path / "b", missing, rf"logger={missing} needs the package {missing} \(pip install {missing}\)")


def test_disk_full_during_the_export_is_one_line_and_keeps_the_checkpoints(tiny_pool_cfg, tmp_path, monkeypatch,
                                                                            capsys):
    import errno

    import adamerge.export as export

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "coefficients.png"))

    monkeypatch.setattr(export, "plot_coefficients", full)
    code = helpers.run_inprocess([f"out_dir={tmp_path / 'run'}", "method=adamerging_layerwise", "trainer.max_steps=2",
                                  "data.batch_size=4", "evaluate.enabled=false", "trainer.enable_progress_bar=false"],
                                 tiny_pool_cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: [Errno 28] No space left on device") and "Traceback" not in err
    assert "coefficients.png" in err[-1]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()  # training is not lost: resume=last
    assert not (tmp_path / "run" / "export").exists()


def test_sigterm_outside_training_is_143_with_one_line(tiny_pool_cfg, tmp_path, monkeypatch, capsys):
    """SIGTERM while loading, evaluating or exporting (no Trainer handler then): exit 143, one line, and
    the previous SIGTERM handler is back afterwards."""
    import train

    def terminated_while_exporting(cfg):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM was not handled")

    from adamerge.run import program

    monkeypatch.setattr(program, "run", terminated_while_exporting)
    before = signal.getsignal(signal.SIGTERM)
    code = train.cli(helpers.compose([f"out_dir={tmp_path / 'run'}"], tiny_pool_cfg))
    assert code == 143
    assert capsys.readouterr().err.strip().splitlines() == ["interrupted (SIGTERM)"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_run_into_a_locked_out_dir_is_refused_and_a_dead_holder_s_lock_is_taken_over(
        tiny_pool_cfg, tmp_path, capsys):
    """A live run holds out_dir/.adamerge.run.lock (pid, host): a second run into it stops before writing anything,
    naming the holder. A lock whose process is gone (a crashed run) is taken over, and released at the end."""
    import socket

    run = tmp_path / "run"
    run.mkdir()
    lock = run / ".adamerge.run.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        assert inprocess(tmp_path, tiny_pool_cfg, "method=adamerging_layerwise", "trainer.max_steps=2") == 2
        err = capsys.readouterr().err
        assert f"is in use by another run (process {holder.pid} on host {socket.gethostname()})" in err
        assert sorted(p.name for p in run.iterdir()) == [".adamerge.run.lock"]  # nothing written, the lock kept
    finally:
        holder.kill()
        holder.wait()
    assert inprocess(tmp_path, tiny_pool_cfg, "method=adamerging_layerwise", "trainer.max_steps=2") == 0
    assert (run / "export" / "coefficients.json").exists() and not lock.exists()
