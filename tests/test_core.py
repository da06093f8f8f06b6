"""ModelPool, TaskVectors, MergedModel, data-free merges and export on tiny models built here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import helpers
from adamerge.core.coefficients import Coefficients
from adamerge.core.combine import combine
from adamerge.core.merged_model import MergedModel
from adamerge.core.task_vectors import TaskVectors
from adamerge.methods import get_method
from adamerge.pool.config import pool_from_config


def expert_sd(pool_cfg, task):
    return load_file(str(Path(pool_cfg["tasks"][task]["expert"]) / "model.safetensors"))


def base_sd(pool_cfg):
    return load_file(str(Path(pool_cfg["base"]) / "model.safetensors"))


def make(pool_cfg, method_cfg):
    pool = pool_from_config(pool_cfg)
    return pool, get_method(method_cfg["name"])(pool, method_cfg, {})


def reference_merge(pool_cfg, fn):
    """Direct computation: for each shared float tensor, base + fn(name, [τ_k])."""
    b = base_sd(pool_cfg)
    exps = [expert_sd(pool_cfg, t) for t in pool_cfg["tasks"]]
    out = {}
    for n, w0 in b.items():
        if n.startswith("classifier.") or not w0.is_floating_point():
            continue
        out[n] = w0 + fn(n, [e[n] - w0 for e in exps])
    return out


def assert_merged_equals(method, ref, atol=1e-6):
    sd = method.merged.merged_state_dict()
    assert ref
    for n, v in ref.items():
        torch.testing.assert_close(sd[n], v, atol=atol, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_weight_average_and_task_arithmetic(tiny_pool_cfg):
    _, wa = make(tiny_pool_cfg, {"name": "static", "id": "weight_average", "scale": None})
    assert_merged_equals(wa, reference_merge(tiny_pool_cfg, lambda n, ts: sum(ts) / len(ts)))
    _, ta = make(tiny_pool_cfg, {"name": "static", "id": "task_arithmetic", "scale": 0.3})
    assert_merged_equals(ta, reference_merge(tiny_pool_cfg, lambda n, ts: 0.3 * sum(ts)))


def _ties_reference(tiny_pool_cfg, density, mode, lam, pre=None):
    b = base_sd(tiny_pool_cfg)
    names = [n for n, v in b.items() if not n.startswith("classifier.") and v.is_floating_point()]
    exps = [expert_sd(tiny_pool_cfg, t) for t in tiny_pool_cfg["tasks"]]
    taus = [{n: e[n] - b[n] for n in names} for e in exps]
    if pre:
        taus = [pre(k, t) for k, t in enumerate(taus)]
    # 1. trim: top `density` by magnitude over the whole flattened task vector
    trimmed = []
    for t in taus:
        flat = torch.cat([t[n].flatten() for n in names]).abs()
        k = int(round(density * flat.numel()))
        th = flat.sort(descending=True).values[k - 1]
        trimmed.append({n: torch.where(t[n].abs() >= th, t[n], torch.zeros_like(t[n])) for n in names})
    # 2. elect: sign of summed mass; zero -> sign of the summed signs over all entries
    sums = {n: sum(t[n] for t in trimmed) for n in names}
    maj = torch.sign(sum(torch.sign(sums[n]).sum() for n in names))
    out = {}
    for n in names:
        s = torch.sign(sums[n])
        s[s == 0] = maj
        agree = [torch.where(torch.sign(t[n]) == s, t[n], torch.zeros_like(t[n])) for t in trimmed]
        tot = sum(agree)
        if mode == "mean":
            tot = tot / sum((a != 0).float() for a in agree).clamp(min=1)
        out[n] = b[n] + lam * tot
    return out


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_ties_merging(tiny_pool_cfg, mode):
    _, m = make(tiny_pool_cfg, {"name": "static", "id": "ties", "scale": 0.3, "ties": {"density": 0.2, "merge": mode}})
    assert_merged_equals(m, _ties_reference(tiny_pool_cfg, 0.2, mode, 0.3), atol=1e-5)


def test_dare_task_arithmetic_and_dare_ties(tiny_pool_cfg):
    p, seed = 0.5, 3
    _, m = make(tiny_pool_cfg, {"name": "static", "id": "dare", "scale": 0.3, "dare": {"p": p, "seed": seed}})
    sd = m.merged.merged_state_dict()
    # reference: same seeded generator, one draw per tensor in merge order, stacked over tasks
    b = base_sd(tiny_pool_cfg)
    exps = [expert_sd(tiny_pool_cfg, t) for t in tiny_pool_cfg["tasks"]]
    g = torch.Generator().manual_seed(seed)
    names = m.merged.names
    for n in names:
        tau = torch.stack([e[n] - b[n] for e in exps])
        keep = torch.rand(tau.shape, generator=g) >= p
        ref = b[n] + 0.3 * (torch.where(keep, tau, torch.zeros_like(tau)) / (1 - p)).sum(0)
        torch.testing.assert_close(sd[n], ref, atol=1e-6, rtol=1e-5)
    # about half of the entries are dropped
    tv = m.merged.task_vectors
    frac = sum((t == 0).sum().item() for t in tv.tensors.values()) / sum(t.numel() for t in tv.tensors.values())
    assert 0.45 < frac < 0.55
    # DARE then TIES: the TIES reference applied to the same dropped vectors
    _, dt = make(tiny_pool_cfg, {"name": "static", "id": "dare_ties", "scale": 0.3, "dare": {"p": p, "seed": seed},
                                 "ties": {"density": 0.2}})
    dropped = {n: m.merged.task_vectors[n] for n in names}
    ref = _ties_reference(tiny_pool_cfg, 0.2, "sum", 0.3, pre=lambda k, t: {n: dropped[n][k] for n in t})
    assert_merged_equals(dt, ref, atol=1e-5)


def test_consensus(tiny_pool_cfg):
    _, m = make(tiny_pool_cfg, {"name": "static", "id": "cons", "scale": 0.3, "consensus": {"k": 2, "lam": 0.4}})

    def fn(n, ts):
        t = torch.stack(ts)
        mtl = t.sum(0)
        masks = t.abs() >= 0.4 * (mtl - t).abs()
        keep = masks.sum(0) >= 2
        return 0.3 * torch.where(keep, mtl, torch.zeros_like(mtl))

    assert_merged_equals(m, reference_merge(tiny_pool_cfg, fn))


def test_functional_forward_equals_plain_model(tiny_pool_cfg):
    from transformers import BertForSequenceClassification

    pool, m = make(tiny_pool_cfg, {"name": "adamerging", "id": "am", "granularity": "layer", "init": 0.3})
    with torch.no_grad():
        m.merged.coefficients.raw.uniform_(0, 1)  # arbitrary, distinct layer-wise coefficients
    ids = torch.randint(1000, 2000, (3, 7))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        out = m.merged(task="task1", **inputs).logits
        plain = BertForSequenceClassification.from_pretrained(tiny_pool_cfg["tasks"]["task1"]["expert"]).eval()
        sd = m.merged.merged_state_dict()
        sd.update(pool.head("task1"))
        plain.load_state_dict(sd)
        ref = plain(**inputs).logits
    assert out.shape == (3, 3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("granularity", ["task", "layer", "chunk"])
def test_inner_product_gradient_equals_autograd(granularity):
    torch.manual_seed(0)
    K, shapes = 3, [(5, 4), (7,), (2, 3, 3)]
    taus = [torch.randn(K, *s) for s in shapes]
    numels = [int(torch.tensor(s).prod()) for s in shapes]
    c = Coefficients(K, len(shapes), granularity=granularity, init=0.3, chunks=[3, 2, 4], tensor_numels=numels)
    with torch.no_grad():
        c.raw.uniform_(-1, 1)
    targets = [torch.randn(s) for s in shapes]

    def loss_with(merge):
        return sum(((merge(i, coef) - targets[i]) ** 2).sum() for i, coef in enumerate(c()))

    ours = torch.autograd.grad(loss_with(lambda i, coef: combine(coef, taus[i], None, c.chunk_sizes[i] if c.chunk_sizes else 0)), c.raw)[0]

    def plain(i, coef):
        t = taus[i].flatten(1)
        if coef.dim() == 1:
            return (coef[:, None] * t).sum(0).view(shapes[i])
        per = coef.repeat_interleave(c.chunk_sizes[i], dim=1)[:, : t.shape[1]]
        return (per * t).sum(0).view(shapes[i])

    ref = torch.autograd.grad(loss_with(plain), c.raw)[0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_per_task_backward_surrogate_equals_summed_loss_gradient(tiny_pool_cfg):
    pool, m = make(tiny_pool_cfg, {"name": "adamerging", "id": "am", "granularity": "layer", "init": 0.3})
    ids = torch.randint(1000, 2000, (4, 6))
    batch = {t: {"input_ids": ids + i, "attention_mask": torch.ones_like(ids)} for i, t in enumerate(pool.task_names)}
    value, surrogate = m.step_loss(batch)
    g1 = torch.autograd.grad(surrogate, m.merged.coefficients.raw)[0]
    total = sum(m.task_loss(t, inp) for t, inp in batch.items())
    g2 = torch.autograd.grad(total, m.merged.coefficients.raw)[0]
    torch.testing.assert_close(value, total.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-4)
    assert g1.abs().sum() > 0


def test_training_step_merges_only_the_looked_up_embedding_rows_with_the_exact_gradient(tiny_pool_cfg):
    """step_loss merges into reused buffers and the input embedding only on the batch's token ids; over
    consecutive steps its value and coefficient gradient equal the dense merge's autograd gradient."""
    pool, m = make(tiny_pool_cfg, {"name": "adamerging", "id": "am", "granularity": "layer", "init": 0.3})
    mm = m.merged
    emb = "bert.embeddings.word_embeddings.weight"
    assert mm.lookup_name == emb
    with torch.no_grad():
        mm.coefficients.raw.uniform_(0, 1)
    g = torch.Generator().manual_seed(0)
    bufs = []
    for step in range(3):  # the second and third steps reuse the buffers and look up other rows
        ids = torch.randint(1000 + 300 * step, 1400 + 300 * step, (4, 6), generator=g)
        batch = {t: {"input_ids": ids + i, "attention_mask": torch.ones_like(ids)} for i, t in enumerate(pool.task_names)}
        g1 = helpers.step_gradient_matches_dense(m, batch)
        assert g1[mm.names.index(emb)].abs().sum() > 0
        # the table's other rows hold the base value: nothing is left over from the earlier steps' rows
        looked_up = torch.zeros(pool.base_tensor(emb).shape[0], dtype=torch.bool)
        looked_up[torch.cat([x["input_ids"].flatten() for x in batch.values()])] = True
        buf = mm._out[emb]
        bufs.append(buf)
        assert buf is bufs[0]  # reused, not reallocated
        torch.testing.assert_close(buf[~looked_up], pool.base_tensor(emb)[~looked_up], atol=0, rtol=0)
        with torch.no_grad():
            mm.coefficients.raw.add_(0.1)
    # the step's ∂L/∂W of the table is sparse (its looked-up rows), not a dense [V, d] tensor of zeros
    rows = mm.lookup_rows(list(batch.values()))
    params = mm.merged_params(reuse_buffers=True, rows=rows)
    leaf = params[emb].detach().requires_grad_(True)
    with mm.sparse_lookup_grad(rows):
        m.task_loss("task0", batch["task0"], {**params, emb: leaf}).backward()
    assert leaf.grad.is_sparse and not pool.base_model.get_input_embeddings().sparse  # restored after
    whole = mm.merged_params()  # the export's path is still the whole merge; it lets the buffers go
    assert not torch.equal(whole[emb], pool.base_tensor(emb)) and not mm._out


