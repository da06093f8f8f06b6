"""The task vectors of a pool as a stream of stacks, one tensor at a time, and task vectors kept on disk.

``tensor_stacks`` reads ``(name, τ stack [K, ...])`` in the pool's order with a second thread reading ahead
and two reused buffers; the streamed merge (adamerge/streaming.py) and ``task_vectors_on_disk`` consume it.
``expert_rows`` gives each tensor's experts one at a time instead, for stages that read them so (OPCM).
``task_vectors.device=disk`` writes the stacks (after the method's data-free transforms) once into safetensors
files beside the run and maps them back: a learned method's stacked τ then costs page cache, which the kernel
can reclaim, not anonymous memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .task_vectors import TaskVectors, check_something_to_merge, read_stack
from .topk import Stream
from .transforms import Stage, fit_stages, streamed

log = logging.getLogger(__name__)


class Buffers:
    """Two flat buffers: the reader fills one while the merge reads the other, so a pass does not allocate (and
    page-fault) a fresh stack per tensor. A buffer far larger than the stack it is asked for is released, so
    the largest stack (the embedding) is not held twice through the whole pass."""

    def __init__(self) -> None:
        self.flat = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]

    def alloc(self, i: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        held = self.flat[i].numel()
        if held < nbytes or held > 4 * nbytes + (64 << 20):  # grown, or released after a far larger tensor
            self.flat[i] = torch.empty(0, dtype=torch.uint8)  # (the old one freed before the new one exists)
            self.flat[i] = torch.empty(nbytes, dtype=torch.uint8)
        return self.flat[i][:nbytes].view(dtype).view(shape)


def tensor_stacks(pool, names: list[str], dtype: torch.dtype, keep_unchanged: bool) -> Stream:
    """The stream of (name, τ stack [K, ...]) in the pool's order, tensors no expert changes left out (as
    ``TaskVectors.from_pool``); the next tensor is read by a second thread while this one is merged. A stack
    is valid until the next one is asked for (its buffer is then refilled)."""
    buffers = Buffers()

    def read(i: int):
        return read_stack(pool, names[i], dtype, keep_unchanged, alloc=lambda shape, dt: buffers.alloc(i % 2, shape, dt))

    def stream():
        with ThreadPoolExecutor(1) as reader:
            ahead = reader.submit(read, 0) if names else None
            for i, n in enumerate(names):
                stack = ahead.result()
                if i + 1 < len(names):
                    ahead = reader.submit(read, i + 1)
                if stack is not None:
                    yield n, stack

    return judged_after_first_pass(pool, stream)


def judged_after_first_pass(pool, stream: Stream) -> Stream:
    """``stream``, which judges the experts (``check_fine_tuned_experts``) once its first pass has read every value,
    for a pool that defers its value checks to the first read."""
    judged = False

    def run():
        nonlocal judged
        yield from stream()
        if pool.deferred_values is not None and not judged:
            judged = True
            pool.check_fine_tuned_experts()

    return run


class ExpertRows:
    """Tensor ``name``'s task vectors, each read from its expert's files when indexed (``rows[k]``, then released by
    the caller): a stage with ``reads_rows`` holds one expert's tensor at a time, whatever K."""

    def __init__(self, pool, name: str, dtype: torch.dtype):
        self.pool, self.name, self.dtype = pool, name, dtype
        self.shape = (len(pool.task_names), *pool._params[name].shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.pool.task_vector(self.pool.task_names[k], self.name).to(self.dtype)


def expert_rows(pool, names: list[str], dtype: torch.dtype, keep_unchanged: bool) -> Stream:
    """The stream of (name, ``ExpertRows``) in the pool's order, tensors no expert changes left out, as
    ``tensor_stacks``: which those are is read once, one expert at a time, in the first pass."""
    changed: list[str] | None = None

    def stream():
        nonlocal changed
        first, found = changed is None, []
        for n in names if first else changed:
            rows = ExpertRows(pool, n, dtype)
            if not first or keep_unchanged or any(bool(rows[k].any()) for k in range(len(rows))):
                found.append(n)
                yield n, rows
        if first:  # a whole pass: the later ones skip the check
            changed = found

    return judged_after_first_pass(pool, stream)


def logged_passes(stream: Stream, total: int, what: str) -> Stream:
    """``stream`` with a progress line every few seconds and one per finished pass (terminal and train.log)."""
    passes = [0]

    def run():
        passes[0] += 1
        start = last = time.monotonic()
        count = 0
        for item in stream():
            count += 1
            if time.monotonic() - last > 10:
                last = time.monotonic()
                log.info("stream pass %d (%s): %d/%d tensors, %.0f s", passes[0], what, count, total, last - start)
            yield item
        log.info("stream pass %d (%s) done: %d tensors merged-in, %.1f s", passes[0], what, count,
                 time.monotonic() - start)

    return run


def task_vectors_on_disk(pool, names: list[str], dtype: torch.dtype, keep_unchanged: bool, stages: list[Stage],
                         directory: str | Path, key: dict) -> TaskVectors:
    """The task vectors of ``names`` after ``stages``, memory-mapped from ``directory/<digest of key>/``, written
    there first (one file per tensor, atomically) unless a run with the same ``key`` — the pool's fingerprint,
    the selection, the dtype, the transforms — already did."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..atomic import atomic_directory

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    where = Path(directory) / digest
    if not (where / "index.json").is_file():
        source = logged_passes(tensor_stacks(pool, names, dtype, keep_unchanged), len(names), "task vectors to disk")
        fit_stages(source, stages, len(pool.task_names))

        def write(tmp: Path) -> None:
            index = {}
            for i, (name, stack) in enumerate(streamed(source, stages)()):
                index[name] = f"{i:05d}.safetensors"
                save_file({name: stack.contiguous()}, str(tmp / index[name]))
            (tmp / "index.json").write_text(json.dumps({"key": key, "files": index}, indent=1, default=str))

        atomic_directory(where, True, write)
        log.info("task vectors written to %s", where)
    files = json.loads((where / "index.json").read_text())["files"]
    check_something_to_merge(bool(files))
    tensors = {}
    for name, file in files.items():
        with safe_open(str(where / file), "pt") as h:
            tensors[name] = h.get_tensor(name)  # backed by the file's pages (mmap), not copied
    return TaskVectors(tensors, pool.task_names)
