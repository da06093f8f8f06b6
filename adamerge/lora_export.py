"""LoRA in, LoRA out: a merge of LoRA experts with task- or layer-wise coefficients written as one PEFT adapter.

Each merged weight is W0 + Σ_k c_k s_k B_k A_k, which is one LoRA of rank ΣR: A = [A_1; …; A_K] (rows stacked)
and B = [c_1 s_1 B_1, …, c_K s_K B_K] (columns side by side), with ``lora_alpha = r`` so that PEFT's scaling is 1.
Weights whose stacked rank is below the adapter's ``r`` are padded with zero rows and columns, which add
nothing. ``PeftModel.from_pretrained(base, "export/lora")`` then computes the dense export's backbone
(tests/test_lora_export.py checks it tensor by tensor after ``merge_and_unload``). Heads stay per task
(``heads/``), as in every export.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def why_not_lora(method) -> str | None:
    """None when ``method``'s merge is exactly base + Σ_k c_k τ_k over LoRA factors, else the reason it is not."""
    mm = getattr(method, "merged", None)
    if mm is None or mm.task_vectors is None or mm.coefficients is None:
        return "the merge has no task-vector coefficients (a closed-form or data-free transform)"
    if mm.mask is not None or mm.offset:
        return "the merge has a mask or a starting offset beside its LoRA factors"
    if not mm.names or mm.factored_names != mm.names:
        return "some merged weights are dense (a transform such as TIES, or a method that needs τ whole)"
    if mm.coefficients.granularity not in ("task", "layer"):
        return f"{mm.coefficients.granularity}-wise coefficients are not one scalar per weight and expert"
    for e in method.pool.experts.values():
        if not e.is_lora:
            return f"expert '{e.name}' is not a LoRA adapter"
        if e.lora.get("fan_in_fan_out") or any(".lora_embedding_" in k for k in e.source.keys()):
            return f"expert '{e.name}' has Conv1D or embedding LoRA modules"
    return None


@torch.no_grad()
def write_lora_adapter(method, out_dir: Path, base_name: str) -> int:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``out_dir``; returns the rank."""
    mm, pool = method.merged, method.pool
    coefficients = [c.detach().float().cpu() for c in mm.coefficients()]
    stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, coefs in zip(mm.names, coefficients):
        a_parts, b_parts = [], []
        for k, task in enumerate(pool.task_names):
            factors = pool.lora_factors(task, name)
            if factors is not None:
                a, b, scale = factors
                a_parts.append(a)
                b_parts.append(b * (float(coefs[k]) * scale))
        module = next(pool.experts[t].file_names[name] for t in pool.task_names if name in pool.experts[t].file_names)
        stacked[module] = (torch.cat(a_parts), torch.cat(b_parts, dim=1))
    rank = max(a.shape[0] for a, _ in stacked.values())
    tensors = {}
    for module, (a, b) in stacked.items():
        pad = rank - a.shape[0]
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1).contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_name, "r": rank,
              "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": sorted(stacked), "use_rslora": False, "inference_mode": True}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return rank
