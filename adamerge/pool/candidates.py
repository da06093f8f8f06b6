"""CandidatePool: many checkpoints read lazily, one tensor at a time, against a ModelPool's base.

Methods that search over a pool of candidate models (FW-Merging) must not hold the candidates in
memory: a candidate here is only an open tensor source, and ``tensor(i, name)`` reads one tensor from
disk. Loading and validation are the pool's own (``load_expert`` + ``ModelPool`` checks), so a
candidate may be an HF model directory, a ``.safetensors`` file or a PEFT LoRA adapter; one that does
not fit the base (architecture, shapes, dtypes, non-finite values) is reported and skipped.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from . import hub
from .expert_files import load_expert
from .model_pool import ModelPool, PoolError
from .validation import validate_expert

log = logging.getLogger("adamerge")


def _name(path: Path, taken: set[str]) -> str:
    base = path.stem if path.is_file() else path.name
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def candidate_paths(candidates: list | dict | None = None, candidates_dir: str | Path | None = None) -> dict[str, Path]:
    """Named candidate paths from an explicit list (or ``{name: path}``) and/or a directory.

    A listed candidate may be a hub reference ``hf://<org>/<name>[@<revision>]`` (adamerge/pool/hub.py, as in pool
    configs; named after the repo). In a directory, every sub-directory and every ``.safetensors`` file is a
    candidate (sorted by name); other files are ignored.
    """
    listed = ({f"method.candidates.{k}": (str(k), v) for k, v in candidates.items()} if isinstance(candidates, dict)
              else {f"method.candidates[{i}]": (None, v) for i, v in enumerate(candidates or [])})
    refs = hub.resolve({key: v for key, (_, v) in listed.items()})
    out: dict[str, Path] = {}
    for key, (name, v) in listed.items():
        path = Path(refs[key].path) if key in refs else Path(v)
        out[name or _name(Path(refs[key].repo_id) if key in refs else path, set(out))] = path
    if candidates_dir:
        d = Path(candidates_dir)
        if not d.is_dir():
            raise PoolError(f"candidates_dir {d}: not a directory")
        for p in sorted(d.iterdir()):
            if p.is_dir() or p.suffix == ".safetensors":
                out[_name(p, set(out))] = p
    return out


class CandidatePool:
    """Candidate models as lazy tensor sources, validated against ``pool``'s base.

    ``names[i]`` is candidate ``i``; ``skipped`` maps each rejected candidate to the reason.
    """

    def __init__(self, pool: ModelPool, paths: dict[str, str | Path] | None = None, check_finite: bool = True):
        self.skipped: dict[str, str] = {}
        if paths is None:  # the pool's own experts, already validated
            self._view = pool
            self.names = list(pool.task_names)
            return
        # A shallow copy of the pool whose experts are the candidates: the pool's lazy readers
        # (LoRA deltas, name alignment) and its validation apply unchanged, base and buffers shared.
        self._view = copy.copy(pool)
        self._view.experts = {}
        for name, p in paths.items():
            try:
                e = load_expert(name, p)
                self._view.experts[name] = e
                validate_expert(self._view, e, check_finite)
            except PoolError as err:
                self._view.experts.pop(name, None)
                self.skipped[name] = str(err)
                log.warning("candidate '%s' skipped: %s", name, err)
        self.names = list(self._view.experts)
        if not self.names:
            raise PoolError(f"no usable candidate among {len(paths)}: " + "; ".join(self.skipped.values()))

    def __len__(self) -> int:
        return len(self.names)

    def tensor(self, i: int, name: str) -> torch.Tensor:
        """Candidate ``i``'s full value of one tensor, read from disk now."""
        return self._view.expert_tensor(self.names[i], name)

    def paths(self) -> list[str]:
        return [str(self._view.experts[n].path) for n in self.names]
