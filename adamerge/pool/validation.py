"""Checks of one expert against the base at pool load: tensor names aligned to the base's, shapes, dtypes
(another floating-point dtype is read across and noted in ``pool.cast_dtypes``), finite values, LoRA targets, and
whether it is a fine-tune of this base at all. ``pool`` is the ModelPool being built (adamerge/pool/model_pool.py,
which imports this module). Each problem is a PoolError naming the expert and the tensor.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from ..errors import PoolError
from .expert_files import Expert, strip_prefixes

log = logging.getLogger(__name__)

# Fine-tuning moves a weight matrix a little: cos(expert, base) stays near 1 (MiniLM's experts here: above
# 0.99). A model trained from another initialisation, or re-parametrised so that it cannot be merged
# (MergeLock: random invertible maps on the attention's QK and VO branches, function unchanged), has
# cos near 0 on those matrices. Below this, an expert is not a fine-tune of this base.
FINE_TUNE_MIN_COSINE = 0.1
COSINE_ENTRIES = 1 << 18  # entries of a matrix its cosine to the base is taken over (evenly strided)


def validate_expert(pool: Any, e: Expert, check_finite: bool) -> None:
    """Map ``e``'s tensor names to the base's and check them (shape, dtype, finite); PoolError otherwise."""
    if e.is_lora:
        return _validate_lora(pool, e, check_finite)
    names = e.source.keys()
    for fname in names:
        canon = pool.canonical_name(fname)
        if canon is None:
            if _is_buffer_name(pool, fname) or fname.startswith(pool.ignored_prefixes):
                continue  # buffers such as position_ids are not merged
            raise PoolError(
                f"expert '{e.name}' ({e.path}): extra tensor '{fname}' that the base model does not have "
                "(different architecture?)"
            )
        e.file_names[canon] = fname
    missing = [n for n in pool.shared_names() if n not in e.file_names and n not in pool.optional_names]
    if missing:
        raise PoolError(
            f"expert '{e.name}' ({e.path}): missing tensor '{missing[0]}'"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    for canon, fname in e.file_names.items():
        if pool.deferred_values is not None:  # values checked when first read (ModelPool._read)
            _check_layout(pool, e, canon, *e.source.info(fname), compare_shape=not pool.is_head(canon))
            pool.deferred_values.add((e.name, canon))
            continue
        t = e.source.get(fname)
        _check_tensor(pool, e, canon, t, check_finite, compare_shape=not pool.is_head(canon))


def _validate_lora(pool: Any, e: Expert, check_finite: bool) -> None:
    for fname in e.source.keys():
        inner = strip_prefixes(fname, ("base_model.model.",))
        # Linear / Conv1D: lora_A.weight, lora_B.weight; Embedding: lora_embedding_A, lora_embedding_B
        m = (re.fullmatch(r"(.*)\.lora_([AB])(?:\.[^.]+)?\.weight", inner)
             or re.fullmatch(r"(.*)\.lora_embedding_([AB])(?:\.[^.]+)?", inner))
        if m:
            canon = pool.canonical_name(m.group(1) + ".weight")
            if canon is None:
                raise PoolError(
                    f"expert '{e.name}' ({e.path}): LoRA target '{m.group(1)}' does not exist in the base "
                    "model — the adapter was made for another base model"
                )
            e.file_names.setdefault(canon, m.group(1))
            continue
        if ".lora_" in inner or "lora_magnitude" in inner:
            raise PoolError(f"expert '{e.name}' ({e.path}): unsupported adapter tensor '{fname}'")
        inner = inner.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
        canon = pool.canonical_name(inner)
        if canon is None:
            raise PoolError(
                f"expert '{e.name}' ({e.path}): adapter tensor '{fname}' has no counterpart in the base "
                "model — the adapter was made for another base model"
            )
        e.file_names[canon] = fname  # a full tensor (modules_to_save)
    for canon in list(e.file_names):
        t = pool.expert_tensor(e.name, canon)
        _check_tensor(pool, e, canon, t.to(pool._params[canon].dtype) if pool.is_lora_module(e, canon) else t,
                           check_finite, compare_shape=not pool.is_head(canon))


def _check_tensor(pool: Any, e: Expert, canon: str, t: torch.Tensor, check_finite: bool,
                  compare_shape: bool = True) -> None:
    _check_layout(pool, e, canon, tuple(t.shape), t.dtype, compare_shape)
    check_values(pool, e, canon, t, check_finite, compare_shape)


def _check_layout(pool: Any, e: Expert, canon: str, shape: tuple[int, ...], dtype: torch.dtype,
                  compare_shape: bool = True) -> None:
    ref = pool._params[canon]
    where = f"expert '{e.name}' ({e.path}), tensor '{canon}'"
    if compare_shape and tuple(shape) != tuple(ref.shape):
        extra = ""
        if "embed" in canon and len(shape) == 2 and shape[1] == ref.shape[1]:
            extra = f" — vocabulary size differs: expert {shape[0]} vs base {ref.shape[0]}"
        raise PoolError(f"{where}: shape {tuple(shape)} does not match the base's {tuple(ref.shape)}{extra}")
    if dtype != ref.dtype:
        if not (dtype.is_floating_point and ref.is_floating_point()):
            raise PoolError(f"{where}: dtype {dtype} does not match the base's {ref.dtype}")
        pool.cast_dtypes.setdefault(e.name, {})[str(dtype).removeprefix("torch.")] = \
            str(ref.dtype).removeprefix("torch.")


def check_values(pool: Any, e: Expert, canon: str, t: torch.Tensor, check_finite: bool,
                 compare_shape: bool = True) -> None:
    """Finite values, and (weight matrices) the cosine to the base that ``check_fine_tuned`` judges."""
    where = f"expert '{e.name}' ({e.path}), tensor '{canon}'"
    if check_finite and t.is_floating_point() and not all_finite(t):
        raise PoolError(f"{where}: contains NaN or Inf values")
    if compare_shape and t.dim() == 2 and t.is_floating_point():
        # a gross check (fine-tunes stay near 1, foreign weights near 0): over at most COSINE_ENTRIES evenly
        # strided entries, from the base's files when the pool holds it on meta
        step = max(1, t.numel() // COSINE_ENTRIES)
        base = pool.base_tensor(canon).flatten()[::step].float()
        base_norm = torch.linalg.vector_norm(base)
        if base_norm > 0:
            flat = t.flatten()[::step].float()
            cos = torch.dot(flat, base) / (torch.linalg.vector_norm(flat) * base_norm).clamp(min=1e-8)
            pool._cosines.setdefault(e.name, []).append((float(cos), canon))


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in floating-point ``t``: its min and max in one pass (NaN propagates), no boolean copy."""
    return t.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(t.detach()))).all())


