"""Regenerate tests/fixtures/mergekit_merges.safetensors: mergekit's own task arithmetic, linear, TIES and Breadcrumbs on the seeded tiny pool of
tests/peer_pool.py (``make_seeded_llama_pool``), which tests/test_streaming.py holds adamerge's per-tensor TIES and Breadcrumbs to.

mergekit is not a dependency: install it beside, e.g. ``pip install --no-deps --target /tmp/peers mergekit==0.1.5
immutables accelerate``, then ``python bench/peer_fixtures.py --peers /tmp/peers``. Kept tensors: FIXTURE_TENSORS.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT

sys.path.insert(0, str(ROOT / "tests"))
FIXTURE = ROOT / "tests" / "fixtures" / "mergekit_merges.safetensors"
FIXTURE_TENSORS = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                   "model.layers.1.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight")
# fixture key prefix -> (mergekit's merge_method, its global normalize, each model's parameters); adamerge's side of
# each case is in tests/test_streaming.py
CASES = {"sum": ("ties", False, {"weight": 0.3, "density": 0.5}),
         "mean": ("ties", True, {"weight": 1.0, "density": 0.5}),
         "breadcrumbs": ("breadcrumbs", False, {"weight": 0.3, "density": 0.9, "gamma": 0.01}),
         "breadcrumbs_ties": ("breadcrumbs_ties", False, {"weight": 0.3, "density": 0.9, "gamma": 0.01}),
         "task_arithmetic": ("task_arithmetic", False, {"weight": 0.3}),
         "linear": ("linear", True, {"weight": 1.0})}


def main() -> None:
    import yaml
    from peer_pool import make_seeded_llama_pool
    from safetensors.torch import load_file, save_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=Path, default=Path("/tmp/peers"))
    args = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        pool = make_seeded_llama_pool(Path(tmp))
        for case, (method, normalize, params) in CASES.items():
            config = {"merge_method": method, "base_model": pool["base"], "dtype": "float32",
                      "parameters": {"normalize": normalize},
                      "models": [{"model": t["expert"], "parameters": params} for t in pool["tasks"].values()]}
            if method == "linear":  # the experts' weighted mean: the base takes no part
                del config["base_model"]
            yml, merged = Path(tmp) / f"{case}.yml", Path(tmp) / f"merged_{case}"
            yml.write_text(yaml.safe_dump(config))
            subprocess.run([sys.executable, str(args.peers / "bin" / "mergekit-yaml"), str(yml), str(merged),
                            "--allow-crimes"], env=dict(os.environ, PYTHONPATH=str(args.peers)), check=True)
            tensors = load_file(str(merged / "model.safetensors"))
            out.update({f"{case}/{n}": tensors[n].contiguous() for n in FIXTURE_TENSORS})
    FIXTURE.parent.mkdir(exist_ok=True)
    save_file(out, str(FIXTURE), metadata={"mergekit": "0.1.5"})
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
