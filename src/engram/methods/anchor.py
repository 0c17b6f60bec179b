"""Online quadratic anchors: online EWC, MAS and L2 share one penalty.

After each task t, an importance Omega_t is measured at the task's final weights theta*_t
and merged into a running importance; training later tasks adds

    penalty = (lambda / 2) * sum_i Omega*_i (theta_i - theta*_i)^2,   Omega* = gamma * Omega*_prev + Omega_t

anchored only at the latest weights theta* (one anchor, 2P floats whatever the number of
tasks). The variants differ only in the importance and gamma:

- online EWC (Schwarz et al. 2018, "Progress & Compress", ICML): Omega = a diagonal Fisher
  (estimator named by `importance`), gamma in (0, 1] (default 1, Huszar's correction of
  EWC). van de Ven's code multiplies by gamma once more inside the loss; engram does not.
- MAS (Aljundi et al. 2018, ECCV): Omega = mean |d ||f(x)||^2 / d theta| (see
  `engram.importance.mas`), summed across tasks (gamma = 1). The paper's penalty has no 1/2:
  its lambda equals engram's strength / 2.
- L2 to the previous task's weights: Omega = 1 everywhere and gamma = 0, i.e.
  (lambda / 2) ||theta - theta*_{t-1}||^2, EWC with F = I (stored as a scalar 1 per
  parameter tensor, so L2's memory is the anchor alone).

Hyperparameters: strength = lambda; importance; decay = gamma; importance_samples = how many
of the task's training examples measure Omega (None: all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from engram.schema import opt
from engram.importance.fisher import fisher_diagonal
from engram.importance.mas import mas_importance
from engram.methods.base import (Context, Method, ProblemInfo, QuadraticPenalty,
                                 needs_class_scores, random_subset)
from engram.methods.ewc import FISHER_NEEDS

Importance = Literal["fisher_exact", "fisher_sample", "fisher_empirical", "fisher_batch", "mas",
                     "uniform"]


def measure_importance(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                       task: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One importance map {parameter name: tensor} by the name an anchor config uses."""
    if name.startswith("fisher_"):
        return fisher_diagonal(model, x, y, task, name.removeprefix("fisher_"), generator=generator)
    if name == "mas":
        return mas_importance(model, x, task)
    # uniform: plain L2. A scalar 1 per parameter broadcasts in the penalty, so L2 keeps only
    # its anchor (4P bytes), not P ones beside it.
    return {n: torch.ones((), dtype=p.dtype, device=p.device) for n, p in model.named_parameters()}


@dataclass
class AnchorParams:
    strength: float = opt(1.0, "lambda: weight of the quadratic penalty", low=0.0)
    importance: Importance = opt("fisher_exact", "how much each weight matters: a Fisher "
                                 "estimator, mas, or uniform (plain L2)")
    decay: float = opt(1.0, "gamma: old importance is multiplied by this before adding the new",
                       low=0.0, high=1.0)
    importance_samples: int | None = opt(None, "training examples used to measure importance "
                                         "(null: all)", low=1)


class OnlineAnchor(Method):
    """Quadratic penalty to the latest weights, weighted by a decayed sum of importances."""

    Params = AnchorParams
    batchable = True  # its seeds may train as one stacked network (batch_seeds)

    def __init__(self, params: AnchorParams | None = None) -> None:
        super().__init__(params)
        self.importance: dict[str, torch.Tensor] = {}  # Omega*
        self.anchor: dict[str, torch.Tensor] = {}      # theta* of the latest task

    def unusable_reason(self, problem: ProblemInfo) -> str | None:
        """The Fisher importances need class scores; MAS (output norm) and L2 do not."""
        if self.params.importance.startswith("fisher_"):
            return needs_class_scores(problem, FISHER_NEEDS)
        return None

    def quadratic_penalties(self, ctx: Context) -> list[QuadraticPenalty]:
        if not self.importance:
            return []
        names, params = zip(*ctx.model.named_parameters())
        return [QuadraticPenalty(self.params.strength, params,
                                 [self.importance[name] for name in names],
                                 [self.anchor[name] for name in names])]

    def after_task(self, ctx: Context) -> None:
        data = random_subset(ctx.task.train, self.params.importance_samples, ctx.generator)
        new = measure_importance(self.params.importance, ctx.model, data.x, data.y, data.task,
                                 ctx.generator)
        for name, p in ctx.model.named_parameters():
            old = self.importance.get(name)
            self.importance[name] = new[name] if old is None else self.params.decay * old + new[name]
            self.anchor[name] = p.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {"importance": self.importance, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance, self.anchor = dict(state["importance"]), dict(state["anchor"])


@dataclass
class MASParams(AnchorParams):
    importance: Importance = opt("mas", "how much each weight matters (MAS: mas)")


@dataclass
class L2Params(AnchorParams):
    importance: Importance = opt("uniform", "how much each weight matters (L2: uniform)")
    decay: float = opt(0.0, "gamma: 0 anchors to the previous task only", low=0.0, high=1.0)


class OnlineEWC(OnlineAnchor):
    """Online EWC: decayed sum of diagonal Fishers, one anchor (Schwarz et al. 2018)."""


class MAS(OnlineAnchor):
    """Memory Aware Synapses: output-sensitivity importance, one anchor (Aljundi et al. 2018)."""

    Params = MASParams


class L2(OnlineAnchor):
    """L2 penalty to the previous task's weights."""

    Params = L2Params
