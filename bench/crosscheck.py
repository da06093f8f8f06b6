"""Every merge adamerge and a peer both implement, run by both on the same seeded pool: the largest relative
difference per method, as a markdown table (bench/RESULTS.md), and with ``--write-fixtures`` the peers' outputs
that tests/test_streaming.py pins adamerge to (tests/fixtures/{mergekit,fusionbench}_merges.safetensors), so that CI
needs neither package.

The cases (the peer's call and adamerge's overrides) are ``PEER_CASES`` in tests/peer_pool.py, on its seeded tiny
Llama pool. The peers are not dependencies and this script installs nothing: install them beside, e.g.
``pip install --no-deps --target /tmp/peers mergekit==0.1.5 immutables accelerate`` and
``pip install --no-deps --target /tmp/fb fusion-bench==0.2.33`` (plus what its modules import). Methods whose
reference is their authors' code run it from a copy of that repository: WIDEN from yule-BUAA/MergeLLM (its
``model_merging_methods/`` and ``utils/utils.py`` in ``--mergellm DIR``), OTA merging from pmahdavi/ota-merge (its
``mergekit/`` package, a fork of mergekit, in ``--ota DIR``, beside ``immutables``). Then

    python bench/crosscheck.py --peers /tmp/peers --fusionbench /tmp/fb /tmp/fbdeps --mergellm /tmp/mergellm \
        --ota /tmp/otaroot [--write-fixtures]
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
from peer_pool import model_tensors  # noqa: E402  (tests/ on the path first)

FIXTURES = {peer: ROOT / "tests" / "fixtures" / f"{peer}_merges.safetensors" for peer in ("mergekit", "fusionbench",
                                                                                          "mergellm", "ota")}
FIXTURE_TENSORS = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                   "model.layers.1.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight")
NO_BASE = {"linear", "karcher"}  # mergekit methods whose merge the base takes no part in
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
    merged[name] = (base[name] + cfg["weight"] * sum(deltas)).contiguous()
save_file(merged, out)
"""


def subset(pool: dict, n: int | None) -> dict:
    return dict(pool, tasks=dict(list(pool["tasks"].items())[:n]))


def mergekit(case, pool: dict, tmp: Path, peers: Path) -> dict:
    """The case through ``mergekit-yaml``: every tensor of its output."""
    import yaml

    experts = list(pool["tasks"].values())
    config = {"merge_method": case.method, "base_model": pool["base"], "dtype": "float32", "parameters": case.params,
              "models": [{"model": t["expert"], "parameters": case.model_params} for t in experts]}
    if case.method in NO_BASE:
        del config["base_model"]
    if case.method == "slerp":
        config["base_model"] = experts[0]["expert"]
    yml, merged = tmp / "mergekit.yml", tmp / "mergekit_out"
    yml.write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, str(peers / "bin" / "mergekit-yaml"), str(yml), str(merged), "--allow-crimes"],
                   env=dict(os.environ, PYTHONPATH=str(peers)), check=True, capture_output=True)
    return model_tensors(merged)


def mergekit_della(case, pool: dict, tmp: Path, peers: Path) -> dict:
    """mergekit's own ``della_magprune`` with its ``della_linear`` arithmetic (base + weight · Σ pruned deltas), drawn
    from one seeded generator over the tensors in adamerge's order (the base model's parameters)."""
    from transformers import AutoModelForCausalLM

    order = [n for n, _ in AutoModelForCausalLM.from_pretrained(pool["base"]).named_parameters()]
    subprocess.run([sys.executable, "-c", DELLA_SCRIPT, json.dumps(pool), json.dumps(dict(case.params, order=order)),
                    str(tmp / "della.safetensors")], env=dict(os.environ, PYTHONPATH=str(peers)), check=True)
    return model_tensors(tmp)


def fusionbench_opcm():
    """FusionBench's general ``OPCM`` class, its package's ``__init__`` (the CLIP variant, which does not import with
    transformers 5) skipped."""
    import types

    import fusion_bench.method

    package = types.ModuleType("fusion_bench.method.opcm")
    package.__path__ = [str(Path(fusion_bench.method.__file__).parent / "opcm")]
    sys.modules["fusion_bench.method.opcm"] = package
    from fusion_bench.method.opcm.opcm_general import OPCM

    return OPCM


