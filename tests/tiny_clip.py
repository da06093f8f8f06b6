"""A tiny random CLIPModel base and two vision experts fine-tuned on synthetic image tasks (red vs blue, square vs
circle), written as a ``clip_zero_shot`` pool; the hand computation of its zero-shot heads."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

import helpers
from adamerge.families.clip import DEFAULT_TEMPLATES

SIZE = 32
TASKS = {"color": ["red", "blue"], "shape": ["square", "circle"]}
TEMPLATES = {"color": ["a {} image.", "something {}."], "shape": None}  # shape: the default templates


def clip_config(**vision):
    from transformers import CLIPConfig

    v = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
             patch_size=16)
    v.update(vision)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=30522,
                max_position_embeddings=32, bos_token_id=101, eos_token_id=102, pad_token_id=0)  # MiniLM's tokenizer
    return CLIPConfig(text_config=text, vision_config=v, projection_dim=16)


def draw(task: str, label: int, g: torch.Generator):
    """A 32×32 PIL image of class ``label``: a red or blue field, or a white square or disc on black."""
    from PIL import Image

    if task == "color":
        base = torch.tensor([200.0, 40.0, 40.0]) if label == 0 else torch.tensor([40.0, 40.0, 200.0])
        px = base.view(1, 1, 3) + 30 * torch.randn(SIZE, SIZE, 3, generator=g)
    else:
        r = int(torch.randint(6, 11, (1,), generator=g))
        cy, cx = (int(v) for v in torch.randint(r, SIZE - r, (2,), generator=g))
        yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
        inside = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r) if label == 0 else (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        px = inside.float().unsqueeze(-1).expand(SIZE, SIZE, 3) * 255 + 10 * torch.randn(SIZE, SIZE, 3, generator=g)
    return Image.fromarray(px.clamp(0, 255).to(torch.uint8).numpy())


def write_images(folder, task: str, n: int, seed: int, by_class: bool) -> list[tuple[str, int]]:
    """``n`` images (classes alternating) under ``folder``: in class folders, or flat; returns (path, label)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        y = i % 2
        d = folder / TASKS[task][y] if by_class else folder
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{i:03d}.png"
        draw(task, y, g).save(path)
        rows.append((str(path), y))
    return rows


def hand_head(clip, tok, classes: list[str], templates: list[str]) -> torch.Tensor:
    """The zero-shot head written out: per class, mean of normalized get_text_features, normalized, × scale."""
    rows = []
    with torch.no_grad():
        for c in classes:
            enc = tok([t.format(c) for t in templates], padding=True, return_tensors="pt")
            emb = clip.get_text_features(**enc).pooler_output
            rows.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=0))
    return torch.stack(rows) * clip.logit_scale.exp()


def build(tmp) -> dict:
    """Base CLIPModel (+ tokenizer, image processor), one CLIPVisionModel per task fine-tuned from it with its
    zero-shot head (a few SGD steps), calibration and test images; returns the pool config."""
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, CLIPVisionModel

    torch.manual_seed(0)
    clip = CLIPModel(clip_config()).eval().requires_grad_(False)
    base = tmp / "base"
    clip.save_pretrained(base)
    helpers.save_tokenizer(base)
    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    processor.save_pretrained(base)
    tok = AutoTokenizer.from_pretrained(str(base))
    tasks = {}
    for k, (task, classes) in enumerate(TASKS.items()):
        train = write_images(tmp / f"{task}_train", task, 16, seed=10 + k, by_class=False)
        write_images(tmp / f"{task}_cal", task, 12, seed=20 + k, by_class=False)
        test_rows = write_images(tmp / f"{task}_test", task, 12, seed=30 + k, by_class=task == "shape")
        head = hand_head(clip, tok, classes, TEMPLATES[task] or DEFAULT_TEMPLATES)
        x = processor(images=[Image.open(p).convert("RGB") for p, _ in train], return_tensors="pt")["pixel_values"]
        y = torch.tensor([label for _, label in train])
        expert = CLIPVisionModel.from_pretrained(str(base)).train()
        opt = torch.optim.SGD(expert.parameters(), lr=0.1)
        for _ in range(8):
            emb = F.normalize(clip.visual_projection(expert(pixel_values=x).pooler_output), dim=-1)
            loss = F.cross_entropy(emb @ head.T, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        expert.save_pretrained(tmp / f"expert_{task}")
        spec = {"expert": str(tmp / f"expert_{task}"), "calibration": str(tmp / f"{task}_cal"), "classes": classes}
        if TEMPLATES[task]:
            spec["templates"] = TEMPLATES[task]
        if task == "shape":
            spec["test"] = str(tmp / f"{task}_test")  # an image folder: <dir>/<class>/<image>
        else:  # JSON lines, image paths relative to the file's folder
            jl = tmp / f"{task}_test.jsonl"
            jl.write_text("".join(json.dumps({"image": str(Path(p).relative_to(tmp)), "label": y}) + "\n"
                                  for p, y in test_rows))
            spec["test"] = str(jl)
        tasks[task] = spec
    return {"base": str(base), "model_class": "clip_zero_shot", "tasks": tasks}