def test_tied_embedding_is_merged_whole():
    """An input embedding that is also the output layer (tied) is used in every row: no row-sparse merge."""
    from transformers import BertConfig, BertForMaskedLM

    base = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=16)).eval()
    names = [n for n, _ in base.named_parameters()]
    tv = TaskVectors({n: torch.randn(2, *dict(base.named_parameters())[n].shape) for n in names}, ["a", "b"])
    mm = MergedModel(base, tv, Coefficients(2, len(names), "layer", init=0.3))
    assert mm.lookup_name is None
    assert mm.lookup_rows([{"input_ids": torch.tensor([[1, 2]])}]) is None


def test_task_vectors_placement_and_dtype(tiny_pool_cfg):
    pool = pool_from_config(tiny_pool_cfg)
    tv32 = TaskVectors.from_pool(pool)
    tv16 = TaskVectors.from_pool(pool, dtype="bfloat16", exclude=[r"embeddings\."])
    assert all(t.dtype == torch.bfloat16 for t in tv16.tensors.values())
    assert not any("embeddings." in n for n in tv16.names)
    assert tv16.nbytes() * 2 < tv32.nbytes()
    assert not any(n.startswith("classifier.") for n in tv32.names)  # heads are never merged
    c = Coefficients(tv16.K, len(tv16), "layer", init=0.3)
    mm = MergedModel(pool.base_model, tv16, c)
    w = mm.merged_params()
    n = tv16.names[0]
    ref = pool.base_tensor(n) + 0.3 * tv16[n].float().sum(0)
    torch.testing.assert_close(w[n], ref, atol=1e-6, rtol=1e-5)


def test_blockwise_combine_for_bf16_task_vectors(monkeypatch):
    """τ stored in bf16 is converted a block of columns at a time: same value and gradient."""
    import adamerge.core.combine as kernel

    monkeypatch.setattr(kernel, "_BLOCK_ELEMS", 21)  # blocks of 7 columns for K = 3: several, the last partial
    torch.manual_seed(0)
    tau = torch.randn(3, 5, 9).to(torch.bfloat16)
    c = torch.tensor([0.2, -0.5, 0.9], requires_grad=True)
    out = combine(c, tau)
    ref_c = c.detach().clone().requires_grad_(True)
    ref = (ref_c[:, None] * tau.float().flatten(1)).sum(0).view(5, 9)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn(5, 9)
    torch.testing.assert_close(torch.autograd.grad((out * g).sum(), c)[0],
                               torch.autograd.grad((ref * g).sum(), ref_c)[0], atol=1e-5, rtol=1e-5)