def fusionbench(case, pool: dict) -> dict:
    """FusionBench's own function or algorithm (``magmax_merge``, ``iso_c``, ``iso_cts``, ``wudi_merging``, ``OPCM``) on the
    pool's models: base + α · update."""
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
    from fusion_bench.method.magmax.magmax import magmax_merge
    from transformers import AutoModelForCausalLM

    load = AutoModelForCausalLM.from_pretrained
    experts = [load(t["expert"]) for t in pool["tasks"].values()]
    if case.method == "OPCM":
        from fusion_bench.modelpool import BaseModelPool

        models = {"_pretrained_": load(pool["base"]), **dict(zip(pool["tasks"], experts))}
        algorithm = fusionbench_opcm()(**case.params, seed=None, save_on_every_step=False, evaluate_on_every_step=False)
        return dict(algorithm.run(BaseModelPool(models)).state_dict())
    if case.method == "emr_merge":  # the task's own model: base + its rescaler · its mask ⊙ the unified vector
        from fusion_bench.method.emr_merging.utils import emr_merge

        base = load(pool["base"]).state_dict()
        unified, masks, rescalers = emr_merge([{n: v - base[n] for n, v in e.state_dict().items()} for e in experts])
        k = list(pool["tasks"]).index(case.task)
        return {n: base[n] + rescalers[k] * masks[n][k] * unified[n] for n in base}
    if case.method == "magmax_merge":
        return dict(magmax_merge(load(pool["base"]), experts, case.params["scaling_factor"]).state_dict())
    from fusion_bench.method.wudi.wudi import wudi_merging

    base = load(pool["base"]).state_dict()
    taus = [{n: v - base[n] for n, v in e.state_dict().items()} for e in experts]
    extra = {k: v for k, v in case.params.items() if k != "scaling_factor"}
    update = {"iso_c": iso_c, "iso_cts": iso_cts, "wudi_merging": wudi_merging}[case.method](
        taus, accelerator="cpu", **extra)
    return {n: base[n] + case.params["scaling_factor"] * update[n] for n in base}


def mergellm(case, pool: dict) -> dict:
    """The authors' own ``MergingMethod(...).<method>`` from MergeLLM (its directory on ``sys.path``) on the pool's
    models: the merged parameters it returns."""
    from model_merging_methods.merging_methods import MergingMethod
    from transformers import AutoModelForCausalLM

    load = AutoModelForCausalLM.from_pretrained
    experts = [load(t["expert"]) for t in pool["tasks"].values()]
    merging = MergingMethod(case.method)
    return getattr(merging, case.method)(merged_model=load(pool["base"]), models_to_merge=experts,
                                         exclude_param_names_regex=[], **case.params)


OTA_SCRIPT = """
import json, sys, types
import mergekit
from safetensors.torch import load_file, save_file
package = types.ModuleType("mergekit.merge_methods")  # its registry does not import with today's pydantic
package.__path__ = [mergekit.__path__[0] + "/merge_methods"]
sys.modules["mergekit.merge_methods"] = package
from mergekit.architecture import WeightInfo
from mergekit.common import ImmutableMap, ModelReference
from mergekit.merge_methods.ota import OTAMergeTask
pool, params, thresholds, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
base = load_file(pool["base"] + "/model.safetensors")
refs = {t: ModelReference.parse(spec["expert"]) for t, spec in pool["tasks"].items()}
experts = {t: load_file(spec["expert"] + "/model.safetensors") for t, spec in pool["tasks"].items()}
base_ref = ModelReference.parse(pool["base"])
merged = {}
for name in base:
    per_model = ImmutableMap({refs[t]: ImmutableMap({"preconditioner_path": spec["optimizer_state"],
                                                     "precond_threshold": thresholds[t]})
                              for t, spec in pool["tasks"].items()})
    task = OTAMergeTask.model_construct(gather_tensors=None, tensor_parameters=per_model, normalise_mode="none",
                                        weight_info=WeightInfo(name=name), base_model_ref=base_ref,
                                        fallback_to_base=True, rescale=False, precond_threshold=None,
                                        masked_task_vector_merge_method="precond", **params)
    task.model_post_init(None)
    merged[name] = task.execute({base_ref: base[name], **{refs[t]: experts[t][name] for t in experts}}).contiguous()
save_file(merged, out)
"""


def ota(case, pool: dict, tmp: Path, ota_dir: Path) -> dict:
    """The authors' ``OTAMergeTask`` (pmahdavi/ota-merge, a mergekit fork), tensor by tensor, with each task's
    ``optimizer_state`` and the per-model thresholds of ``OTA_THRESHOLDS``."""
    from peer_pool import OTA_THRESHOLDS

    subprocess.run([sys.executable, "-c", OTA_SCRIPT, json.dumps(pool), json.dumps(case.params),
                    json.dumps(OTA_THRESHOLDS), str(tmp / "ota.safetensors")],
                   env=dict(os.environ, PYTHONPATH=str(ota_dir)), check=True, capture_output=True)
    return model_tensors(tmp)


