"""Regenerate tests/fixtures/{mergekit,fusionbench}_merges.safetensors: the peers' own merges (mergekit's task arithmetic,
linear, TIES, Breadcrumbs, SCE, Model Stock, SLERP, NuSLERP, Multi-SLERP, Karcher, DELLA; FusionBench's MagMax, Iso-C,
Iso-CTS) on the seeded tiny pool of
tests/peer_pool.py (``make_seeded_llama_pool``), which tests/test_streaming.py holds adamerge's namesakes to.

mergekit is not a dependency: install it beside, e.g. ``pip install --no-deps --target /tmp/peers mergekit==0.1.5
immutables accelerate``, then ``python bench/peer_fixtures.py --peers /tmp/peers``; FusionBench likewise (``pip install
--no-deps --target /tmp/fb fusion-bench==0.2.33`` and what it imports), passed as ``--fusionbench /tmp/fb ...``.
Kept tensors: FIXTURE_TENSORS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT

sys.path.insert(0, str(ROOT / "tests"))
FIXTURE = ROOT / "tests" / "fixtures" / "mergekit_merges.safetensors"
FUSIONBENCH_FIXTURE = ROOT / "tests" / "fixtures" / "fusionbench_merges.safetensors"
FIXTURE_TENSORS = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                   "model.layers.1.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight")
# fixture key prefix -> (mergekit's merge_method, its global parameters, each model's parameters, how many experts);
# adamerge's side of each case is in tests/test_streaming.py
CASES = {"sum": ("ties", {"normalize": False}, {"weight": 0.3, "density": 0.5}, None),
         "mean": ("ties", {"normalize": True}, {"weight": 1.0, "density": 0.5}, None),
         "breadcrumbs": ("breadcrumbs", {}, {"weight": 0.3, "density": 0.9, "gamma": 0.01}, None),
         "breadcrumbs_ties": ("breadcrumbs_ties", {}, {"weight": 0.3, "density": 0.9, "gamma": 0.01}, None),
         "task_arithmetic": ("task_arithmetic", {}, {"weight": 0.3}, None),
         "linear": ("linear", {"normalize": True}, {"weight": 1.0}, None),
         "sce": ("sce", {"select_topk": 0.1}, {}, None),
         "model_stock": ("model_stock", {}, {}, None),
         "model_stock_filter_wise": ("model_stock", {"filter_wise": True}, {}, None),
         "nuslerp": ("nuslerp", {}, {"weight": 1.0}, 2),  # t = the second's weight / the sum: 0.5
         "slerp": ("slerp", {"t": 0.3}, {}, 2),  # between the two experts: the first is mergekit's base_model
         "multislerp": ("multislerp", {}, {"weight": 1.0}, None),
         "karcher": ("karcher", {}, {}, None)}  # of the experts' weights: no base model
NO_BASE = {"linear", "karcher"}  # methods whose merge the base takes no part in
DELLA = {"density": 0.5, "epsilon": 0.15, "weight": 0.3, "seed": 7}  # della_linear, drawn in adamerge's tensor order


def mergekit_cases(pool: dict, tmp: Path, peers: Path) -> dict:
    """Each of CASES through ``mergekit-yaml``: FIXTURE_TENSORS of its output, keyed ``case/tensor``."""
    import yaml
    from safetensors.torch import load_file

    out = {}
    for case, (method, params, model_params, count) in CASES.items():
        experts = list(pool["tasks"].values())[:count]
        config = {"merge_method": method, "base_model": pool["base"], "dtype": "float32", "parameters": params,
                  "models": [{"model": t["expert"], "parameters": model_params} for t in experts]}
        if method in NO_BASE:
            del config["base_model"]
        if method == "slerp":
            config["base_model"] = experts[0]["expert"]
        yml, merged = tmp / f"{case}.yml", tmp / f"merged_{case}"
        yml.write_text(yaml.safe_dump(config))
        subprocess.run([sys.executable, str(peers / "bin" / "mergekit-yaml"), str(yml), str(merged),
                        "--allow-crimes"], env=dict(os.environ, PYTHONPATH=str(peers)), check=True)
        tensors = load_file(str(merged / "model.safetensors"))
        out.update({f"{case}/{n}": tensors[n].contiguous() for n in FIXTURE_TENSORS})
    return out


DELLA_SCRIPT = """
import json, sys, torch
from safetensors.torch import load_file, save_file
from mergekit.sparsify import RescaleNorm, della_magprune
pool, cfg, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
base = load_file(pool["base"] + "/model.safetensors")
experts = [load_file(t["expert"] + "/model.safetensors") for t in pool["tasks"].values()]
torch.manual_seed(cfg["seed"])  # the global generator: della_magprune draws from it
merged = {}
for name in cfg["order"]:  # adamerge's tensor order, so that the draws meet the same entries
    deltas = [della_magprune(e[name] - base[name], cfg["density"], cfg["epsilon"], RescaleNorm.l1) for e in experts]
    merged[name] = base[name] + cfg["weight"] * sum(deltas)
