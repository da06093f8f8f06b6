"""``model_class: clip_zero_shot``: a tiny random CLIPModel base and two vision experts fine-tuned on
synthetic image tasks (red vs blue, square vs circle). The zero-shot heads against a hand computation,
AdaMerging and task arithmetic end to end through train.py (table, export loadable with
``CLIPVisionModel``), and the family's errors as one line before training."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import helpers
from adamerge.families.clip import DEFAULT_TEMPLATES, HEAD
from adamerge.pool.config import pool_from_config
from adamerge.pool.model_pool import PoolError
from tiny_clip import SIZE, TASKS, TEMPLATES, build, clip_config, hand_head


@pytest.fixture(scope="module")
def clip_cfg(tmp_path_factory):
    return build(tmp_path_factory.mktemp("clip"))


def test_zero_shot_heads_equal_a_hand_computation(clip_cfg):
    from transformers import AutoTokenizer, CLIPModel

    pool = pool_from_config(clip_cfg)
    clip = CLIPModel.from_pretrained(clip_cfg["base"]).eval()
    tok = AutoTokenizer.from_pretrained(clip_cfg["base"])
    scale = float(clip.logit_scale.detach().exp())
    for task, classes in TASKS.items():
        head = pool.head(task)[HEAD]
        assert head.shape == (len(classes), 16)
        torch.testing.assert_close(head.norm(dim=-1), torch.full((len(classes),), scale))
        torch.testing.assert_close(head, hand_head(clip, tok, classes, TEMPLATES[task] or DEFAULT_TEMPLATES))
    assert pool.num_labels("color") == 2 and pool.tasks["shape"].label_names == ["square", "circle"]


def test_other_templates_make_another_fingerprint(clip_cfg):
    """A zero-shot head is built, not read from an expert's files: a checkpoint learned under one set of
    templates must not resume under another."""
    task = next(iter(TASKS))
    cfg = copy.deepcopy(clip_cfg)
    cfg["tasks"][task]["templates"] = ["a blurry picture of a {}."]
    same, other = pool_from_config(clip_cfg).fingerprint(), pool_from_config(cfg).fingerprint()
    assert same == pool_from_config(clip_cfg).fingerprint()
    assert same["head_values"][task] != other["head_values"][task]
    assert {k: v for k, v in same.items() if k != "head_values"} == {k: v for k, v in other.items() if k != "head_values"}


def test_expert_formats_align_to_the_vision_tower(clip_cfg, tmp_path):
    """A full CLIPModel expert (its text tower and logit scale ignored, its projection merged) and a
    CLIPVisionModel saved with keys without "vision_model." (as transformers 5 writes a fresh one)."""
    from safetensors.torch import load_file
    from transformers import CLIPModel, CLIPVisionModel

    from adamerge.core.task_vectors import TaskVectors

    g = torch.Generator().manual_seed(5)
    full = CLIPModel.from_pretrained(clip_cfg["base"])
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    full.save_pretrained(tmp_path / "full")
    fresh = CLIPVisionModel(full.config.vision_config)
    fresh.load_state_dict({n: v + 0.01 for n, v in CLIPVisionModel.from_pretrained(clip_cfg["base"]).state_dict().items()})
    fresh.save_pretrained(tmp_path / "fresh")
    assert all(not k.startswith("vision_model.") for k in load_file(str(tmp_path / "fresh" / "model.safetensors")))
    cfg = json.loads(json.dumps(clip_cfg))
    cfg["tasks"]["color"]["expert"], cfg["tasks"]["shape"]["expert"] = str(tmp_path / "full"), str(tmp_path / "fresh")
    pool = pool_from_config(cfg)
    tv = TaskVectors.from_pool(pool)
    assert "visual_projection.weight" in tv.names and not any(n.startswith(("text_", "logit")) for n in tv.names)
    base = CLIPModel.from_pretrained(clip_cfg["base"])
    torch.testing.assert_close(tv["visual_projection.weight"][0],
                               full.visual_projection.weight.detach() - base.visual_projection.weight)
    assert not tv["visual_projection.weight"][1].any()  # the vision-only expert keeps the base's projection
    name = "vision_model.encoder.layers.0.mlp.fc1.weight"
    torch.testing.assert_close(tv[name][1], torch.full_like(tv[name][1], 0.01), atol=1e-6, rtol=0)


def hand_accuracy(vision, proj, head: torch.Tensor, cfg: dict, task: str) -> float:
    """Top-1 accuracy of ``vision`` (a CLIPVisionModel) + ``proj`` with ``head`` on the task's test images,
    read here from the files (folder or JSON lines) with the base's processor."""
    from pathlib import Path as P

    from PIL import Image
    from transformers import AutoImageProcessor

    test = P(cfg["tasks"][task]["test"])
    if test.is_dir():
        rows = [(f, TASKS[task].index(f.parent.name)) for f in sorted(test.glob("*/*.png"))]
    else:
        rows = [(test.parent / r["image"], r["label"]) for r in map(json.loads, test.read_text().splitlines())]
    x = AutoImageProcessor.from_pretrained(cfg["base"])(images=[Image.open(f).convert("RGB") for f, _ in rows],
                                                        return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pred = (F.normalize(proj(vision(pixel_values=x).pooler_output), dim=-1) @ head.T).argmax(-1)
    return float((pred == torch.tensor([y for _, y in rows])).float().mean())


def run(cfg: dict, out, method: str, *extra: str) -> int:
    return helpers.run_inprocess([f"method={method}", f"out_dir={out}", "trainer.max_steps=2", "data.batch_size=4",
                                  "evaluate.batch_size=5", "trainer.enable_progress_bar=false", *extra], cfg)


@pytest.mark.parametrize("method", ["adamerging_layerwise", "task_arithmetic"])
def test_train_py_merges_evaluates_and_exports_a_vision_tower(clip_cfg, tmp_path, capsys, method):
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

    out = tmp_path / "run"
    cfg = json.loads(json.dumps(clip_cfg))
    cfg["tasks"]["shape"]["validation"] = cfg["tasks"]["shape"]["test"]  # a learned run chooses start or end by it
    assert run(cfg, out, method) == 0, capsys.readouterr().err
    assert "| model | color | shape | avg | norm |" in capsys.readouterr().out
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert list(rows)[:2] == ["pretrained", "expert"] and list(rows)[-1].startswith(method)
    assert len(rows) == (4 if method == "adamerging_layerwise" else 3)  # learned: + the start row
    if method == "adamerging_layerwise":
        selection = json.loads((out / "export" / "selection.json").read_text())
        assert set(selection["validation"]["start"]["per_task"]) == {"shape"}
    pool = pool_from_config(clip_cfg)
    base = CLIPModel.from_pretrained(clip_cfg["base"]).eval()
    for task in TASKS:
        assert all(0.0 <= row[task] <= 1.0 for row in rows.values())
        head = pool.head(task)[HEAD]
        # the table's pretrained and expert accuracies, computed here from the files and the HF models
        assert rows["pretrained"][task] == pytest.approx(hand_accuracy(base.vision_model, base.visual_projection,
                                                                       head, clip_cfg, task))
        expert = CLIPVisionModel.from_pretrained(clip_cfg["tasks"][task]["expert"]).eval()
        assert rows["expert"][task] == pytest.approx(hand_accuracy(expert, base.visual_projection, head, clip_cfg, task))
        torch.testing.assert_close(load_file(str(out / "export" / "heads" / f"{task}.safetensors"))[HEAD], head)
    # the export: the merged vision tower (base + Σ c τ), the base's projection, the image processor
    rep = json.loads((out / "export" / "coefficients.json").read_text())
    assert rep["tensors"] and all(n.startswith("vision_model.") for n in rep["tensors"])
    coefs = torch.tensor(rep["coefficients"])
    merged = {n: pool.base_tensor(n) + sum(float(coefs[i, k]) * pool.task_vector(t, n) for k, t in enumerate(rep["tasks"]))
              for i, n in enumerate(rep["tensors"])}
    tower = CLIPVisionModel.from_pretrained(str(out / "export" / "model"))
    params = {"vision_model." + n: p for n, p in tower.named_parameters()}  # transformers 5 names it without
    for n, w in merged.items():
        torch.testing.assert_close(params[n], w, atol=1e-6, rtol=1e-6)
    assert set(merged) == set(params)  # the experts changed every tensor of the tower, and only those
    with_proj = CLIPVisionModelWithProjection.from_pretrained(str(out / "export" / "model"))
    assert torch.equal(with_proj.visual_projection.weight, base.visual_projection.weight)
    assert AutoImageProcessor.from_pretrained(str(out / "export" / "model")).crop_size["height"] == SIZE
    # the merge row of the table is the exported tower's accuracy with each task's head
    for task in TASKS:
        acc = hand_accuracy(with_proj.vision_model, with_proj.visual_projection, pool.head(task)[HEAD], clip_cfg, task)
        assert list(rows.values())[-1][task] == pytest.approx(acc)


def broken(cfg: dict, tmp, case: str) -> dict:
    """A copy of ``cfg`` with one mistake."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = json.loads(json.dumps(cfg))
    color = cfg["tasks"]["color"]
    if case == "vision config":
        v = clip_config().vision_config.to_dict()
        CLIPVisionModel(CLIPVisionConfig(**{**v, "patch_size": 8})).save_pretrained(tmp / "other")
        color["expert"] = str(tmp / "other")
    elif case == "vision-only base":
        CLIPVisionModel.from_pretrained(cfg["base"]).save_pretrained(tmp / "vbase")
        cfg["base"] = str(tmp / "vbase")
    elif case == "no classes":
        del color["classes"]
    elif case == "empty classes":
        color["classes"] = []
    elif case == "template":
        color["templates"] = ["a photo of a {}.", "a photo"]
    else:  # line 3 of the test file; the file beside the original, whose image paths are relative to it
        test = Path(color["test"])
        lines = test.read_text().splitlines()
        lines[2] = json.dumps({"missing image": {"image": "nowhere/x.png", "label": 0},
                               "not an image": {"image": "not_an_image.png", "label": 0},
                               "label": {"image": json.loads(lines[2])["image"], "label": 2}}[case])
        (test.parent / "not_an_image.png").write_text("hello")
        color["test"] = str(test.parent / f"bad_{case.replace(' ', '_')}.jsonl")
        Path(color["test"]).write_text("\n".join(lines) + "\n")
    return cfg


ERRORS = {
    "vision config": r"expert 'color' \(.*other\): its vision config differs from the base's \(patch_size 8 vs "
                     r"base 16\); give an expert fine-tuned from the base .*base",
    "vision-only base": r"base model .*vbase is a clip_vision_model model; a clip_zero_shot base is a CLIPModel "
                        r"directory \(vision and text tower: the zero-shot heads are built from its text tower\)",
    "no classes": r"pool.tasks.color.classes is required for a clip_zero_shot task: the class names",
    "empty classes": r"pool.tasks.color.classes is required for a clip_zero_shot task",
    "template": r"pool.tasks.color.templates: template 'a photo' must hold exactly one '\{\}'",
    "missing image": r"task 'color': test file .*bad_missing_image.jsonl line 3: image .*nowhere/x.png does not "
                     r"exist; fix the path under pool tasks.color.test",
    "not an image": r"task 'color': test file .*line 3: image .*not_an_image.png does not open as an image",
    "label": r"task 'color': test file .*line 3: label 2 is not a class index in \[0, 2\) \(the task's classes "
             r"\['red', 'blue'\]\)",
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_mistakes_are_one_line_before_training(clip_cfg, tmp_path, capsys, case):
    cfg = broken(clip_cfg, tmp_path, case)
    out = tmp_path / "run"
    helpers.assert_refused_in_one_line(run(cfg, out, "adamerging_layerwise"), capsys, ERRORS[case], out)


@pytest.mark.parametrize("key, value, model_class, pattern", [
    ("templates", ["a photo of a {}."], "sequence_classification", r"templates apply to clip_zero_shot pools only"),
    ("templates", ["a {} of a {}."], "clip_zero_shot", r"must hold exactly one '\{\}'"),
    ("templates", ["a {name}."], "clip_zero_shot", r"must hold exactly one '\{\}'"),
    ("templates", [], "clip_zero_shot", r"must be a non-empty list of strings"),
    ("classes", ["cat"], "clip_zero_shot", r"two or more class names"),
    ("classes", ["cat", "cat "], "clip_zero_shot", r"class names must differ"),
])
def test_bad_templates_and_classes_are_refused(key, value, model_class, pattern):
    from adamerge.families import get_family

    family = get_family(model_class)
    check = family.check_templates if key == "templates" else family.check_classes
    with pytest.raises(PoolError, match=rf"pool.tasks.t.{key}.*{pattern}"):
        check("t", value)
