"""Model files read lazily, tensor by tensor: a Hugging Face ``save_pretrained`` directory (safetensors
or .bin, sharded with an index), a single ``.safetensors`` state dict, or a PEFT LoRA adapter directory.
ModelPool (adamerge/pool/model_pool.py) aligns and validates what these return against the base.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import PoolError

# the adapter_config.json keys that decide a LoRA delta's scale (part of the pool fingerprint)
LORA_SCALING_KEYS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out")

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


# ----------------------------------------------------------------------------------------------
# Tensor sources: lazy, by name
# ----------------------------------------------------------------------------------------------
class TensorSource:
    """Read-only, lazy mapping from tensor name to tensor (one checkpoint on disk)."""

    path: Path

    def keys(self) -> list[str]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of tensor ``name``, without reading its values where the format allows."""
        t = self.get(name)
        return tuple(t.shape), t.dtype


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PoolError(f"{path}: unreadable or truncated safetensors file ({e})") from e


class SafetensorsSource(TensorSource):
    """One or several ``.safetensors`` files (a sharded checkpoint has an index naming them)."""

    def __init__(self, files: list[Path]):
        self.path = files[0].parent if len(files) > 1 else files[0]
        self._where: dict[str, Path] = {}
        for f in files:
            with _open_safetensors(f) as h:
                for k in h.keys():
                    self._where[k] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        f = self._where[name]
        try:
            with _open_safetensors(f) as h:
                return h.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise PoolError(f"{f}: cannot read tensor '{name}' ({e})") from e

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        f = self._where[name]
        with _open_safetensors(f) as h:
            s = h.get_slice(name)
            return tuple(s.get_shape()), SAFETENSORS_DTYPES[s.get_dtype()]


class BaseFiles:
    """A base model read tensor by tensor from its files, by the pool's names (a streamed merge keeps the base
    module on the meta device). The last two tensors read are kept, so an expert's task vector and the merge
    read each once."""

    def __init__(self, source: TensorSource, canonical: Callable[[str], str | None]):
        self.source = source
        self.file_names: dict[str, str] = {}  # the pool's name -> the name in the files
        for key in source.keys():
            name = canonical(key)
            if name is not None:
                self.file_names.setdefault(name, key)
        self._last: dict[str, torch.Tensor] = {}

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        read = self._last.get(name)
        if read is None:
            if name not in self.file_names:
                raise PoolError(f"base model {self.source.path}: its files hold no tensor '{name}'")
            read = self.source.get(self.file_names[name]).to(dtype)
            self._last = {**dict(list(self._last.items())[-1:]), name: read}  # a new dict: thread-safe reads
        return read


class TorchBinSource(TensorSource):
    """``pytorch_model*.bin`` files, memory-mapped so they are not read whole."""

    def __init__(self, files: list[Path]):
        self.path = files[0].parent
        self._sd: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                self._sd.update(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
            except Exception as e:  # torch raises many types for corrupt pickles/zips
                raise PoolError(f"{f}: unreadable or truncated .bin checkpoint ({e})") from e

    def keys(self) -> list[str]:
        return list(self._sd)

    def get(self, name: str) -> torch.Tensor:
        return self._sd[name]


def open_checkpoint(path: str | Path) -> TensorSource:
    """A lazy tensor source for an HF model directory or a single ``.safetensors`` file."""
    p = Path(path)
    if not p.exists():
        raise PoolError(f"{p}: path does not exist")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise PoolError(f"{p}: a single-file checkpoint must be a .safetensors state dict")
        return SafetensorsSource([p])
    for index_name, cls in (("model.safetensors.index.json", SafetensorsSource),
                            ("pytorch_model.bin.index.json", TorchBinSource)):
        index = p / index_name
        if index.exists():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise PoolError(f"{index}: malformed shard index ({e})") from e
            missing = [f for f in files if not (p / f).exists()]
            if missing:
                raise PoolError(f"{index}: shard file(s) missing: {missing}")
            return cls([p / f for f in files])
    if (p / "model.safetensors").exists():
        return SafetensorsSource([p / "model.safetensors"])
    if (p / "pytorch_model.bin").exists():
        return TorchBinSource([p / "pytorch_model.bin"])
    raise PoolError(
        f"{p}: not a model directory (no model.safetensors, pytorch_model.bin, shard index "
        "or adapter_config.json)"
    )


# ----------------------------------------------------------------------------------------------
# Experts
# ----------------------------------------------------------------------------------------------
def strip_prefixes(name: str, prefixes: tuple[str, ...]) -> str:
    for pre in prefixes:
        if pre and name.startswith(pre):
            return name[len(pre):]
    return name


@dataclass
class Expert:
    """One fine-tuned model, resolved lazily to (dense) task-vector tensors by canonical name."""

    name: str
    path: Path
    source: TensorSource
    lora: dict | None = None  # adapter config when the expert is a PEFT LoRA adapter
    # canonical name -> name in the file (filled by ModelPool when it aligns names)
    file_names: dict[str, str] = field(default_factory=dict)

    @property
    def is_lora(self) -> bool:
        return self.lora is not None


def lora_scaling(cfg: dict, module: str) -> tuple[int, float]:
    """Rank and scaling of one LoRA module, honouring rank/alpha patterns and rsLoRA."""
    r, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
    for pat, val in (cfg.get("rank_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pat}", module):
            r = val
    for pat, val in (cfg.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pat}", module):
            alpha = val
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return r, scale


def load_expert(name: str, path: str | Path) -> Expert:
    p = Path(path)
    if p.is_dir() and (p / "adapter_config.json").exists():
        try:
            cfg = json.loads((p / "adapter_config.json").read_text())
        except json.JSONDecodeError as e:
            raise PoolError(f"expert '{name}': {p / 'adapter_config.json'} is not valid JSON ({e})") from e
        if cfg.get("peft_type", "LORA") != "LORA":
            raise PoolError(f"expert '{name}': {p} is a {cfg.get('peft_type')} adapter; only LoRA is supported")
        if cfg.get("use_dora"):
            raise PoolError(f"expert '{name}': {p} is a DoRA adapter; only plain LoRA is supported")
        f = p / "adapter_model.safetensors"
        if not f.exists():
            raise PoolError(f"expert '{name}': {p} has adapter_config.json but no adapter_model.safetensors")
        return Expert(name, p, SafetensorsSource([f]), lora=cfg)
    try:
        src = open_checkpoint(p)
    except PoolError as e:
        raise PoolError(f"expert '{name}': {e}") from e
    return Expert(name, p, src)
