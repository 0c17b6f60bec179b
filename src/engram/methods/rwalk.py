"""RWalk: Riemannian Walk (Chaudhry, Dokania, Ajanthan & Torr 2018, "Riemannian Walk for
Incremental Learning: Understanding Forgetting and Intransigence", ECCV), and EWC++ alone.

EWC++ (paper Eq. 6): an online diagonal Fisher, a moving average of the squared gradients of
the (unregularised) training loss, updated during training instead of once per task:

    every k steps:  F <- alpha * mean_{last k steps}(g^2) + (1 - alpha) * F     (F starts at 0)

g is the step's mini-batch gradient (the empirical "batch" Fisher, as in the authors' code).
F is never reset between tasks, so older tasks fade with (1 - alpha) per update.

Path score (paper Eq. 8-10): SI's path integral, but each parameter's loss drop over an
interval of k steps is divided by the KL distance the interval moved it, in the Fisher metric:

    per step:      w_i += -g_i * delta_theta_i                (as SI, engram.methods.si)
    every k steps: s_task,i += relu(w_i / (1/2 F_i (theta_i - theta_i(interval start))^2 + xi)),
                   w_i <- 0

At the end of a task: s <- (s + s_task) / 2 (s = s_task after the first task), and both F
and s are rescaled to [0, 1] by their min and max over all parameters, (x - min) / (max -
min + 1e-32). Training later tasks adds

    penalty = lambda * sum_i (F^_i + s^_i) (theta_i - theta*_i)^2      (no 1/2, as the code)

anchored at the weights theta* of the end of the previous task. The penalty is SI's with
Omega = F^ + s^, so SI's code (the unregularised gradient, the path integral, the penalty)
is reused as is.

Where this follows the authors' TensorFlow code (facebookresearch/agem, model/model.py and
the RWALK branch of its training scripts): alpha = 0.9 (FISHER_EMA_DECAY), k = 10
(FISHER_UPDATE_AFTER; 50 in the CIFAR script), xi = 1e-3 (PARAM_XI_STEP), lambda = 1 (the
MNIST and CIFAR runs of replicate_results_iclr19.sh), min-max normalisation, no 1/2 in the
penalty. Where it differs, following the paper: the 1/2 in the score's denominator (the code
omits it; only its ratio to xi matters after the normalisation); the score averaged as
(s + s_task) / 2 (the code's assign_add gives 1.5 s + 0.5 s_task); the Fisher is averaged
over each interval's own k steps (the code divides an accumulator reset only at task ends
by k); the score of an interval uses the Fisher updated with that interval (the code, the
one before); a last partial interval is counted at the task's end.

EWC++ alone is `ewcpp`: the same method with `path_score: false` (penalty lambda sum F^ (theta
- theta*)^2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engram.schema import opt
from engram.methods.base import Batch, Context
from engram.methods.si import SI


@dataclass
class RWalkParams:
    strength: float = opt(1.0, "lambda: weight of the penalty (authors' runs: 1)", low=0.0)
    alpha: float = opt(0.9, "EWC++: weight of the newest squared gradients in the Fisher's "
                       "moving average (authors' code: 0.9)", low=0.0, high=1.0)
    update_every: int = opt(10, "k: steps per Fisher update and per path-score interval "
                            "(authors' code: 10 for MNIST, 50 for CIFAR)", low=1)
    damping: float = opt(1e-3, "xi: keeps the path score finite for weights that barely "
                         "moved (authors' code: 1e-3)", low=0.0)
    path_score: bool = opt(True, "add the path score s to the Fisher (false: EWC++ alone)")


@dataclass
class EWCppParams(RWalkParams):
    path_score: bool = opt(False, "add RWalk's path score s to the Fisher (EWC++: false)")


def min_max_normalise(maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor rescaled by the min and max over ALL of them: (x - min) / (max - min + 1e-32)."""
    low = min(float(t.min()) for t in maps.values())
    high = max(float(t.max()) for t in maps.values())
    return {name: (t - low) / (high - low + 1e-32) for name, t in maps.items()}


class RWalk(SI):
    """RWalk: EWC++ online Fisher plus a Fisher-normalised path score, one anchor."""

    Params = RWalkParams

    def __init__(self, params: RWalkParams | None = None) -> None:
        super().__init__(params)
        # SI's omega is the penalty's weight F^ + s^ and SI's path is w (reset every k steps)
        self.fisher: dict[str, torch.Tensor] = {}        # F, the running EWC++ Fisher
        self.score: dict[str, torch.Tensor] = {}         # s, averaged over finished tasks
        self.task_score: dict[str, torch.Tensor] = {}    # s_task, this task's intervals
        self.squared_grads: dict[str, torch.Tensor] = {}  # sum of g^2 in this interval
        self.interval_start: dict[str, torch.Tensor] = {}  # theta at this interval's start
        self.interval_steps = 0

    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)  # SI: path w <- 0
        for name, p in ctx.model.named_parameters():
            self.task_score[name] = torch.zeros_like(p)
            self.fisher.setdefault(name, torch.zeros_like(p))
        self._start_interval(ctx)

    def _start_interval(self, ctx: Context) -> None:
        for name, p in ctx.model.named_parameters():
            self.interval_start[name] = p.detach().clone()
            self.squared_grads[name] = torch.zeros_like(p)
            self.path[name].zero_()
        self.interval_steps = 0

    def after_step(self, batch: Batch, ctx: Context) -> None:
        super().after_step(batch, ctx)  # SI: w += -g delta_theta with the unregularised g
        for name in self.squared_grads:
            self.squared_grads[name] += self._grad[name].pow(2)
        self.interval_steps += 1
        if self.interval_steps == self.params.update_every:
            self._end_interval(ctx)

    def _end_interval(self, ctx: Context) -> None:
        """EWC++'s Fisher update, then the interval's path score in the updated metric."""
        alpha = self.params.alpha
        for name, p in ctx.model.named_parameters():
            new = self.squared_grads[name] / self.interval_steps
            self.fisher[name] = alpha * new + (1 - alpha) * self.fisher[name]
            moved = p.detach() - self.interval_start[name]
            distance = 0.5 * self.fisher[name] * moved.pow(2) + self.params.damping
            self.task_score[name] += torch.relu(self.path[name] / distance)
        self._start_interval(ctx)

    def after_task(self, ctx: Context) -> None:
        if self.interval_steps > 0:  # a last, shorter interval
            self._end_interval(ctx)
        if self.score:
            self.score = {n: (self.score[n] + self.task_score[n]) / 2 for n in self.score}
        else:
            self.score = {n: s.clone() for n, s in self.task_score.items()}
        importance = min_max_normalise(self.fisher)
        if self.params.path_score:
            score = min_max_normalise(self.score)
            importance = {n: importance[n] + score[n] for n in importance}
        self.omega = importance
        self.anchor = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
        self._grad, self._before = {}, {}

    def state_dict(self) -> dict[str, Any]:
        # the interval's sums and path are rebuilt by before_task; checkpoints sit between tasks
        return {**super().state_dict(), "fisher": self.fisher, "score": self.score}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.fisher, self.score = dict(state["fisher"]), dict(state["score"])


class EWCpp(RWalk):
    """EWC++ (Chaudhry et al. 2018): RWalk's online Fisher alone, one anchor."""

    Params = EWCppParams
