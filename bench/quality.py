"""Merge quality on the offline benchmark: every method through the real train.py, one table.

    python bench/quality.py                        # all methods in configs/method, full-fine-tune experts
    python bench/quality.py --methods task_arithmetic adamerging_layerwise --steps 200
    python bench/quality.py --pool minilm_lora --write bench/RESULTS.md

Each method runs in its own subprocess (so wall time and memory are its own). Learned methods run
``--steps`` optimization steps (default: each yaml's published default, which can take long on a
CPU: pass a smaller number and the table says so). The reference rows (pretrained backbone with
the experts' heads, each expert on its own task) are evaluated once.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def all_methods() -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs" / "method").glob("*.yaml"))


def run_method(method: str, pool: str, out: Path, steps: int | None, reference: bool, extra: list[str]) -> dict:
    args = [sys.executable, str(ROOT / "train.py"), f"method={method}", f"pool={pool}", f"out_dir={out}",
            f"evaluate.reference_rows={str(reference).lower()}", "export.overwrite=true",
            "trainer.enable_progress_bar=false", *extra]
    if steps is not None:
        args.append(f"++method.steps={steps}")  # ++: also for yamls without a steps key
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # a fresh run (train.py refuses old checkpoints)
    t0 = time.time()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"method": method, "error": " | ".join(tail), "wall_s": wall}
    summary = json.loads((out / "eval.json").read_text())
    coefs = json.loads((out / "export" / "coefficients.json").read_text())
    return {"method": method, "summary": summary, "wall_s": wall, "num_trainable": coefs.get("num_trainable", 0)}


def table(results: list[dict], tasks: list[str]) -> str:
    """One markdown table; with a backdoored task (attack files), its ASR and clean→target columns after ``norm``."""
    sys.path.insert(0, str(ROOT))
    from adamerge.evaluate import EXTRA_HEADINGS

    extra = {key: sorted({t for r in results for row in r.get("rows", {}).values() for t in row.get(key, {})})
             for key in EXTRA_HEADINGS}
    cols = tasks + ["avg", "norm"] + [f"{EXTRA_HEADINGS[key]} {t}" for key, ts in extra.items() for t in ts]
    lines = ["| method | " + " | ".join(cols) + " | trainable | wall s |", "|---" * (len(cols) + 3) + "|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:120]} |")
            continue
        for name, row in r["rows"].items():
            row = {**row, **{f"{EXTRA_HEADINGS[key]} {t}": v for key in extra for t, v in row.get(key, {}).items()}}
            cells = [f"{100 * row[c]:.1f}" if c in row else "–" for c in cols]
            extra = f"{r.get('num_trainable', '')} | {r['wall_s']:.0f}" if name == r["row"] else " | "
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {extra} |")
    return "\n".join(lines)


def add_normalized(results: list[dict], tasks: list[str]) -> None:
    """Rows of runs without reference rows get "norm" (mean over tasks of merged/expert) from the first run's
    expert row, as train.py computes it when the reference rows are in the same run."""
    expert = next((r["rows"]["expert"] for r in results if "expert" in r.get("rows", {})), None)
    if expert is None:
        return
    for r in results:
        for row in r.get("rows", {}).values():
            if "norm" not in row and all(t in row for t in tasks):
                row["norm"] = sum(row[t] / expert[t] for t in tasks) / len(tasks)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=None, help="method ids (default: every configs/method yaml)")
    ap.add_argument("--pool", default="minilm_full")
    ap.add_argument("--steps", type=int, default=None, help="optimization steps for learned methods")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_quality")
    ap.add_argument("--write", type=Path, default=None, help="append the table to this markdown file")
    ap.add_argument("extra", nargs="*", help="more key=value overrides for every run")
    a = ap.parse_args(argv)
    methods = a.methods or all_methods()
    results, tasks = [], []
    for i, m in enumerate(methods):
        r = run_method(m, a.pool, a.out / m, a.steps, reference=(i == 0), extra=a.extra)
        if "summary" in r:
            tasks = r["summary"]["tasks"]
            rows = r.pop("summary")["rows"]
            # a learned method's own row (its id, maybe "(exported: the start)") and the start row it came from
            keep = [n for n in rows if n.startswith(m) or n.startswith("start:")]
            r["rows"] = rows if i == 0 else {n: rows[n] for n in keep}
            r["row"] = next(n for n in rows if n.startswith(m))
        results.append(r)
        print(f"{m}: " + (f"avg {100 * r['rows'][r['row']]['avg']:.1f} ({r['wall_s']:.0f} s)" if "rows" in r
                          else r["error"]), flush=True)
    add_normalized(results, tasks)
    text = table(results, tasks)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    header = (f"### Quality — {datetime.date.today()} — commit {commit} — pool={a.pool} — "
              f"steps={'yaml defaults' if a.steps is None else a.steps} {' '.join(a.extra)}")
    print("\n" + header + "\n\n" + text)
    if a.write:
        with a.write.open("a") as f:
            f.write("\n" + header + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
