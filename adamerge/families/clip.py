"""``model_class: clip_zero_shot``: image classification with CLIP, as in the task-arithmetic papers.

The base is a ``CLIPModel`` directory; the experts are ``CLIPVisionModel`` (or full ``CLIPModel``)
directories fine-tuned from it. Only the vision tower (and the visual projection, where an expert has
one) is merged. Each task's head is its zero-shot classifier, built once from the *base* text tower:
per class, the L2-normalized text embeddings of ``template.format(class)`` averaged over the task's
templates and normalized again, the rows scaled by the base's ``logit_scale.exp()``.

The pool's base module is ``ZeroShotCLIP``: the base's vision tower and projection with a bias-free
``classifier`` whose weight is the task's head (``ModelPool.fixed_heads``), so ``functional_call`` with
merged weights and that head gives ``logits = head @ normalize(image_embeds)`` like any classifier's.
Data files are image folders (``<dir>/<class>/*.png``) or JSON lines of ``{"image": path, "label": i}``;
images go through the base's image processor. The export (``model/``) loads with
``CLIPVisionModelWithProjection`` or ``CLIPVisionModel`` ``.from_pretrained`` and holds the image processor.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PoolError
from ..run.data import load_tokenizer
from .base import ModelFamily, check_names, register_family
from .clip_images import load_image_test_sets, pixel_values, read_images

HEAD = "classifier.weight"  # the per-task zero-shot head in ZeroShotCLIP
DEFAULT_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}."]
EXPERT_IGNORED = ("text_model.", "text_projection.", "logit_scale")  # a full CLIPModel expert's non-vision part
VISION_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                 "image_size", "num_channels")


# ----------------------------------------------------------------------------------------------
# Pool keys
# ----------------------------------------------------------------------------------------------
def check_class_names(task: str, classes) -> list[str]:
    """A zero-shot task's class names: required, two or more distinct non-empty strings."""
    key = f"pool.tasks.{task}.classes"
    if classes is None or (isinstance(classes, (list, tuple)) and not classes):
        raise PoolError(f"{key} is required for a clip_zero_shot task: the class names its zero-shot head is "
                        "built from, in label order (e.g. classes: [cat, dog])")
    return check_names(key, classes, "class names")


def check_templates(task: str, templates) -> list[str] | None:
    """A zero-shot task's prompt templates, each with one ``{}`` for the class name; None: the defaults."""
    key = f"pool.tasks.{task}.templates"
    if templates is None:
        return None
    if not isinstance(templates, (list, tuple)) or not templates or not all(isinstance(t, str) for t in templates):
        raise PoolError(f"{key} must be a non-empty list of strings such as 'a photo of a {{}}.', got {templates!r}")
    for t in templates:
        try:
            ok = "{}" in t and t.format("x") is not None
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise PoolError(f"{key}: template {t!r} must hold exactly one '{{}}' where the class name goes "
                            "(and no other braces), e.g. 'a photo of a {}.'")
    return list(templates)


# ----------------------------------------------------------------------------------------------
# The pool's base module
# ----------------------------------------------------------------------------------------------
class ZeroShotCLIP(nn.Module):
    """CLIP's vision tower + projection, and a classifier over normalized image embeddings (the task's head)."""

    base_model_prefix = "vision_model"  # a CLIPVisionModel saved by transformers 5 has no "vision_model." in its keys

    def __init__(self, hf_model: nn.Module, head: torch.Tensor, image_processor):
        super().__init__()
        self.vision_model = hf_model.vision_model
        self.visual_projection = hf_model.visual_projection
        self.classifier = nn.Linear(head.shape[1], head.shape[0], bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(head)
        object.__setattr__(self, "hf_model", hf_model)  # a CLIPVisionModelWithProjection over the same modules
        self.image_processor = image_processor

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None):
        from transformers.modeling_outputs import ImageClassifierOutput

        out = self.vision_model(pixel_values=pixel_values, output_hidden_states=output_hidden_states)
        emb = F.normalize(self.visual_projection(out.pooler_output), dim=-1)
        return ImageClassifierOutput(logits=self.classifier(emb), hidden_states=out.hidden_states)


