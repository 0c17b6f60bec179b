"""SI: synaptic intelligence (Zenke, Poole & Ganguli 2017, "Continual learning through
synaptic intelligence", ICML).

During training each parameter accumulates a path integral of its contribution to the
drop in the task loss; at the end of a task it becomes an importance:

    per step:     w_i += -g_i * delta_theta_i        g = gradient of the UNregularised task
                                                     loss, delta_theta = the update the
                                                     optimizer actually applied
    end of task:  Omega_i <- relu(Omega_i + w_i / ((theta_i(end) - theta_i(start))^2 + xi))
                  w_i <- 0,  theta~ <- theta(end)
    penalty:      c * sum_i Omega_i (theta_i - theta~_i)^2       (no 1/2, as in the paper's code)

Variant implemented: Zenke's (ReLU on the accumulated Omega, unregularised gradient, summed
across tasks), as in ganguli-lab/pathint. The unregularised gradient is p.grad minus SI's
own penalty gradient 2 c Omega (theta - theta~), which the runner adds in closed form
(`QuadraticPenalty`) before after_backward; penalties of other methods composed with SI are
not removed. Hyperparameters: strength = c, damping = xi.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engram.schema import opt
from engram.methods.base import Batch, Context, Method, QuadraticPenalty


@dataclass
class SIParams:
    strength: float = opt(1.0, "c: weight of the quadratic penalty", low=0.0)
    damping: float = opt(0.1, "xi: keeps Omega finite for weights that barely moved", low=0.0)


class SI(Method):
    """Synaptic intelligence: path-integral importance, one anchor."""

    Params = SIParams
    batchable = True  # its seeds may train as one stacked network (batch_seeds)

    def __init__(self, params: SIParams | None = None) -> None:
        super().__init__(params)
        self.omega: dict[str, torch.Tensor] = {}        # Omega, summed over finished tasks
        self.anchor: dict[str, torch.Tensor] = {}       # theta~ (end of the previous task)
        self.path: dict[str, torch.Tensor] = {}         # w, this task's path integral
        self.task_start: dict[str, torch.Tensor] = {}   # theta at the start of this task
        self._grad: dict[str, torch.Tensor] = {}        # unregularised gradient of this step
        self._before: dict[str, torch.Tensor] = {}      # parameters before this step

    def before_task(self, ctx: Context) -> None:
        for name, p in ctx.model.named_parameters():
            self.task_start[name] = p.detach().clone()
            self.path[name] = torch.zeros_like(p)

    def quadratic_penalties(self, ctx: Context) -> list[QuadraticPenalty]:
        if not self.omega:
            return []
        names, params = zip(*ctx.model.named_parameters())
        # c sum Omega (theta - theta~)^2 is (lambda / 2) sum ... with lambda = 2c
        return [QuadraticPenalty(2 * self.params.strength, params,
                                 [self.omega[name] for name in names],
                                 [self.anchor[name] for name in names])]

    def after_backward(self, ctx: Context) -> None:
        for name, p in ctx.model.named_parameters():
            grad = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            if self.omega:  # remove SI's own penalty gradient: 2 c Omega (theta - theta~)
                grad -= 2 * self.params.strength * self.omega[name] * (p.detach() - self.anchor[name])
            self._grad[name] = grad
            self._before[name] = p.detach().clone()

    def after_step(self, batch: Batch, ctx: Context) -> None:
        for name, p in ctx.model.named_parameters():
            delta = p.detach() - self._before[name]
            self.path[name] -= self._grad[name] * delta

    def after_task(self, ctx: Context) -> None:
        for name, p in ctx.model.named_parameters():
            theta = p.detach().clone()
            moved = (theta - self.task_start[name]).pow(2) + self.params.damping
            old = self.omega.get(name, torch.zeros_like(theta))
            self.omega[name] = torch.relu(old + self.path[name] / moved)
            self.anchor[name] = theta
        self._grad, self._before = {}, {}

    def state_dict(self) -> dict[str, Any]:
        # path and task_start are rebuilt by before_task; checkpoints sit between tasks
        return {"omega": self.omega, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.omega, self.anchor = dict(state["omega"]), dict(state["anchor"])