def knots_alignment_row() -> str:
    """KnOTS: FusionBench ships only its ``subspace_alignment`` (no merge); adamerge's against it on a seeded stack of
    three rank-6 updates (U and every S·V_k)."""
    import importlib.util

    import fusion_bench
    import torch

    from adamerge.core.knots import subspace_alignment

    path = Path(fusion_bench.__file__).parent / "method" / "knots" / "knots_utils.py"
    spec = importlib.util.spec_from_file_location("knots_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    g = torch.Generator().manual_seed(0)
    stack = torch.stack([torch.randn(48, 6, generator=g) @ torch.randn(6, 32, generator=g) for _ in range(3)])
    u_peer, s_peer, vs_peer = module.subspace_alignment(list(stack), svd_dtype=torch.float64, eps=1e-5)
    u, coordinates = subspace_alignment(stack)
    peer = [u_peer] + [torch.diag(s_peer) @ v for v in vs_peer]
    ours = [u, *coordinates]
    rel = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, peer))
    equal = all(torch.equal(a, b) for a, b in zip(ours, peer))
    return f"| knots (alignment) | fusionbench | `subspace_alignment` | 4 | {rel:.1e} | {'yes' if equal else 'no'} |"


def adamerge(case, pool: dict, tmp: Path) -> dict:
    """The case through train.py (streamed where it can), every tensor of its export's model (or task's model)."""
    import helpers

    code = helpers.run_inprocess([f"out_dir={tmp}/adamerge", *case.adamerge, "evaluate.enabled=false",
                                  f"task_vectors.stream={'true' if case.streams else 'auto'}"], pool)
    assert code == 0, f"train.py exited with {code}"
    export = tmp / "adamerge" / "export"
    return model_tensors(export / "tasks" / case.task if case.task else export / "model")


def main() -> None:
    import torch
    from peer_pool import PEER_CASES, make_seeded_llama_pool, write_optimizer_states
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=Path, default=Path("/tmp/peers"), help="where mergekit 0.1.5 is installed")
    ap.add_argument("--fusionbench", type=Path, nargs="*", default=[],
                    help="paths that import fusion_bench 0.2.33 (and what it imports); none: its cases are skipped")
    ap.add_argument("--mergellm", type=Path, default=None,
                    help="a copy of yule-BUAA/MergeLLM (the authors' WIDEN); none: its cases are skipped")
    ap.add_argument("--ota", type=Path, default=None,
                    help="where pmahdavi/ota-merge's mergekit package is (the authors' OTA); none: its cases are skipped")
    ap.add_argument("--write-fixtures", action="store_true", help="also write the peers' outputs to tests/fixtures/")
    args = ap.parse_args()
    sys.path[:0] = [str(p) for p in args.fusionbench] + ([str(args.mergellm)] if args.mergellm else [])
    fixtures: dict[str, dict] = {peer: {} for peer in FIXTURES}
    rows = ["| case | peer | peer's method | tensors | largest relative difference | bit-equal |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        seeded = make_seeded_llama_pool(Path(tmp) / "pool")
        for name, case in PEER_CASES.items():
            if (case.peer == "fusionbench" and not args.fusionbench) or (case.peer == "mergellm" and not args.mergellm) \
                    or (case.peer == "ota" and not args.ota):
                continue
            pool, work = subset(seeded, case.experts), Path(tmp) / name
            work.mkdir()
            if case.optimizer_states:
                pool = write_optimizer_states(pool, Path(tmp) / "states")
            peer = (fusionbench(case, pool) if case.peer == "fusionbench" else mergellm(case, pool) if case.peer == "mergellm" else
                    ota(case, pool, work, args.ota) if case.peer == "ota" else
                    mergekit_della(case, pool, work, args.peers) if case.peer == "mergekit-della" else
                    mergekit(case, pool, work, args.peers))
            ours = adamerge(case, pool, work)
            rel = max(float((ours[n] - p).abs().max() / p.abs().max().clamp(min=1e-12)) for n, p in peer.items())
            equal = all(torch.equal(ours[n], p) for n, p in peer.items())
            rows.append(f"| {name} | {case.peer.split('-')[0]} | `{case.method}` | {len(peer)} | {rel:.1e} | "
                        f"{'yes' if equal else 'no'} |")
            print(rows[-1], flush=True)
            fixtures[case.peer.split("-")[0]].update({f"{name}/{n}": peer[n].contiguous() for n in FIXTURE_TENSORS})
    if args.fusionbench:
        rows.append(knots_alignment_row())
        print(rows[-1], flush=True)
    print("\n".join(rows))
    if args.write_fixtures:
        versions = {"mergekit": {"mergekit": "0.1.5"}, "fusionbench": {"fusion_bench": "0.2.33"},
                    "mergellm": {"yule-BUAA/MergeLLM": "9178ef9384"}, "ota": {"pmahdavi/ota-merge": "eee703f5fd"}}
        for peer, tensors in fixtures.items():
            if tensors:
                save_file(tensors, str(FIXTURES[peer]), metadata=versions[peer])
                print(f"wrote {FIXTURES[peer]} ({FIXTURES[peer].stat().st_size} bytes)")


if __name__ == "__main__":
    main()
