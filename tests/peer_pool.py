"""The seeded tiny pool a peer's output is pinned on (tests/fixtures/, written by bench/peer_fixtures.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers import make_texts, save_tokenizer, write_jsonl


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
