"""The row-sparse merge of an input embedding table: a training step merges (and takes the coefficient
gradient on) only the rows its batches look up, which is exact for a lookup and spares a [V, d] merge and
gradient per step (for a 128 k-token vocabulary, gigabytes)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def lookup_table(base: nn.Module, names: list[str]) -> str | None:
    """Name of the base's input embedding weight if it is merged and used only as a lookup table."""
    try:
        emb = base.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(emb, nn.Embedding):
        return None
    owners = [n for n, p in base.named_parameters(remove_duplicate=False) if p is emb.weight]
    # tied to an output layer (lm_head = embed_tokens): every row is used, every step
    return owners[0] if len(owners) == 1 and owners[0] in names else None


def looked_up_rows(inputs: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor | None:
    """The token ids these batches look up (None when a batch has no token ids: every row is in play)."""
    if not inputs or any("input_ids" not in x for x in inputs):
        return None
    return torch.unique(torch.cat([x["input_ids"].flatten() for x in inputs])).to(device)


@contextlib.contextmanager
def sparse_grad(base: nn.Module | None) -> Iterator[None]:
    """While active, ``base``'s input embedding gives a sparse ∂L/∂W (its looked-up rows), not a dense
    [V, d] tensor of zeros. ``None``: a no-op (the table was merged whole)."""
    emb = base.get_input_embeddings() if base is not None else None
    if emb is None:
        yield
        return
    was, emb.sparse = emb.sparse, True
    try:
        yield
    finally:
        emb.sparse = was
