"""``Stage``: one data-free rule applied to stacked task vectors ``[K, ...]``, tensor by tensor.

The transforms (adamerge/core/transforms.py: DARE, TIES, …) and the per-tensor merge rules (tensor_rules.py,
spherical.py, isotropic.py, continual.py, task_masks.py, knots.py beside it) are stages: the same object runs
on task vectors held in memory and on tensors streamed from the experts' files (adamerge/streaming.py).
"""

from __future__ import annotations

import torch

from .topk import Stream


class Stage:
    """One transform: ``fit`` (model-wide statistics, over fresh passes of ``stream``), then ``stage(name, stack)``,
    which changes ``stack`` in place and returns it (the caller owns it: a streamed buffer, or a copy)."""

    needs_pool = False  # True: ``bind(pool)`` is called by ``build_stages`` (the base's tensors, module types, tasks)
    # True: the stage reads the experts' rows one at a time (``t[k]``) and returns the merge as a one-row stack when
    # ``t`` is ``ExpertRows`` (adamerge/core/tensor_stream.py): a streamed merge then never holds a K-row stack
    reads_rows = False

    def bind(self, pool) -> None:
        """Keep what this stage reads from the pool (only called when ``needs_pool``)."""
        self.pool = pool

    def open_state(self, export_dir) -> None:
        """A streamed merge is about to call this stage on its last pass, writing the export in ``export_dir``."""

    def write_state(self, export_dir) -> None:
        """Add what this stage keeps (e.g. what a later run continues from) to the export in ``export_dir``."""

    def report(self) -> dict:
        """What this stage adds to the export's coefficients.json (e.g. what a later run continues from)."""
        return {}

    def fit(self, stream: Stream, K: int) -> None:
        """Take the statistics this stage needs from the stacks it will be applied to."""

    def begin(self) -> None:
        """Called before each pass over the tensors (in their fixed order)."""

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def one_update(t: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``t`` with ``update`` in row 0 and zeros elsewhere: Σ_k λ τ̃_k = λ · update."""
    t[0].copy_(update)
    t[1:].zero_()
    return t
