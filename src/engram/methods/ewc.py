"""EWC: elastic weight consolidation (Kirkpatrick et al. 2017, PNAS 114(13):3521-3526).

After each task k, store the parameters theta*_k and a diagonal Fisher F_k. While learning
later tasks, add the quadratic penalty of the original ("offline") EWC, one term per
earlier task:

    L(theta) = L_task(theta) + (lambda / 2) * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2

Implementation note: a sum of quadratics is one quadratic, so instead of T anchors engram
keeps A = sum_k F_k and the precision-weighted anchor mu = (sum_k F_k theta*_k) / A:

    sum_k F_k (theta - theta*_k)^2 = A (theta - mu)^2 + const

which has exactly the same value (const is kept) and gradient at 2P floats of memory
instead of 2PT. The runner adds its gradient lambda A (theta - mu) in closed form
(`QuadraticPenalty`). The Fisher estimator is a named choice (see `engram.importance.fisher`):
"exact" (expectation over labels, the default), "sample", "empirical" (true label) or
"batch" (squared mini-batch mean gradient). It is computed in eval mode on the task's
training data at the end of the task, through the head(s) the scenario uses. In the
class-incremental scenario the softmax spans the whole output, classes of later tasks
included (van de Ven's code restricts it to the classes seen so far; not done here yet).

Hyperparameters: strength = lambda; fisher = estimator; fisher_samples = how many training
examples to use (None: all); fisher_batch_size = mini-batch size of the "batch" estimator.
lambda does not transfer between estimators: "batch" needs a larger one (van de Ven 2025).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from engram.schema import opt
from engram.importance.fisher import fisher_diagonal
from engram.methods.base import (Context, Method, ProblemInfo, QuadraticPenalty,
                                 needs_class_scores, random_subset)

# Why a Fisher-based importance cannot act on a regression or a single output: the estimators
# of engram.importance.fisher use the categorical likelihood softmax(outputs).
FISHER_NEEDS = "estimates its Fisher information from a softmax over the outputs"


@dataclass
class EWCParams:
    strength: float = opt(100.0, "lambda: weight of the quadratic penalty", low=0.0)
    fisher: Literal["exact", "sample", "empirical", "batch"] = opt(
        "exact", "Fisher estimator: exact (expectation over labels), sample, empirical (true label), batch")
    fisher_samples: int | None = opt(None, "training examples used for the Fisher (null: all)", low=1)
    fisher_batch_size: int = opt(32, "mini-batch size of the 'batch' estimator", low=1)


class EWC(Method):
    """Offline EWC with a named Fisher estimator (see the module docstring)."""

    Params = EWCParams
    batchable = True  # its seeds may train as one stacked network (batch_seeds)

    def __init__(self, params: EWCParams | None = None) -> None:
        super().__init__(params)
        self.precision: dict[str, torch.Tensor] = {}  # A = sum_k F_k
        self.anchor: dict[str, torch.Tensor] = {}     # mu = sum_k F_k theta*_k / A
        self.constant = 0.0                           # sum_k F_k theta*_k^2 - A mu^2, summed

    def unusable_reason(self, problem: ProblemInfo) -> str | None:
        return needs_class_scores(problem, FISHER_NEEDS)

    def quadratic_penalties(self, ctx: Context) -> list[QuadraticPenalty]:
        if not self.precision:
            return []
        names, params = zip(*ctx.model.named_parameters())
        return [QuadraticPenalty(self.params.strength, params,
                                 [self.precision[name] for name in names],
                                 [self.anchor[name] for name in names], self.constant)]

    def after_task(self, ctx: Context) -> None:
        data = random_subset(ctx.task.train, self.params.fisher_samples, ctx.generator)
        fisher = fisher_diagonal(ctx.model, data.x, data.y, data.task, self.params.fisher,
                                 batch_size=self.params.fisher_batch_size, generator=ctx.generator)
        constant = 0.0
        for name, p in ctx.model.named_parameters():
            theta = p.detach()
            old_a = self.precision.get(name, torch.zeros_like(theta))
            old_weighted = old_a * self.anchor.get(name, torch.zeros_like(theta))
            a = old_a + fisher[name]
            weighted = old_weighted + fisher[name] * theta
            # mu = weighted / A where A > 0; where A == 0 the term vanishes whatever mu is
            mu = torch.where(a > 0, weighted / a.clamp_min(1e-30), theta)
            old_sq = old_a * self.anchor.get(name, torch.zeros_like(theta)).pow(2)
            constant += float((old_sq + fisher[name] * theta.pow(2) - a * mu.pow(2)).sum())
            self.precision[name], self.anchor[name] = a, mu
        # A_old mu_old^2 + F theta*^2 - A mu^2 is what merging the new term leaves over
        self.constant += constant

    def state_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "anchor": self.anchor, "constant": self.constant}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.precision, self.anchor = dict(state["precision"]), dict(state["anchor"])
        self.constant = float(state["constant"])