save_file({n: merged[n].contiguous() for n in cfg["keep"]}, out)
"""


def della_case(pool: dict, tmp: Path, peers: Path) -> dict:
    """mergekit's own ``della_magprune`` (its ``della_linear`` arithmetic: base + weight · Σ pruned deltas), drawn
    from one seeded generator over the tensors in adamerge's order (the base model's parameters)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    order = [n for n, _ in AutoModelForCausalLM.from_pretrained(pool["base"]).named_parameters()]
    cfg = dict(DELLA, order=order, keep=list(FIXTURE_TENSORS))
    subprocess.run([sys.executable, "-c", DELLA_SCRIPT, json.dumps(pool), json.dumps(cfg), str(tmp / "della.st")],
                   env=dict(os.environ, PYTHONPATH=str(peers)), check=True)
    return {f"della_linear/{n}": t for n, t in load_file(str(tmp / "della.st")).items()}


def fusionbench_cases(pool: dict, fusionbench: list[Path]) -> dict:
    """FusionBench's own ``magmax_merge`` (λ 0.5), ``iso_c`` and ``iso_cts`` (fraction 0.8, α 1) on the pool's models:
    FIXTURE_TENSORS, keyed ``case/tensor``."""
    sys.path[:0] = [str(p) for p in fusionbench]
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
    from fusion_bench.method.magmax.magmax import magmax_merge
    from transformers import AutoModelForCausalLM

    load = AutoModelForCausalLM.from_pretrained
    merged = magmax_merge(load(pool["base"]), [load(t["expert"]) for t in pool["tasks"].values()], 0.5)
    out = {f"magmax/{n}": merged.state_dict()[n].contiguous() for n in FIXTURE_TENSORS}
    base = load(pool["base"]).state_dict()
    taus = [{n: v - base[n] for n, v in load(t["expert"]).state_dict().items()} for t in pool["tasks"].values()]
    for case, update in (("iso_c", iso_c(taus, accelerator="cpu")),
                         ("iso_cts", iso_cts(taus, common_space_fraction=0.8, accelerator="cpu"))):
        out.update({f"{case}/{n}": (base[n] + 1.0 * update[n]).contiguous() for n in FIXTURE_TENSORS})
    return out


def main() -> None:
    from peer_pool import make_seeded_llama_pool
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=Path, default=Path("/tmp/peers"), help="where mergekit 0.1.5 is installed")
    ap.add_argument("--fusionbench", type=Path, nargs="*", default=[],
                    help="paths that import fusion_bench 0.2.33 (and what it imports); none: its fixture is kept")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pool = make_seeded_llama_pool(Path(tmp))
        out = mergekit_cases(pool, Path(tmp), args.peers) | della_case(pool, Path(tmp), args.peers)
        FIXTURE.parent.mkdir(exist_ok=True)
        save_file(out, str(FIXTURE), metadata={"mergekit": "0.1.5"})
        print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
        if args.fusionbench:
            save_file(fusionbench_cases(pool, args.fusionbench), str(FUSIONBENCH_FIXTURE),
                      metadata={"fusion_bench": "0.2.33"})
            print(f"wrote {FUSIONBENCH_FIXTURE} ({FUSIONBENCH_FIXTURE.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
