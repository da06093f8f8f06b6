"""OPCM: continual merging by orthogonal projection (Tang et al., "Merging Models on the Fly Without Retraining: A
Sequential Approach to Scalable Continual Model Merging", NeurIPS 2025, arXiv 2501.09522; FusionBench's ``opcm``).

Experts arrive one at a time (a seeded order). Each linear weight's new task vector is cleaned of the directions
the merge so far already spans: in the SVD basis of the running merge, its diagonal and the block of the leading
singular directions (their cumulative share of the spectrum up to ``alpha``) are removed; other tensors are added
as they are. After each arrival FusionBench rescales the merge to the mean norm of the task vectors seen. Since the
SVD basis and the split do not depend on the scale, the merge is R_T / λ_T with R_t = R_{t−1} + clean(τ_t; R_{t−1})
per tensor (R_1 = τ_1) and one model-wide λ_T = ‖R_T‖ / mean_t ‖τ_t‖: a stage that streams tensor by tensor, with
the reduced SVD (the removed entries only involve the leading min(m, n) singular vectors).

``continue_from``: a later run adds experts to an earlier OPCM export without its experts. The export keeps what the
recursion needs: R_T in float32 (``export/opcm/``, written tensor by tensor when streamed) and the experts, their
norms and λ_T in coefficients.json (``opcm``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ..errors import ConfigError
from .stage import Stage, one_update

STATE_DIR = "opcm"  # in the export: R_T, float32, one tensor per merged tensor


def clean(tau: torch.Tensor, running: torch.Tensor, alpha: float) -> torch.Tensor:
    """τ without its components on the running merge's diagonal (u_i v_iᵀ) and its leading block (u_i v_jᵀ, i, j below
    the split where the cumulative singular share first exceeds ``alpha``)."""
    u, s, vh = torch.linalg.svd(running, full_matrices=False)
    split = int((s.cumsum(dim=0) / s.sum() > alpha).float().argmax().item())
    projected = u.T @ tau @ vh.T  # [r, r]: τ's coordinates on the leading singular pairs
    removed = torch.diag_embed(projected.diagonal())
    removed[:split, :split] = projected[:split, :split]
    return tau - u @ removed @ vh


class Opcm(Stage):
    """The OPCM recursion over the experts (in the order ``shuffle`` and ``seed`` give), per tensor; the merge written
    into row 0 (λ = 1). Its report (``opcm``) keeps what ``continue_from`` needs."""

    needs_pool = True
    reads_rows = True  # streamed: one expert's tensor at a time, so memory does not grow with K

    def __init__(self, alpha: float, shuffle: bool, seed: int, continue_from: str | None):
        self.alpha, self.shuffle, self.seed, self.continue_from = alpha, shuffle, seed, continue_from

    def bind(self, pool) -> None:
        self.pool = pool
        model = pool.base_model
        self.linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        self.previous = self.load_previous(Path(self.continue_from)) if self.continue_from else None
        again = set(self.previous["experts"] if self.previous else ()) & set(pool.task_names)
        if again:  # known before any pass over the tensors
            raise ConfigError(f"method.opcm.continue_from: expert(s) {', '.join(sorted(again))} are in the earlier merge "
                              "already; give only the new experts")

    def load_previous(self, export: Path) -> dict:
        from safetensors import safe_open

        report = export / "coefficients.json"
        state = json.loads(report.read_text()).get("opcm") if report.is_file() else None
        files = sorted((export / STATE_DIR).glob("*.safetensors"))
        if not state or not files:
            raise ConfigError(f"method.opcm.continue_from: {export} holds no OPCM state ({report.name} 'opcm' and "
                              f"{STATE_DIR}/): give the export directory of an opcm run")
        handles = [safe_open(str(f), "pt") for f in files]
        state["where"] = {n: h for h in handles for n in h.keys()}
        return state

    def previous_running(self, name: str) -> torch.Tensor | None:
        """R_T of the earlier merge for one tensor (its export's ``opcm/``)."""
        if self.previous is None:
            return None
        if name not in self.previous["where"]:
            raise ConfigError(f"method.opcm.continue_from: tensor {name} is not in the earlier merge's {STATE_DIR}/")
        # a copy: the tensor shares the file's mapping, and the recursion adds into it in place
        return self.previous["where"][name].get_tensor(name).float().clone()

    def order(self, K: int) -> list[int]:
        order = list(range(K))
        if self.shuffle:
            random.Random(self.seed).shuffle(order)
        return order

    def running(self, name: str, t, sq: torch.Tensor | None = None) -> torch.Tensor:
        """R after every expert of this run, for one tensor (``t``: a stack or ``ExpertRows``, read a row at a time);
        each τ_k's squared norm added into ``sq[k]`` when given."""
        r = self.previous_running(name)
        for k in self.order(t.shape[0]):
            tau = t[k].float()
            if sq is not None:
                sq[k] += tau.square().sum(dtype=torch.float64)
            if r is None:
                r = tau.clone()
            elif name in self.linear and r.dim() == 2:
                r += clean(tau, r, self.alpha)
            else:
                r += tau
        return r

    def fit(self, stream, K: int) -> None:
        sq = torch.zeros(K, dtype=torch.float64)
        running_sq = 0.0
        self.shapes, self.kept, self.sink = {}, {}, None
        for name, t in stream():
            self.shapes[name] = tuple(t.shape[1:])
            running_sq += float(self.running(name, t, sq).square().sum(dtype=torch.float64))
        order = self.order(K)
        self.norms = list(self.previous["norms"] if self.previous else []) + [float(sq[k].sqrt()) for k in order]
        self.experts = list(self.previous["experts"] if self.previous else []) + \
            [self.pool.task_names[k] for k in order]
        self.lam = running_sq ** 0.5 / (sum(self.norms) / len(self.norms))

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        r = self.running(name, t)
        if self.sink is not None:
            self.sink.write(name, r)
        else:
            self.kept[name] = r
        return one_update(t, r / self.lam) if isinstance(t, torch.Tensor) else (r / self.lam).unsqueeze(0)

    def open_state(self, export_dir: Path) -> None:
        from ..safetensors_writer import StreamedCheckpoint

        self.sink = StreamedCheckpoint(export_dir / STATE_DIR, {n: (s, torch.float32) for n, s in self.shapes.items()},
                                       "5GB")

    def write_state(self, export_dir: Path) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None
        elif self.kept:
            from safetensors.torch import save_file

            (export_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
            save_file({n: r.contiguous() for n, r in self.kept.items()}, str(export_dir / STATE_DIR / "model.safetensors"))

    def report(self) -> dict:
        if not hasattr(self, "lam"):  # not fitted: its task vectors came from a cache (task_vectors.device=disk)
            return {}
        return {"opcm": {"experts": self.experts, "norms": self.norms, "lambda": self.lam, "alpha": self.alpha}}
