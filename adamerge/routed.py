"""A routed merge: one shared model, a low-rank exclusive delta per task, and a router that mixes the deltas per
input, so that a batch is classified without a task id (Twin-Merging; adamerge/methods/twin.py builds it).

``RoutedModel`` runs a classifier in two passes: the shared model's mean-pooled last hidden state goes through the
router (w = softmax over tasks); then every Linear weight W* of the backbone acts as W* + Σ_k w_k U_k V_k (and its
bias as b* + Σ_k w_k β_k), per example, through forward hooks, under the head of the task the router ranks first.
Norms and embeddings stay the shared model's. ``save`` writes ``export/routed/``; ``load(dir)`` reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call

ROUTED_DIR = "routed"


class Router(nn.Module):
    """The authors' router: d → 2d → 2d → K with BatchNorm, LeakyReLU and dropout."""

    def __init__(self, d: int, K: int, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        for i, o in ((d, 2 * d), (2 * d, 2 * d)):
            layers += [nn.Linear(i, o), nn.BatchNorm1d(o), nn.LeakyReLU(), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers, nn.Linear(2 * d, K))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def train_router(features: torch.Tensor, task_ids: torch.Tensor, K: int, epochs: int, lr: float, batch_size: int,
                 seed: int) -> tuple[Router, float]:
    """A router fitted by cross-entropy on the task each feature row came from (Adam); (router, its train accuracy)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the layers' initialisation and dropout
    router = Router(features.shape[1], K)
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    router.train()
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=g)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # BatchNorm needs two rows
                continue
            loss = nn.functional.cross_entropy(router(features[idx]), task_ids[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    router.eval()
    with torch.no_grad():
        accuracy = float((router(features).argmax(1) == task_ids).float().mean())
    return router, accuracy


class RoutedModel(nn.Module):
    """``model`` (a classifier holding the shared weights) + per-task low-rank deltas + ``router`` + the tasks' heads."""

    def __init__(self, model: nn.Module, tasks: list[str], heads: dict[str, dict[str, torch.Tensor]],
                 twins: dict[str, dict[str, torch.Tensor]], router: Router):
        super().__init__()
        self.model, self.tasks, self.router = model.eval(), list(tasks), router.eval()
        self.heads = heads
        self.twins = twins  # {linear weight name: {"U": [K, out, r], "V": [K, r, in], "bias": [K, out] (optional)}}
        self.weights: torch.Tensor | None = None  # [B, K] while a routed pass runs
        modules = dict(model.named_modules())
        self.hooks = [modules[name.rpartition(".")[0]].register_forward_hook(self.hook(name)) for name in twins]

    def train(self, mode: bool = True) -> RoutedModel:
        """Inference only: the router's BatchNorm and dropout stay in eval mode whatever a parent asks."""
        return super().train(False)

    def hook(self, name: str):
        twin = self.twins[name]
        K, out_features, r = twin["U"].shape
        u = twin["U"].permute(1, 0, 2).reshape(out_features, K * r)  # [out, K·r]
        v = twin["V"].reshape(K * r, -1)  # [K·r, in]

        def add_delta(module, args, output):
            if self.weights is None:
                return output
            x = args[0]
            w = self.weights.to(x.dtype)  # [B, K]
            shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (K * r,)
            delta = ((x @ v.T) * w.repeat_interleave(r, dim=1).view(shape)) @ u.T
            if "bias" in twin:
                delta = delta + (w @ twin["bias"]).view((x.shape[0],) + (1,) * (x.dim() - 2) + (out_features,))
            return output + delta

        return add_delta

    @torch.no_grad()
    def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The shared model's last hidden state, averaged over the attended tokens: the router's input."""
        self.weights = None
        hidden = self.model(**inputs, output_hidden_states=True).hidden_states[-1]
        mask = inputs.get("attention_mask", torch.ones(hidden.shape[:2])).unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    @torch.no_grad()
    def forward(self, head: int | None = None, **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(routing weights [B, K], routed task index [B], predicted label [B]) of a batch: no task id given, the head
        is the routed task's; ``head`` = k uses task k's head for every row (the weights are routed all the same)."""
        weights = torch.softmax(self.router(self.features(inputs)), dim=1)
        task = weights.argmax(1)
        use = task if head is None else torch.full_like(task, head)
        labels = torch.zeros_like(task)
        try:
            for k in use.unique().tolist():
                rows = (use == k).nonzero().squeeze(1)
                self.weights = weights[rows]
                out = functional_call(self.model, self.heads[self.tasks[k]], args=(),
                                      kwargs={n: t[rows] for n, t in inputs.items()}, strict=False)
                labels[rows] = out.logits.argmax(-1)
        finally:
            self.weights = None
        return weights, task, labels

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory / "model")
        save_file({f"{t}/{n}": v.contiguous() for t, h in self.heads.items() for n, v in h.items()},
                  str(directory / "heads.safetensors"))
        save_file({f"{name}/{part}": v.contiguous() for name, twin in self.twins.items() for part, v in twin.items()},
                  str(directory / "twins.safetensors"))
        save_file({n: v.contiguous() for n, v in self.router.state_dict().items()}, str(directory / "router.safetensors"))
        hidden = self.router.net[0].in_features
        (directory / "routed.json").write_text(json.dumps({"tasks": self.tasks, "router_input": hidden}, indent=1))


def load(export_dir: str | Path) -> RoutedModel:
    """The routed model an export keeps (``<export_dir>/routed``, or that directory itself)."""
    from transformers import AutoModelForSequenceClassification

    d = Path(export_dir)
    d = d / ROUTED_DIR if (d / ROUTED_DIR).is_dir() else d
    meta = json.loads((d / "routed.json").read_text())
    tasks = meta["tasks"]
    heads: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tasks}
    for key, v in load_file(str(d / "heads.safetensors")).items():
        task, _, name = key.partition("/")
        heads[task][name] = v
    twins: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in load_file(str(d / "twins.safetensors")).items():
        name, _, part = key.rpartition("/")
        twins.setdefault(name, {})[part] = v
    router = Router(meta["router_input"], len(tasks))
    router.load_state_dict(load_file(str(d / "router.safetensors")))
    model = AutoModelForSequenceClassification.from_pretrained(d / "model")
    return RoutedModel(model, tasks, heads, twins, router)


def routed_accuracies(routed: RoutedModel, test_sets: dict, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Per task, on classifier test sets (``encoded``, ``labels``): ``no_task_id`` (the router picks the task and its
    head picks the label: an example counts when both are right), ``own_head`` (weights routed, the task's own head:
    the authors' evaluation) and ``routing`` (the router's task accuracy)."""
    from .run.data import batches

    out: dict[str, dict[str, float]] = {"no_task_id": {}, "own_head": {}, "routing": {}}
    for k, task in enumerate(routed.tasks):
        if task not in test_sets:
            continue
        ts, n = test_sets[task], len(test_sets[task].labels)
        right = own = chosen = 0
        for batch, y in zip(batches(ts.encoded, batch_size), ts.labels.split(batch_size)):
            # one pass under task k's head: where the router picks k, that is also the pass without a task id
            _, routed_task, label = routed(head=k, **batch)
            picked = routed_task == k
            right += int((picked & (label == y)).sum())
            chosen += int(picked.sum())
            own += int((label == y).sum())
        out["no_task_id"][task], out["own_head"][task], out["routing"][task] = right / n, own / n, chosen / n
    return out
