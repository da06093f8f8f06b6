"""Step time and peak memory vs. number of experts K: adamerge vs FusionBench vs the unmerged floor.

One step of layer-wise AdaMerging = merge + forward + entropy + backward + Adam step, on one batch
(``--batch`` x ``--seq`` random token ids, the first task's head). Columns:

  floor          plain forward+backward of the unmerged model with grads on its parameters
  adamerge       this project: ``AdaMerging`` (``MergeMethod.step_loss`` + backward + Adam), τ in fp32
  adamerge-bf16  the same with ``task_vectors.dtype=bfloat16`` (added by ``--dtype bfloat16``)
  adamerge-hosttv  τ pinned in host memory, moved per tensor (``task_vectors.device=cpu``); with --device cuda
  adamerge-factorized  with ``--lora R`` (experts are rank-R LoRA adapters): ``task_vectors.lora=factorized``
                 (``lora_step=auto``: each weight merged from its factors per step, or run as adapters,
                 whichever costs fewer multiply-adds for the batch),
  adamerge-adapters  the same with ``task_vectors.lora_step=adapters`` (always the multi-adapter forward),
                 the multi-adapter forward; ``adamerge`` is then the dense path (``task_vectors.lora=dense``)
  fusionbench    FusionBench's ``LayerWiseMergedModel`` driven like its layer-wise AdaMerging loop

Every (column, K) runs in a fresh subprocess (``speed.py --one IMPL K``) that prints one JSON line:
seconds per step (median after warm-up), peak RSS of the whole child (``ru_maxrss``), peak RSS of
the step phase only (the high-water mark is reset after setup), the peak of live tensor bytes in two
extra steps (see ``TensorBytes``) and, with ``--device cuda``, ``torch.cuda.max_memory_allocated``.

    pip install --no-deps --target /tmp/fusionbench fusion-bench==0.2.33
    python bench/speed.py --fusionbench-path /tmp/fusionbench --ks 2 4 8 16 --repeats 10 \\
        --dtype bfloat16 --write bench/RESULTS.md
    python bench/speed.py --lora 8 --ks 4 16 64 --impls floor adamerge adamerge-factorized --write bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's adamerge, installed or not
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

# the configurations and the report, beside this file (run as a script, bench/ is on sys.path)
from speed_report import append_results, git_commit, stream_bandwidth, tables  # noqa: E402
from speed_setups import MIB, build_pool, child_setup, setup  # noqa: E402

IMPLS = ("floor", "adamerge", "adamerge-bf16", "adamerge-hosttv", "adamerge-factorized", "adamerge-adapters",
         "fusionbench")


# ----------------------------------------------------------------------------------------------
# Memory accounting
# ----------------------------------------------------------------------------------------------
class TensorBytes(TorchDispatchMode):
    """Live and peak bytes of tensor storages: registered ones plus every op output while active.

    Counts storages, not tensors (views are free) and forgets a storage when it is freed, so
    ``peak`` is the high-water mark of what tensors actually hold, without allocator noise.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            if t.layout == torch.sparse_coo:  # no storage of its own (e.g. the embedding's ∂L/∂W)
                self.track([t._indices(), t._values()])
                continue
            s = t.untyped_storage()
            key = id(s)  # the storage's Python object lives as long as the storage itself
            if key in self.live:
                continue
            self.live[key] = s.nbytes()
            self.current += self.live[key]
            self.peak = max(self.peak, self.current)
            weakref.finalize(s, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(t for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux ≥ 4.0; also what ru_maxrss reports)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------------------------
# One configuration (child process)
# ----------------------------------------------------------------------------------------------


def timed(step: Callable[[], None], cuda: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one step."""
    t, c = time.perf_counter(), time.process_time()
    step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c


def time_fields(times: list[tuple[float, float]]) -> dict:
    """Median and min wall time; median CPU time (what a shared machine's other jobs do not inflate)."""
    wall = [w for w, _ in times]
    return {"step_s": statistics.median(wall), "step_s_min": min(wall),
            "cpu_s": statistics.median(c for _, c in times), "step_s_all": [round(x, 4) for x in wall]}


def run_one(impl: str, k: int, args: argparse.Namespace) -> dict:
    """Set up one configuration, time ``args.repeats`` steps after ``args.warmup``, measure memory."""
    spec, device, inputs = child_setup(args)
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    step, persistent, info = setup(impl, k, spec, device, inputs, args)
    setup_s = time.perf_counter() - t0
    setup_rss = rss_peak_mib()
    step_rss_ok = reset_rss_peak()
    if cuda:
        torch.cuda.synchronize()
        cuda_setup = torch.cuda.memory_allocated() / MIB
        torch.cuda.reset_peak_memory_stats()

    times = [timed(step, cuda) for _ in range(args.warmup + args.repeats)][args.warmup:]
    step_rss = rss_peak_mib()
    out = {"impl": impl, "k": k, "device": str(device), "threads": args.threads, **time_fields(times),
           "setup_s": round(setup_s, 2), "rss_peak_mib": max(setup_rss, step_rss),
           "rss_setup_mib": setup_rss, "rss_step_mib": step_rss if step_rss_ok else None, **info}
    if cuda:
        out.update(cuda_setup_mib=cuda_setup, cuda_peak_mib=torch.cuda.max_memory_allocated() / MIB)
    if args.tensor_bytes:
        # two untimed steps: the second also sees what the first left alive (FusionBench's loss graph)
        tb = TensorBytes()
        tb.track(persistent())
        with tb:
            step()
            step()
        out["tensor_peak_mib"] = tb.peak / MIB
    return out


def run_interleaved(impls: list[str], k: int, args: argparse.Namespace) -> list[dict]:
    """Every column in one process, their steps alternating (order rotated each round): times only.

    On a shared machine whose load drifts, this pairs the columns' steps in time, so the ratios
    hold even when absolute times do not. Memory is not measured (the columns share the process).
    """
    spec, device, inputs = child_setup(args)
    cuda = device.type == "cuda"
    cols = {i: setup(i, k, spec, device, inputs, args) for i in impls}
    for i in impls:
        for _ in range(args.warmup):
            timed(cols[i][0], cuda)
    times: dict[str, list[tuple[float, float]]] = {i: [] for i in impls}
    for r in range(args.repeats):
        for i in impls[r % len(impls):] + impls[:r % len(impls)]:
            times[i].append(timed(cols[i][0], cuda))
    return [{"impl": i, "k": k, "device": str(device), "threads": args.threads, "interleaved": True,
             **time_fields(times[i]), **cols[i][2]} for i in impls]


# ----------------------------------------------------------------------------------------------
# The parent: run every configuration, print the tables, append to RESULTS.md
# ----------------------------------------------------------------------------------------------
def run_child(impl: str, k: int, args: argparse.Namespace) -> list[dict]:
    """Run ``--one IMPL K`` (IMPL may be a comma-separated list: interleaved) in a fresh process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", impl, str(k), "--pool-dir", args.pool_dir,
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device]
    if args.fusionbench_path:
        cmd += ["--fusionbench-path", args.fusionbench_path]
    if not args.tensor_bytes:
        cmd.append("--no-tensor-bytes")
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        err = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return [{"impl": i, "k": k, "error": err} for i in impl.split(",")]
    return [json.loads(ln) for ln in lines]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16], help="numbers of experts")
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=["floor", "adamerge", "fusionbench"])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="bfloat16 adds the adamerge-bf16 column (τ stored in bf16) next to fp32")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda also adds adamerge-hosttv)")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per configuration (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each child")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--base", default="minilm", help="minilm (all-MiniLM-L6-v2), random-minilm, tiny, or a path")
    ap.add_argument("--pool-dir", help="where the base and experts are written (reused if already there); "
                                       "default: a temporary directory")
    ap.add_argument("--fusionbench-path", default=os.environ.get("FUSIONBENCH_PATH"),
                    help="directory holding fusion_bench (pip install --target); default $FUSIONBENCH_PATH")
    ap.add_argument("--no-tensor-bytes", dest="tensor_bytes", action="store_false",
                    help="skip the extra untimed step that counts live tensor bytes")
    ap.add_argument("--interleave", action="store_true",
                    help="time all columns of a K in one process, step by step in turn (times only; for "
                         "a machine whose load drifts)")
    ap.add_argument("--lora", type=int, default=0, metavar="R",
                    help="experts are rank-R LoRA adapters on every encoder linear layer (random factors): "
                         "compare adamerge-factorized (task_vectors.lora=factorized) with adamerge (dense)")
    ap.add_argument("--write", type=Path, help="append the results to this markdown file under '## Speed'")
    ap.add_argument("--one", nargs=2, metavar=("IMPL", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.one:
        impl, k = args.one[0], int(args.one[1])
        for r in run_interleaved(impl.split(","), k, args) if "," in impl else [run_one(impl, k, args)]:
            print(json.dumps(r), flush=True)
        return 0

    impls = list(dict.fromkeys(args.impls + (["adamerge-bf16"] if args.dtype == "bfloat16" else [])
                               + (["adamerge-hosttv"] if args.device.startswith("cuda") else [])))
    tmp = None
    if args.pool_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="adamerge-bench-")
        args.pool_dir = tmp.name
    try:
        t0 = time.perf_counter()
        if args.lora and "fusionbench" in impls:
            raise SystemExit("--lora: FusionBench's wrapper reads full state dicts; leave fusionbench out of --impls")
        build_pool(Path(args.pool_dir), args.base, max(args.ks), lora_rank=args.lora)
        print(f"pool ({args.base}, {max(args.ks)} experts) ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        results = []
        for k in args.ks:
            # one process per column (memory too), columns alternating so drift hits each alike;
            # --interleave: one process per K whose columns alternate step by step (times only)
            for impl in [",".join(impls)] if args.interleave else impls:
                for r in run_child(impl, k, args):
                    print(json.dumps(r), file=sys.stderr, flush=True)
                    results.append(r)
    finally:
        if tmp is not None:
            tmp.cleanup()

    load = os.getloadavg()
    header = (f"### {datetime.date.today().isoformat()} · commit {git_commit()} · {args.device}, "
              f"{args.threads} threads, base {args.base}{f', LoRA r={args.lora} experts' if args.lora else ''}, batch {args.batch}×{args.seq}, median of {args.repeats} "
              f"after {args.warmup} warm-up{' · interleaved (times only)' if args.interleave else ''} · load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
              f"on {os.cpu_count()} CPUs")
    cuda = args.device.startswith("cuda")
    bandwidth = None if cuda else stream_bandwidth(args.threads)
    block = header + "\n\n" + tables(results, impls, cuda, bandwidth)
    print(block)
    if args.write:
        append_results(args.write, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
