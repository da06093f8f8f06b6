"""Task vectors sharded across processes (``task_vectors.shard=true`` under ``trainer=ddp``): memory per rank.

K full experts of MiniLM (base + small random perturbations, written once by bench/speed.py's
``build_pool``), layer-wise AdaMerging through train.py, CPU gloo processes at one thread each. Rows:

  1 process                  the plain trainer
  N processes, replicated    trainer=ddp: every process holds all K task vectors
  N processes, sharded       trainer=ddp + task_vectors.shard=true: each holds 1/N of every task vector

Per rank: the task-vector bytes it holds (from its log: ``task vectors: … bytes`` and, sharded, ``rank r
holds … of … bytes``) against K·P/N, its peak RSS (``VmHWM`` of each process, polled while it runs),
and seconds per step (the progress log's last ``s/step``), as ratios to the 1-process row.

    python bench/scale.py --k 16 --procs 2 --steps 20 --write bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT
from speed import build_pool

WORDS = "the a model merge task expert data text news film review tweet topic language sport tech food".split()


def write_config(conf: Path, spec: dict, data_dir: Path) -> None:
    """``pool/scale.yaml``: one task per expert, each with synthetic calibration text."""
    import random

    data_dir.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(0)
    tasks = {}
    for i, expert in enumerate(spec["experts"]):
        cal = data_dir / f"t{i}.jsonl"
        cal.write_text("".join(json.dumps({"text": " ".join(rnd.choices(WORDS, k=24))}) + "\n" for _ in range(64)))
        tasks[f"t{i}"] = {"expert": expert, "calibration": str(cal), "num_labels": 2}
    (conf / "pool").mkdir(parents=True, exist_ok=True)
    (conf / "pool" / "scale.yaml").write_text(json.dumps({"base": spec["base"], "tasks": tasks}))


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def peak_rss_mib(pid: int) -> float | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    return int(m[1]) / 1024 if m else None


def run(conf: Path, out: Path, extra: list[str], steps: int) -> dict:
    """One train.py run; per-process peak RSS (train.py and the processes it starts), bytes held, s/step."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--config-dir", str(conf), "pool=scale", f"out_dir={out}",
           "method=adamerging_layerwise", f"trainer.max_steps={steps}", "data.batch_size=8", "data.max_length=32",
           "evaluate.enabled=false", "progress.every_n_steps=1", "export.task_models=false", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, float] = {}
    while proc.poll() is None:
        for pid in [proc.pid, *descendants(proc.pid)]:
            rss = peak_rss_mib(pid)
            if rss is not None:
                peaks[pid] = max(peaks.get(pid, 0.0), rss)
        time.sleep(0.2)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed ({proc.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    logs = "\n".join(f.read_text() for f in sorted(out.glob("*.log")))
    full = [int(b) for b in re.findall(r"task vectors: \d+ experts, \d+ tensors, (\d+) bytes", logs)]
    full += [int(b) for b in re.findall(r"rank \d+ holds \d+ of (\d+) bytes", logs)]
    held = [int(b) for b in re.findall(r"rank \d+ holds (\d+) of \d+ bytes", logs)]
    per_step = [float(s) for s in re.findall(r"s/step ([\d.]+)", logs)]
    # the training processes: the largest peaks (a launcher shell, if any, stays small)
    ranks = sorted(peaks.values(), reverse=True)
    return {"full_bytes": max(full), "held_bytes": max(held) if held else max(full), "rss": ranks,
            "s_per_step": per_step[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--base", default="random-minilm", help="as bench/speed.py: minilm | random-minilm | tiny | a path")
    ap.add_argument("--pool-dir", default="/tmp/adamerge_scale_pool")
    ap.add_argument("--write", type=Path, default=None, help="append the table to this markdown file")
    args = ap.parse_args()

    pool_dir = Path(args.pool_dir)
    spec = build_pool(pool_dir, args.base, args.k)
    spec = {**spec, "experts": spec["experts"][:args.k]}
    conf = pool_dir / f"conf_k{args.k}"
    write_config(conf, spec, pool_dir / "data")
    n = args.procs
    ddp = ["trainer=ddp", f"trainer.devices={n}", "trainer.accelerator=cpu"]
    rows = [("1 process", []), (f"{n} processes, replicated", ddp),
            (f"{n} processes, sharded", [*ddp, "task_vectors.shard=true"])]
    results = []
    for label, extra in rows:
        res = run(conf, pool_dir / "runs" / re.sub(r"\W+", "_", label), extra, args.steps)
        results.append((label, res))
        print(label, json.dumps(res), flush=True)

    ref = results[0][1]
    lines = [f"### Sharded task vectors — {datetime.date.today()} — `python bench/scale.py --k {args.k} "
             f"--procs {n} --steps {args.steps}`", "",
             f"K = {args.k} full experts (base: {args.base}), layer-wise AdaMerging, CPU gloo, one thread per "
             f"process; K·P = {ref['full_bytes'] / 2**20:.1f} MiB of fp32 task vectors.", "",
             "| run | τ MiB per rank | ÷ K·P/N | peak RSS MiB per rank | ÷ 1 process | s/step | ÷ 1 process |",
             "|---|---|---|---|---|---|---|"]
    for label, res in results:
        procs = 1 if label.startswith("1 ") else n
        rss = res["rss"][:procs]
        lines.append(f"| {label} | {res['held_bytes'] / 2**20:.1f} | "
                     f"{res['held_bytes'] / (res['full_bytes'] / procs):.3f} | "
                     f"{' / '.join(f'{r:.0f}' for r in rss)} | {max(rss) / max(ref['rss'][:1]):.2f} | "
                     f"{res['s_per_step']:.2f} | {res['s_per_step'] / ref['s_per_step']:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        with args.write.open("a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
