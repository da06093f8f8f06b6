"""``adamerge.merge(...)``: the program train.py runs, called from Python (a notebook, a script) without the
command line: overrides as nested dicts or dotted keys, a user's own config folder, errors as exceptions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import adamerge
import helpers
from adamerge.errors import ConfigError

FAST = {"trainer": {"max_steps": 2, "enable_progress_bar": False}, "data": {"batch_size": 4, "max_length": 16},
        "evaluate": {"reference_rows": False}}


def test_merge_from_a_script_in_another_directory(tiny_pool_cfg, tmp_path):
    """``python -c "import adamerge; adamerge.merge(...)"`` from a directory that is not the checkout."""
    out = tmp_path / "run"
    code = (f"import adamerge, json; r = adamerge.merge(pool={tiny_pool_cfg!r}, method='adamerging_taskwise', "
            f"out_dir={str(out)!r}, **{FAST!r}, **{{'method.lr': 0.05}}); print(json.dumps(r['selection']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["exported"] in ("start", "best", "end")
    assert (out / "export" / "coefficients.json").exists() and (out / "eval.json").exists()
    assert "step 2/2" in (out / "train.log").read_text()  # progress in the log file, as the command line writes it


def test_merge_takes_dotted_keys_a_config_folder_and_raises_user_errors(tiny_pool_cfg, tmp_path):
    conf = tmp_path / "conf"
    helpers.write_pool_config(conf, "mine", tiny_pool_cfg)
    result = adamerge.merge(pool="mine", method="task_arithmetic", out_dir=tmp_path / "ta", config_dir=conf,
                            evaluate={"reference_rows": False}, **{"method.scale": 0.5})
    coefficients = json.loads((tmp_path / "ta" / "export" / "coefficients.json").read_text())
    assert result["export"] == str(tmp_path / "ta" / "export") and coefficients["method"] == "task_arithmetic"
    with pytest.raises(ConfigError, match=r"method.lr"):
        adamerge.merge(pool=tiny_pool_cfg, out_dir=tmp_path / "bad", **FAST, **{"method.lr": -1.0})
    assert not (tmp_path / "bad" / "export").exists()


def test_the_adamerge_command_runs_from_another_directory(tiny_pool_cfg, tmp_path):
    """The console script (pyproject [project.scripts]) takes train.py's overrides and --config-dir."""
    import shutil

    conf = tmp_path / "conf"
    helpers.write_pool_config(conf, "mine", tiny_pool_cfg)
    command = shutil.which("adamerge")
    assert command, "the adamerge command is not installed: pip install -e . (README)"
    proc = subprocess.run([command, "--config-dir", str(conf), "pool=mine", "method=task_arithmetic",
                           f"out_dir={tmp_path / 'run'}", "evaluate.reference_rows=false"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "export" / "coefficients.json").exists() and (tmp_path / "run" / "train.log").exists()
    bad = subprocess.run([command, "method=no_such_method"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2 and bad.stderr.startswith("error: In 'config': Could not find 'method/no_such_method'")


def run_ok(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_an_installed_wheel_runs_from_any_directory(tiny_pool_cfg, tmp_path):
    """`pip install .` (not editable): the configs and the benchmark recipe ship inside the package, so a run
    works with nothing of the checkout on the path (python -S: not even the editable install's hook)."""
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    run_ok([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
            str(helpers.ROOT)])
    run_ok([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
            str(next(wheels.glob("adamerge-*.whl")))])
    assert (target / "adamerge" / "configs" / "pool" / "minilm_frozen_head_lora.yaml").is_file()
    assert (target / "adamerge" / "data" / "experts_frozen_head_lora" / "bbc_news" / "adapter_model.safetensors").is_file()
    conf = tmp_path / "conf"
    helpers.write_pool_config(conf, "mine", tiny_pool_cfg)
    elsewhere.mkdir()
    # the installed copy first, then the environment's other packages (not their .pth hooks)
    path = [str(target)] + [p for p in sys.path if p.endswith("site-packages")]
    code = (f"import sys; sys.path[:0] = {path!r}; import adamerge; print(adamerge.__file__); "
            "from adamerge.run.entry import console_main; "
            f"sys.argv = ['adamerge', '--config-dir', {str(conf)!r}, 'pool=mine', 'method=task_arithmetic', "
            "'out_dir=run', 'evaluate.reference_rows=false']; console_main()")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = run_ok([sys.executable, "-S", "-c", code], cwd=elsewhere, env=dict(env, HF_HUB_OFFLINE="1"))
    assert proc.stdout.splitlines()[0] == str(target / "adamerge" / "__init__.py")  # not the checkout's
    assert (elsewhere / "run" / "export" / "model").is_dir()
