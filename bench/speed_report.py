"""bench/speed.py's report: the per-K tables (seconds per step, memory, slopes per added expert), the host's
stream bandwidth they are read against, and the block appended to bench/RESULTS.md.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import torch

from speed_setups import MIB

ROOT = Path(__file__).resolve().parents[1]


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x (None with fewer than two distinct x)."""
    if len({x for x, _ in points}) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def fmt(v: float | None, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def stream_bandwidth(threads: int, mib: int = 512) -> float:
    """GB/s of the merge's access pattern — an fp32 [8, n] matrix-vector product over ``mib`` MiB — best of 5."""
    torch.set_num_threads(threads)
    t = torch.randn(8, mib * MIB // 32)
    c, out = torch.rand(8), torch.empty(t.shape[1])
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mv(t.t(), c, out=out)
        best = min(best, time.perf_counter() - t0)
    return t.numel() * 4 / best / 1e9


def tables(results: list[dict], impls: list[str], cuda: bool, bandwidth: float | None = None) -> str:
    """Markdown: time and memory per (K, column), ratios, per-expert memory increments, goal checks;
    with ``bandwidth`` (GB/s) also the floor + streaming time that no implementation of the step beats."""
    by = {(r["impl"], r["k"]): r for r in results}
    ks = sorted({r["k"] for r in results})

    def get(impl: str, k: int, key: str) -> float | None:
        return by.get((impl, k), {}).get(key)

    def ratio(a: str, b: str, k: int, key: str = "step_s") -> float | None:
        x, y = get(a, k, key), get(b, k, key)
        return x / y if x and y else None

    mem_key = "cuda_peak_mib" if cuda else "rss_peak_mib"
    mem_impls = [i for i in impls if any(get(i, k, mem_key) for k in ks)]  # none in interleaved runs
    head = ["K"] + [f"{i} s/step" for i in impls] + [f"{i} peak {'CUDA' if cuda else 'RSS'} MiB" for i in mem_impls]
    ratio_cols = [(i, "fusionbench") for i in impls if i.startswith("adamerge") and "fusionbench" in impls]
    ratio_cols += [(i, "floor") for i in impls if i != "floor" and "floor" in impls]
    head += [f"{a} / {b}" for a, b in ratio_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in ks:
        row = [str(k)] + [f"{fmt(get(i, k, 'step_s'))} ({fmt(get(i, k, 'cpu_s'))})" for i in impls]
        row += [fmt(get(i, k, mem_key), ".0f") for i in mem_impls]
        row += [f"{fmt(ratio(a, b, k), '.2f')} ({fmt(ratio(a, b, k, 'cpu_s'), '.2f')})" for a, b in ratio_cols]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Times: median wall seconds per step (median CPU seconds of the process, all its threads); "
              "ratios: of wall medians (of CPU medians)."]

    keys = (["cuda_peak_mib"] if cuda else []) + ["rss_peak_mib", "rss_setup_mib", "rss_step_mib", "tensor_peak_mib"]
    labels = (["CUDA peak"] if cuda else []) + ["RSS peak", "RSS setup", "RSS step", "tensor peak"]
    per_expert: dict[tuple[str, str], float | None] = {}
    if any(r.get("rss_peak_mib") for r in results):  # interleaved runs measure times only
        lines += ["", "Memory added per expert (least-squares slope over K), and as a multiple of the task vector's "
                  "own bytes in its storage dtype (goal 2: ≤ 1.05×):", "",
                  "| column | τ per expert MiB | " + " | ".join(f"{lab} MiB/expert | ×τ" for lab in labels) + " |",
                  "|" + "---|" * (2 + 2 * len(keys))]
        for i in impls:
            tv = [get(i, k, "tv_mib") / k for k in ks if get(i, k, "tv_mib")]
            if i == "floor" or not tv:
                continue
            row = [i, fmt(tv[0], ".1f")]
            for key in keys:
                sl = slope([(k, get(i, k, key)) for k in ks if get(i, k, key) is not None])
                per_expert[i, key] = sl / tv[0] if sl is not None else None
                row += [fmt(sl, ".1f"), fmt(per_expert[i, key], ".2f")]
            lines.append("| " + " | ".join(row) + " |")

    if bandwidth and any(get("adamerge", k, "tv_streamed_mib") for k in ks) and "floor" in impls:
        lines += ["", f"Lower bound of a step: the floor plus reading τ twice (merge, then ⟨∂L/∂W, τ⟩) at the "
                  f"{bandwidth:.1f} GB/s one matrix-vector product streams here; the looked-up embedding rows "
                  "are not counted:", "",
                  "| K | τ streamed per pass MiB | 2 passes s | bound / floor | adamerge / floor |", "|---|---|---|---|---|"]
        for k in ks:
            mib, fl = get("adamerge", k, "tv_streamed_mib"), get("floor", k, "step_s")
            if mib and fl:
                two = 2 * mib * MIB / (bandwidth * 1e9)
                lines.append(f"| {k} | {mib:.0f} | {two:.3f} | {(fl + two) / fl:.2f} | {fmt(ratio('adamerge', 'floor', k), '.2f')} |")
    goals = []
    for k in [k for k in (8, 16) if k in ks and "fusionbench" in impls]:
        fb, fl = ratio("adamerge", "fusionbench", k), ratio("adamerge", "floor", k)
        goals.append(f"- goal 1, K={k}: adamerge / FusionBench = {fmt(fb, '.2f')} (target ≤ 0.60), "
                     f"adamerge / floor = {fmt(fl, '.2f')} (target ≤ 1.15)")
    if "adamerge-factorized" in impls:  # issue #19's goals for LoRA experts kept factorized
        for i in ("adamerge-factorized", "adamerge-adapters", "adamerge"):
            if (i, "rss_peak_mib") in per_expert:
                goals.append(f"- LoRA, {i}: peak RSS grows {fmt(per_expert[i, 'rss_peak_mib'], '.2f')}× its task "
                             "vectors' bytes per expert (factorized: the adapter's; target ≤ 1.2)")
        k = max(ks)
        goals.append(f"- LoRA, K={k}: adamerge-factorized / floor = {fmt(ratio('adamerge-factorized', 'floor', k), '.2f')} "
                     f"(target ≤ 1.3), adamerge-adapters / floor = "
                     f"{fmt(ratio('adamerge-adapters', 'floor', k), '.2f')}, adamerge (dense) / floor = "
                     f"{fmt(ratio('adamerge', 'floor', k), '.2f')}")
    for i in [i for i in impls if i.startswith("adamerge")]:
        key = "cuda_peak_mib" if cuda else "tensor_peak_mib"
        if (i, key) in per_expert:
            goals.append(f"- goal 2, {i}: {'CUDA' if cuda else 'tensor'} peak grows {fmt(per_expert[i, key], '.2f')}× "
                         "the task vector's bytes per expert (target ≤ 1.05)")
    if goals:
        lines += ["", *goals]
    errors = [f"- {r['impl']} K={r['k']}: {r['error']}" for r in results if "error" in r]
    if errors:
        lines += ["", "Failed configurations:", *errors]
    return "\n".join(lines)


def append_results(path: Path, block: str, heading: str = "## Speed") -> None:
    """Append ``block`` at the end of the ``heading`` section (created if missing); other sections kept."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.rstrip("\n").split("\n")
    try:
        start = lines.index(heading)
    except ValueError:
        path.write_text("\n".join(lines) + f"\n\n{heading}\n\n{block.strip()}\n")
        return
    end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1  # insert right after the section's last non-blank line
    new = lines[:end] + ["", block.strip(), ""] + lines[end:]
    path.write_text("\n".join(new).rstrip("\n") + "\n")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("BENCH_COMMIT", "unknown")  # a copy of the tree without .git