def _vision_config(path: Path, what: str):
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise PoolError(f"{what} ({path}): cannot read its config ({e})") from e
    if cfg.model_type in ("clip", "clip_vision_model"):
        return cfg.vision_config if cfg.model_type == "clip" else cfg
    raise PoolError(f"{what} ({path}) is a {cfg.model_type} model, not a CLIP one; a clip_zero_shot pool needs "
                    "CLIPVisionModel or CLIPModel directories")


def check_expert_config(task: str, path: Path, base_path: Path, base_vision) -> None:
    """A one-line PoolError when an expert directory's vision config differs from the base's."""
    if not (path.is_dir() and (path / "config.json").exists()):
        return  # a single state-dict file or an adapter: its tensors are checked by name and shape
    vis = _vision_config(path, f"expert '{task}'")
    diffs = [f"{k} {getattr(vis, k, None)} vs base {getattr(base_vision, k, None)}" for k in VISION_FIELDS
             if getattr(vis, k, None) != getattr(base_vision, k, None)]
    if diffs:
        raise PoolError(f"expert '{task}' ({path}): its vision config differs from the base's ({', '.join(diffs)}); "
                        f"give an expert fine-tuned from the base {base_path}")


@torch.no_grad()
def zero_shot_head(clip: nn.Module, tokenizer, classes: list[str], templates: list[str]) -> torch.Tensor:
    """``[C, projection_dim]``: per class, the mean of the normalized text embeddings of its templates,
    normalized, times ``logit_scale.exp()``."""
    texts = [t.format(c) for c in classes for t in templates]
    max_len = clip.config.text_config.max_position_embeddings
    embs = []
    for i in range(0, len(texts), 256):
        enc = tokenizer(texts[i:i + 256], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out = clip.get_text_features(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"))
        embs.append(F.normalize(getattr(out, "pooler_output", out).float(), dim=-1))
    per_class = torch.cat(embs).view(len(classes), len(templates), -1).mean(1)
    return F.normalize(per_class, dim=-1) * clip.logit_scale.float().exp()


def build_zero_shot_base(pool) -> ZeroShotCLIP:
    """The pool's base module (ZeroShotCLIP) and the tasks' zero-shot heads; every task's keys and every
    expert's vision config are checked first. Sets the pool's family-built heads and expert name rules."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        CLIPModel,
        CLIPVisionModelWithProjection,
    )

    for name, spec in pool.tasks.items():
        classes = check_class_names(name, spec.classes)
        check_templates(name, spec.templates)
        if spec.num_labels is not None and spec.num_labels != len(classes):
            raise PoolError(f"task '{name}': num_labels {spec.num_labels} but {len(classes)} classes; drop "
                            "num_labels (a clip_zero_shot task has one label per class)")
        pool.tasks[name] = dataclasses.replace(spec, num_labels=len(classes), label_names=list(classes))
    base = pool.base_path
    where = f"base model {base}"
    try:
        base_cfg = AutoConfig.from_pretrained(str(base))
    except (OSError, ValueError) as e:
        raise PoolError(f"{where}: cannot read its config ({e})") from e
    if base_cfg.model_type != "clip":
        raise PoolError(f"{where} is a {base_cfg.model_type} model; a clip_zero_shot base is a CLIPModel directory "
                        "(vision and text tower: the zero-shot heads are built from its text tower)")
    base_vision = base_cfg.vision_config
    for name, spec in pool.tasks.items():
        check_expert_config(name, Path(spec.expert), base, base_vision)
    try:
        clip = CLIPModel.from_pretrained(str(base)).eval()
        tokenizer = load_tokenizer(base)
        processor = AutoImageProcessor.from_pretrained(str(base))
    except (OSError, ValueError) as e:
        raise PoolError(f"{where}: cannot load the CLIPModel, its tokenizer and its image processor ({e}); "
                        "save all three into the base directory") from e
    heads = {name: zero_shot_head(clip, tokenizer, spec.classes, spec.templates or DEFAULT_TEMPLATES)
             for name, spec in pool.tasks.items()}
    vcfg = copy.deepcopy(clip.config.vision_config)
    vcfg.projection_dim = clip.config.projection_dim
    with torch.device("meta"):  # an empty shell around the base's own vision modules: what the export saves
        vision = CLIPVisionModelWithProjection(vcfg)
    vision.vision_model, vision.visual_projection = clip.vision_model, clip.visual_projection
    del clip  # the text tower is not needed again
    dtype = vision.visual_projection.weight.dtype
    pool.fixed_heads = {t: {HEAD: h.to(dtype)} for t, h in heads.items()}
    pool.optional_names = {"visual_projection.weight"}  # a CLIPVisionModel expert has none: the base's
    pool.ignored_prefixes = EXPERT_IGNORED
    if "classifier." not in pool.head_prefixes:
        pool.head_prefixes = (*pool.head_prefixes, "classifier.")
    return ZeroShotCLIP(vision, pool.fixed_heads[pool.task_names[0]][HEAD], processor)


def how_to_load(pool) -> list[str]:
    """The model card's "How to load" lines."""
    task = pool.task_names[0]
    return ["`model/` is the merged vision tower with its projection (`CLIPVisionModelWithProjection`; "
            "`CLIPVisionModel` loads the tower alone) and the image processor; `heads/<task>.safetensors` holds "
            f"each task's zero-shot head `{HEAD}` (logit scale included):", "", "```python",
            "import torch.nn.functional as F", "from safetensors.torch import load_file",
            "from transformers import AutoImageProcessor, CLIPVisionModelWithProjection",
            'model = CLIPVisionModelWithProjection.from_pretrained("export/model")',
            'processor = AutoImageProcessor.from_pretrained("export/model")',
            f'head = load_file("export/heads/{task}.safetensors")["{HEAD}"]',
            'emb = model(**processor(images=image, return_tensors="pt")).image_embeds',
            "logits = F.normalize(emb, dim=-1) @ head.T", "```"]


@register_family
class CLIPZeroShot(ModelFamily):
    name = "clip_zero_shot"
    auto_class = "CLIPVisionModelWithProjection"  # what the export's model/ is
    streams = False  # its zero-shot heads are computed from the text tower's weights
    evaluated = True

    def build_base(self, pool) -> nn.Module:
        return build_zero_shot_base(pool)

    def check_classes(self, task: str, classes) -> list[str]:
        return check_class_names(task, classes)

    def check_templates(self, task: str, templates) -> list[str] | None:
        return check_templates(task, templates)

    def read_split(self, pool, task: str, split: str, path: str, need_labels: bool,
                   tokenizer=None) -> tuple[list, list]:
        return read_images(pool, task, split, path, need_labels)

    def load_tokenizer(self, pool) -> Any:
        return None  # images, not text

    def encode(self, pool, items: list, tokenizer, max_length: int) -> dict[str, torch.Tensor]:
        return pixel_values(pool, items)

    def load_test_sets(self, pool, tokenizer, max_length: int, max_examples: int | None, split: str,
                       max_new_tokens: int) -> dict:
        return load_image_test_sets(pool, max_examples, split)

    def saves_tokenizer(self) -> bool:
        return False  # the export is the vision tower (+ image processor)

    def exported_module(self, model: nn.Module) -> nn.Module:
        return model.hf_model  # a CLIPVisionModelWithProjection over the wrapper's modules: no zero-shot head

    def save_extra_files(self, model: nn.Module, model_dir: Path) -> None:
        model.image_processor.save_pretrained(model_dir)

    def how_to_load(self, pool) -> list[str]:
        return how_to_load(pool)
