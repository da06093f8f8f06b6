"""bench/paired.py: per-example scores of two exported merges, re-measured from their exports."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from helpers import run_train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # bench scripts import bench/common.py, as when run from there
spec = importlib.util.spec_from_file_location("bench_paired", ROOT / "bench" / "paired.py")
paired = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = paired
spec.loader.exec_module(paired)


def test_mcnemar_p_is_the_exact_binomial_tail():
    assert paired.mcnemar_p(0, 0) == 1.0
    assert paired.mcnemar_p(5, 5) == 1.0
    assert paired.mcnemar_p(10, 0) == pytest.approx(2 / 2**10)
    assert paired.mcnemar_p(1, 9) == pytest.approx(2 * 11 / 2**10)


def test_two_exports_compared_example_by_example(tiny_conf_dir, tmp_path, capsys):
    runs = {}
    for scale in (0.3, 1.0):
        runs[scale] = tmp_path / f"ta{scale}"
        run_train(["--config-dir", str(tiny_conf_dir), "pool=tiny", "method=task_arithmetic",
                   f"method.scale={scale}", f"out_dir={runs[scale]}"])
    norms = {s: json.loads((r / "eval.json").read_text())["rows"]["task_arithmetic"]["norm"] for s, r in runs.items()}

    paired.main([str(runs[0.3]), str(runs[0.3]), "--resamples", "200"])
    same = capsys.readouterr().out
    assert "A − B = +0.00" in same and "[+0.00, +0.00]" in same  # a merge against itself: no discordant pair
    assert all(row.split("|")[5:7] == [" 0 ", " 0 "] for row in same.splitlines() if row.startswith("| ") and
               row.split("|")[2].strip().isdigit())

    paired.main([str(runs[0.3]), str(runs[1.0]), "--resamples", "200"])  # re-measured == eval.json, else exits
    out = capsys.readouterr().out
    diff = float(re.search(r"A − B = ([+-][0-9.]+)", out).group(1))
    assert diff == pytest.approx(100 * (norms[0.3] - norms[1.0]), abs=0.006)
    lo, hi = map(float, re.search(r"interval \[([+-][0-9.]+), ([+-][0-9.]+)\]", out).groups())
    assert lo <= diff <= hi


def test_a_merge_whose_export_disagrees_with_its_eval_json_is_refused(tiny_conf_dir, tmp_path):
    run = tmp_path / "ta"
    run_train(["--config-dir", str(tiny_conf_dir), "pool=tiny", "method=task_arithmetic", f"out_dir={run}"])
    ev = json.loads((run / "eval.json").read_text())
    task = next(iter(ev["tasks"]))
    ev["rows"]["task_arithmetic"][task] -= 0.01
    (run / "eval.json").write_text(json.dumps(ev))
    with pytest.raises(SystemExit, match=f"task '{task}' re-measured"):
        paired.main([str(run), str(run), "--resamples", "10"])