def _is_buffer_name(pool: Any, fname: str) -> bool:
    buffers = {n for n, _ in pool.base_model.named_buffers()}
    return any(c in buffers for c in (fname, pool._prefix + fname, strip_prefixes(fname, (pool._prefix,))))


def check_fine_tuned(pool: Any, e: Expert, warn_only: bool = False) -> None:
    """A PoolError (a warning with ``warn_only``) when some weight matrix of ``e`` points elsewhere than the
    base's (cos < FINE_TUNE_MIN_COSINE): not a fine-tune of this base, so a merge with it is broken."""
    worst = sorted(c for c in pool._cosines.get(e.name, []) if c[0] < FINE_TUNE_MIN_COSINE)
    if not worst:
        return
    names = ", ".join(f"'{n}' (cos {c:.2f})" for c, n in worst[:3])
    msg = (f"expert '{e.name}' ({e.path}) is not a fine-tune of the base {pool.base_path}: {len(worst)} weight "
           f"matrices point elsewhere than the base's (cosine < {FINE_TUNE_MIN_COSINE}; fine-tuning keeps it near "
           f"1), e.g. {names} — trained from another initialisation, or re-parametrised (e.g. MergeLock); pool "
           "key check_fine_tuned: warn merges it anyway")
    if not warn_only:
        raise PoolError(msg)
    log.warning("%s", msg)
