"""A learned method's states as plain tensors: the start kept beside training, any checkpoint's put back for
a moment, and the merged weights each one gives (gathered from every process when task vectors are sharded).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)


def snapshot(method: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of what trains (the method's state dict: coefficients, masks)."""
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


@contextlib.contextmanager
def in_state(method: torch.nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """``method`` holds ``state`` inside the block; its own state is put back afterwards."""
    current = snapshot(method)
    method.load_state_dict(state)
    try:
        yield
    finally:
        method.load_state_dict(current)


def merged_now(method: Any) -> dict[str, torch.Tensor]:
    """The merged weights the method would export in its current state (eval mode: a Concrete mask's final
    sample); its training mode is left as it was."""
    was = method.training
    with torch.no_grad():
        merged = {n: v.detach() for n, v in method.eval().merged_params().items()}
    method.train(was)
    return merged


def merged_at(method: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The merged weights the method would export in ``state``; the method's own state is left as it was."""
    with in_state(method, state):
        return merged_now(method)


def gather_merges(method: Any, states: list[dict[str, torch.Tensor]]) -> None:
    """Sharded task vectors (adamerge/core/sharded.py), on every process after training: the merges at ``states``
    (start, end, best) gathered to the first process tensor by tensor, the only merges asked for once the other
    processes have left (``MergedModel.keep_merges``)."""
    keys, coefs = [], []
    with torch.no_grad():
        for state in states:
            with in_state(method, state):
                keys.append(method.merged.state_key())
                coefs.append([c.detach() for c in method.merged.coefficients()])
    method.merged.keep_merges(keys, coefs)
