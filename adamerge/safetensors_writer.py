"""A ``save_pretrained``-style safetensors checkpoint written tensor by tensor, in any order.

The safetensors package writes a whole state dict at once; a streamed merge (adamerge/streaming.py) must
never hold the merged model. The layout is planned first from names, shapes and dtypes (shards by
huggingface_hub's ``split_torch_state_dict_into_shards``, as ``save_pretrained`` splits them), each file's
header written with every tensor's offset, and each tensor then written at its offset as it is merged.
The files are the safetensors format (an 8-byte header length, the JSON header, the data), read back by
``safe_open`` and ``from_pretrained`` (tests/test_streaming.py).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .errors import ExportError
from .pool.expert_files import SAFETENSORS_DTYPES

DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


class StreamedCheckpoint:
    """``model.safetensors`` (or shards and ``model.safetensors.index.json``) in ``directory`` for the tensors of
    ``plan`` (name -> (shape, dtype)); ``write`` each exactly once, then ``close``."""

    def __init__(self, directory: str | Path, plan: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 max_shard_size: str | int = "5GB"):
        from huggingface_hub import split_torch_state_dict_into_shards

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.plan = plan
        meta = {n: torch.empty(shape, dtype=dt, device="meta") for n, (shape, dt) in plan.items()}
        split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
        self.files, self.where = [], {}
        for filename, names in split.filename_to_tensors.items():
            header, offset = {}, 0
            for n in names:
                shape, dt = plan[n]
                size = meta[n].numel() * meta[n].element_size()
                header[n] = {"dtype": DTYPE_CODES[dt], "shape": list(shape), "data_offsets": [offset, offset + size]}
                self.where[n] = (len(self.files), offset)
                offset += size
            header["__metadata__"] = {"format": "pt"}
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
            f = open(directory / filename, "wb")  # noqa: SIM115 -- open until close(): tensors arrive one by one
            f.write(struct.pack("<Q", len(blob)) + blob)
            f.truncate(8 + len(blob) + offset)
            self.files.append((f, 8 + len(blob)))
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(m.numel() * m.element_size() for m in meta.values())},
                     "weight_map": split.tensor_to_filename}
            (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        self.left = set(plan)

    def write(self, name: str, t: torch.Tensor) -> None:
        """Write tensor ``name`` (its planned shape and dtype) at its place."""
        shape, dt = self.plan[name]
        if name not in self.left or tuple(t.shape) != tuple(shape) or t.dtype != dt:
            raise ExportError(f"export: tensor '{name}' {tuple(t.shape)} {t.dtype} written twice or not as planned "
                              f"({tuple(shape)} {dt})")
        i, offset = self.where[name]
        f, start = self.files[i]
        f.seek(start + offset)
        f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.left.discard(name)

    def close(self, complete: bool = True) -> None:
        """Close every file; with ``complete``, an ExportError when a planned tensor was never written (a merge
        that failed half-way closes with ``complete=False``: its files are removed with their directory)."""
        for f, _ in self.files:
            f.close()
        if complete and self.left:
            raise ExportError(f"export: {len(self.left)} planned tensor(s) never written, e.g. '{sorted(self.left)[0]}'")
