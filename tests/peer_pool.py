"""The seeded tiny pool a peer's output is pinned on, and the merges compared there (tests/fixtures/, written by
bench/crosscheck.py; held to by tests/test_streaming.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from helpers import make_texts, save_tokenizer, write_jsonl


def model_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``save_pretrained`` directory (one file or shards)."""
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({n: h.get_tensor(n) for n in h.keys()})
    return out


def make_seeded_llama_pool(tmp: Path, k: int = 3) -> dict:
    """A tiny untied Llama base and ``k`` experts whose every value comes from one seeded generator, not from
    transformers' initialisation, so that a peer's output on it (tests/fixtures/) stays valid across versions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0)
    g = torch.Generator().manual_seed(1234)
    model = LlamaForCausalLM(cfg)
    base = {n: torch.randn(v.shape, generator=g) * 0.1 for n, v in model.state_dict().items()}
    tasks = {}
    for i in range(-1, k):
        sd = base if i < 0 else {n: v + 0.02 * torch.randn(v.shape, generator=g) for n, v in base.items()}
        model.load_state_dict(sd)
        model.save_pretrained(tmp / ("base" if i < 0 else f"e{i}"))
        if i >= 0:
            cal = write_jsonl(tmp / f"c{i}.jsonl", make_texts(8, seed=i))
            tasks[f"lm{i}"] = {"expert": str(tmp / f"e{i}"), "calibration": cal}
    save_tokenizer(tmp / "base")
    return {"base": str(tmp / "base"), "model_class": "causal_lm", "head_prefixes": [], "tasks": tasks}


OTA_THRESHOLDS = {"lm0": 1e-8, "lm1": 2e-8, "lm2": 5e-9}  # per expert, about half of its saliencies v·τ² pass


def write_optimizer_states(pool: dict, out: Path) -> dict:
    """``pool`` with a seeded, positive Adam ``exp_avg_sq`` safetensors file per task (``optimizer_state``), named as
    the model's parameters, as the authors of OTA merging release them."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(99)
    base = model_tensors(Path(pool["base"]))
    tasks = {}
    for task, spec in pool["tasks"].items():
        path = out / f"{task}_exp_avg_sq.safetensors"
        save_file({n: 1e-4 * torch.rand(v.shape, generator=g) for n, v in base.items()}, str(path))
        tasks[task] = dict(spec, optimizer_state=str(path))
    return dict(pool, tasks=tasks)


@dataclass(frozen=True)
class PeerCase:
    """One merge both a peer and adamerge implement: the peer's call on the seeded pool and adamerge's overrides."""
    # "mergekit" (mergekit-yaml), "mergekit-della" (its della_magprune), "fusionbench" (its function), "mergellm" (the
    # authors' MergeLLM code)
    peer: str
    method: str  # the peer's merge_method or function
    adamerge: tuple[str, ...]  # train.py overrides
    params: dict = field(default_factory=dict)  # the peer's global parameters
    model_params: dict = field(default_factory=dict)  # mergekit: each model's parameters
    experts: int | None = None  # the first n experts only (None: all)
    exact: bool = False  # equal to the last bit; else to float rounding (the peer sums or divides in another order)
    rtol: float = 1e-6  # the rounding allowed when not exact, relative to each tensor's largest entry
    task: str | None = None  # a method with one model per task: compare that task's (export/tasks/<task>)
    optimizer_states: bool = False  # each task gets a seeded Adam exp_avg_sq file (write_optimizer_states)

    @property
    def streams(self) -> bool:
        """Merged tensor by tensor (a model per task, and a merge with statistics, are merged in memory)."""
        return self.task is None and not self.optimizer_states


