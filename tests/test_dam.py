"""DAM (adamerge/methods/dam.py) through train.py: Concrete AdaMerging plus an adversary step and the perturbed
inputs' entropy; without that term it is Concrete AdaMerging exactly, and it resumes exactly."""

from __future__ import annotations

import torch

import helpers

# the word embeddings hold most of the tiny BERT's weights: unmasked, the checkpoints stay small
COMMON = ["method.mask_steps=3", "trainer.max_steps=5", "data.batch_size=8", "method.lr=0.05", "evaluate.enabled=false",
          "trainer.log_every_n_steps=1", "method.mask_exclude=[word_embeddings]"]


def state(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def test_the_adversary_flips_the_merge_and_the_defense_moves_the_mask(tiny_pool_cfg, tmp_path, one_thread):
    """The perturbations train (the adversary's cross-entropy to the clean prediction rises over phase 1), and the
    mask differs from Concrete AdaMerging's with the same settings, which it equals without the perturbed term."""
    runs = {}
    for name, method, extra in [("dam", "dam", ("method.adv_lr=0.1",)), ("concrete", "concrete_adamerging_layerwise", ()),
                                ("undefended", "dam", ("method.adv_lr=0.1", "method.adv_weight=0"))]:
        runs[name] = tmp_path / name
        helpers.train_here(tiny_pool_cfg, runs[name], f"method={method}", *COMMON, one_thread, *extra)
    dam, concrete, undefended = (state(runs[n]) for n in ("dam", "concrete", "undefended"))
    assert dam["perturbation"].abs().max() > 0
    ce = [v for _, v in helpers.logged(runs["dam"], "adversary_ce")][:3]
    assert ce[-1] > ce[0]
    masks = [k for k in concrete if "mask.logits" in k]
    assert masks and any(not torch.equal(dam[k], concrete[k]) for k in masks)
    for k, v in concrete.items():  # no perturbed term: the adversary step changes nothing the merge reads
        assert torch.equal(undefended[k], v), k


def test_dam_resumes_exactly_in_its_defended_phase(tiny_pool_cfg, tmp_path, one_thread):
    full, part = tmp_path / "full", tmp_path / "part"
    dam = ["method=dam", "method.adv_lr=0.1", *COMMON, one_thread]
    helpers.train_here(tiny_pool_cfg, full, *dam, "checkpoint.every_n_steps=1",
                       "checkpoint.monitor=null")
    helpers.train_here(tiny_pool_cfg, part, *dam, "checkpoint.monitor=null",
                       f"resume={full / 'checkpoints' / 'step000002.ckpt'}")
    want, got = state(full), state(part)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0, msg=k)


def test_dam_on_a_pool_without_token_classifiers_is_refused_in_one_line(tmp_path, capsys):
    pool = helpers.make_llama_pool(tmp_path / "pool", vocab=200)
    code = helpers.run_inprocess([f"out_dir={tmp_path / 'run'}", "method=dam", "evaluate.enabled=false"], pool)
    helpers.assert_refused_in_one_line(code, capsys, r"method dam perturbs the input token embeddings of "
                                                     r"sequence_classification pools; this pool is causal_lm",
                                       tmp_path / "run")
