"""export/model's files, tensor by tensor: its config, and its weights written one merged tensor at a time into the
shards (``safetensors_writer.StreamedCheckpoint``), for a merge held in memory (``write_merged_model``) and a streamed
one (adamerge/streaming.py) alike: the merged model is never whole in memory.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .core.merged_model import tied_sources
from .errors import ExportError
from .pool.validation import all_finite
from .safetensors_writer import StreamedCheckpoint


def save_model_config(model, model_dir: Path, dtype: str | None) -> None:
    """export/model's config (and generation config) as ``save_pretrained`` writes them, in ``dtype``."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if dtype:
        config.dtype = getattr(torch, dtype)
    config.save_pretrained(model_dir)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(model_dir)


def write_merged_model(pool, merged, model_dir: Path, dtype: str | None, max_shard_size: str | None) -> None:
    """export/model from a merge held in memory, tensor by tensor (``write_weights``): the merged model is never whole
    in memory. Names as ``save_pretrained`` writes the family's exported module (tied weights once, under their first
    name); the tensors no expert changes are the base's."""
    model = pool.family.exported_module(pool.base_model)
    tied = tied_sources(pool.base_model)
    tensors, seen = {}, set()
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:  # a tied weight once: from_pretrained ties it back
            seen.add(id(t))
            tensors[key] = t
    # each key's name in the pool, as a streamed merge's plan names the keys of the base's files
    plan = {k: (pool.canonical_name(k) or tied.get(k), tuple(t.shape), export_dtype(t.dtype, dtype))
            for k, t in tensors.items()}
    save_model_config(model, model_dir, dtype)
    was = merged.training
    merged.eval()  # a Concrete mask's expected value, not a sample
    try:
        write_weights(model_dir, plan, merged.merged_tensors(), lambda key, name: tensors[key].detach(), max_shard_size)
    finally:
        merged.train(was)
    pool.family.save_extra_files(pool.base_model, model_dir)


@torch.no_grad()
def write_weights(model_dir: Path, plan: dict[str, tuple[str | None, tuple[int, ...], torch.dtype]],
                  merged: Iterable[tuple[str, torch.Tensor]], base_value: Callable[[str, str | None], torch.Tensor],
                  max_shard_size: str | None) -> list[str]:
    """export/model's weight files, tensor by tensor, in a merge held in memory or streamed (adamerge/streaming.py).
    ``plan``: each key of the files -> (the pool's name of its value, or None; shape; dtype). Each ``(name, value)``
    of ``merged`` (one at a time; its NaN/Inf refused) is written under every key of that name, cast, by a second
    thread one tensor behind; every key left gets ``base_value(key, name)``. Returns the merged names in order. On a
    failure the files are closed incomplete (they go with the export's temporary directory)."""
    writer = StreamedCheckpoint(model_dir, {k: (shape, dt) for k, (_, shape, dt) in plan.items()},
                                max_shard_size or "5GB")
    keys_of: dict[str | None, list[str]] = {}
    for key, (name, _, _) in plan.items():
        keys_of.setdefault(name, []).append(key)
    names, writing = [], None
    try:
        with ThreadPoolExecutor(1) as disk:
            def write(key: str, value: torch.Tensor) -> None:
                nonlocal writing
                if writing is not None:
                    writing.result()
                writing = disk.submit(writer.write, key, value.to(plan[key][2]))

            for name, value in merged:
                check_finite(name, value)
                for key in keys_of.pop(name, []):
                    write(key, value)
                names.append(name)
            for name, keys in keys_of.items():  # what no expert changes, what is not merged, buffers: the base's
                for key in keys:
                    write(key, base_value(key, name))
            if writing is not None:
                writing.result()
    except BaseException:
        writer.close(complete=False)
        raise
    writer.close()
    return names


def check_finite(name: str, t: torch.Tensor) -> None:
    """Refuse to export a merged tensor with NaN/Inf values (nothing is written)."""
    if t.is_floating_point() and not all_finite(t):
        raise ExportError(f"refusing to export: merged tensor '{name}' has NaN/Inf values")


def export_dtype(dt: torch.dtype, dtype: str | None) -> torch.dtype:
    """What a tensor of ``dt`` is exported as: ``export.dtype`` for floating point (None: as it is)."""
    return getattr(torch, dtype) if dtype and dt.is_floating_point else dt


def in_dtype(t: torch.Tensor, dtype: str | None) -> torch.Tensor:
    """``t`` in ``export.dtype`` (floating-point tensors only; None: as it is)."""
    return t.to(export_dtype(t.dtype, dtype))