PEER_CASES = {  # fixture key prefix -> the case (tests/fixtures/*_merges.safetensors, written by bench/crosscheck.py)
    "sum": PeerCase("mergekit", "ties", ("method=ties_merging", "method.ties.scope=tensor", "method.ties.density=0.5"),
                    {"normalize": False}, {"weight": 0.3, "density": 0.5}, exact=True),
    "mean": PeerCase("mergekit", "ties", ("method=ties_merging", "method.ties.scope=tensor", "method.ties.density=0.5",
                                          "method.ties.merge=mean", "method.scale=1.0"),
                     {"normalize": True}, {"weight": 1.0, "density": 0.5}),
    "breadcrumbs": PeerCase("mergekit", "breadcrumbs", ("method=breadcrumbs",), {},
                            {"weight": 0.3, "density": 0.9, "gamma": 0.01}, exact=True),
    "breadcrumbs_ties": PeerCase("mergekit", "breadcrumbs_ties", ("method=breadcrumbs_ties",), {},
                                 {"weight": 0.3, "density": 0.9, "gamma": 0.01}, exact=True),
    "task_arithmetic": PeerCase("mergekit", "task_arithmetic", ("method=task_arithmetic",), {}, {"weight": 0.3},
                                exact=True),
    # mergekit averages the models, adamerge adds the mean τ: rounding apart
    "linear": PeerCase("mergekit", "linear", ("method=weight_average",), {"normalize": True}, {"weight": 1.0}),
    "sce": PeerCase("mergekit", "sce", ("method=sce",), {"select_topk": 0.1}, exact=True),
    "model_stock": PeerCase("mergekit", "model_stock", ("method=model_stock",)),
    "model_stock_filter_wise": PeerCase("mergekit", "model_stock", ("method=model_stock",
                                                                    "method.model_stock.filter_wise=true"),
                                        {"filter_wise": True}),
    # t = the second's weight over the weights' sum: 0.5
    "nuslerp": PeerCase("mergekit", "nuslerp", ("method=nuslerp",), {}, {"weight": 1.0}, experts=2, exact=True),
    # between the two experts: mergekit's base_model is the first
    "slerp": PeerCase("mergekit", "slerp", ("method=slerp", "method.slerp.t=0.3"), {"t": 0.3}, experts=2),
    "multislerp": PeerCase("mergekit", "multislerp", ("method=multislerp",), {}, {"weight": 1.0}, exact=True),
    "karcher": PeerCase("mergekit", "karcher", ("method=karcher",)),  # of the experts' weights: no base model
    # mergekit's own pruning, drawn from one seeded generator over the tensors in adamerge's order, then its
    # della_linear arithmetic: one draw apart would differ by a whole entry, not by rounding
    "della_linear": PeerCase("mergekit-della", "della_magprune", ("method=della_linear", "method.della.seed=7"),
                             {"density": 0.5, "epsilon": 0.15, "weight": 0.3, "seed": 7}),
    "magmax": PeerCase("fusionbench", "magmax_merge", ("method=magmax",), {"scaling_factor": 0.5}, exact=True),
    # SVDs: bit-equal with one thread, LAPACK's rounding moves with the thread count (1e-7 with two)
    "iso_c": PeerCase("fusionbench", "iso_c", ("method=iso_c",), {"scaling_factor": 1.0}, rtol=1e-5),
    "opcm": PeerCase("fusionbench", "OPCM", ("method=opcm", "method.opcm.shuffle=false"),
                     {"alpha": 0.5, "shuffle_order": False}, rtol=1e-5),  # the peer's full SVD, ours reduced
    "wudi_merging": PeerCase("fusionbench", "wudi_merging", ("method=wudi_merging",),
                             {"scaling_factor": 1.0, "iter_num": 400}),  # the gradient in another order
    "emr_merging": PeerCase("fusionbench", "emr_merge", ("method=emr_merging",), task="lm1", exact=True),
    # bit-equal with one thread; norms and cosines round differently with two (7e-9 relative)
    "widen": PeerCase("mergellm", "widen_merging", ("method=widen",),
                      {"above_average_value_ratio": 1.0, "score_calibration_value": 1.0}),
    # the authors' per-model absolute thresholds on v·τ²: an entry every expert masks keeps the base
    "ota_merging": PeerCase("ota", "ota", ("method=ota_merging", "method.density=null", "method.threshold={"
                                           + ",".join(f"{t}:{v}" for t, v in OTA_THRESHOLDS.items()) + "}"),
                            {"epsilon": 1e-26, "precond_power": 0.5}, optimizer_states=True),
    "iso_cts": PeerCase("fusionbench", "iso_cts", ("method=iso_cts",),
                        {"scaling_factor": 1.0, "common_space_fraction": 0.8}, rtol=1e-5),
}
