"""Image data of ``clip_zero_shot`` pools: image folders or JSON lines of ``{"image": path, "label": i}``,
checked before training, turned into pixels by the base's image processor, scored a batch at a time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from ..errors import DataError
from ..evaluate import shard_examples
from ..run.data import jsonl_rows, labelled_splits

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _open_check(p: Path, where: str, key: str) -> None:
    from PIL import Image

    if not p.is_file():
        raise DataError(f"{where}: image {p} does not exist; fix the path under pool {key} (relative paths are read "
                        "from the jsonl file's folder)")
    try:
        with Image.open(p) as im:
            im.size  # noqa: B018  (the header is read: the file is an image PIL can decode)
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: image {p} does not open as an image ({e}); replace or remove it") from e


def read_images(pool, task: str, split: str, path: str, need_labels: bool) -> tuple[list[str], list[int]]:
    """Image paths (and labels) of one split: an image folder (``<dir>/<class>/*``; calibration: any images
    under it) or a JSON-lines file of ``{"image": path, "label": int}``. Every image is checked to open."""
    p, classes, key = Path(path), pool.tasks[task].classes, f"tasks.{task}.{split}"
    where = f"task '{task}': {split} {'folder' if p.is_dir() else 'file'} {p}"
    if not p.exists():
        raise DataError(f"{where} does not exist; fix the path under pool {key}")
    paths, labels = [], []
    if p.is_dir():
        for f in sorted(p.rglob("*")):
            if f.suffix.lower() not in IMAGE_SUFFIXES or not f.is_file():
                continue
            rel = f.relative_to(p).parts
            if need_labels:
                if len(rel) != 2 or rel[0] not in classes:
                    raise DataError(f"{where}: {f} is not in a folder named after one of the task's classes "
                                    f"{classes} (<dir>/<class>/<image>); move it or fix pool tasks.{task}.classes")
                labels.append(classes.index(rel[0]))
            paths.append(str(f))
    else:
        for i, row in jsonl_rows(p, where):
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise DataError(f"{where} line {i} has no string 'image' field; write each line as "
                                '{"image": "path/to/image.png", "label": 0}')
            img = Path(row["image"]) if Path(row["image"]).is_absolute() else p.parent / row["image"]
            _open_check(img, f"{where} line {i}", key)
            paths.append(str(img))
            if need_labels:
                y = row.get("label")
                if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < len(classes):
                    raise DataError(f"{where} line {i}: label {y!r} is not a class index in [0, {len(classes)}) "
                                    f"(the task's classes {classes}); fix the label or pool tasks.{task}.classes")
                labels.append(y)
    if not paths:
        raise DataError(f"{where} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); give at least one")
    if p.is_dir():
        for f in paths:
            _open_check(Path(f), where, key)
    return paths, labels


def pixel_values(pool, paths: list[str], chunk: int = 64) -> dict[str, torch.Tensor]:
    """``{"pixel_values": [N, 3, H, W]}`` of the images at ``paths``, by the base's image processor."""
    from PIL import Image

    processor = pool.base_model.image_processor
    out = []
    for i in range(0, len(paths), chunk):
        images = []
        for f in paths[i:i + chunk]:
            try:
                with Image.open(f) as im:
                    images.append(im.convert("RGB"))
            except (OSError, ValueError) as e:
                raise DataError(f"image {f} cannot be read ({e}); replace or remove it") from e
        out.append(processor(images=images, return_tensors="pt")["pixel_values"])
    return {"pixel_values": torch.cat(out)}


@dataclasses.dataclass
class ImageTestSet:
    """One task's labelled images, read and processed one batch at a time when scored (a test set of
    thousands of images never sits in memory as pixels)."""

    paths: list[str]
    labels: torch.Tensor
    pool: object  # its base module's image processor reads them

    def __len__(self) -> int:
        return len(self.paths)

    def shard(self, rank: int, world: int) -> ImageTestSet:
        """Examples rank, rank + world, … (one DDP process's share)."""
        return shard_examples(self, ("paths", "labels"), rank, world)

    def accuracy(self, base: nn.Module, params: dict[str, torch.Tensor], batch_size: int = 64) -> float:
        return image_accuracy(base, params, self, batch_size)


def load_image_test_sets(pool, max_examples: int | None = None, split: str = "test") -> dict[str, ImageTestSet]:
    """{task: ImageTestSet} from each task's labelled ``split``; tasks without one are left out."""
    return {name: ImageTestSet(paths, torch.tensor(labels), pool)
            for name, paths, labels in labelled_splits(pool, split, max_examples)}


@torch.no_grad()
def image_accuracy(base: nn.Module, params: dict[str, torch.Tensor], ts: ImageTestSet, batch_size: int = 64) -> float:
    """Top-1 accuracy of ``base`` run with ``params`` (merged weights + the task's head) on ``ts``."""
    device = next(base.parameters()).device
    correct = 0
    for i in range(0, len(ts.paths), batch_size):
        x = pixel_values(ts.pool, ts.paths[i:i + batch_size])["pixel_values"].to(device)
        logits = functional_call(base, params, args=(), kwargs={"pixel_values": x}).logits
        correct += int((logits.argmax(-1).cpu() == ts.labels[i:i + batch_size]).sum())
    return correct / len(ts.paths)


