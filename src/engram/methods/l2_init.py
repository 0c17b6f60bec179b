"""L2 Init: regularise toward the initial weights (Kumar, Marklund & Van Roy, "Maintaining
plasticity in continual learning via regenerative regularization", arXiv 2308.11958).

    loss = task loss + lambda * sum_j (theta_j - theta_0,j)^2      (no 1/2, as the paper)

theta_0 is the run's own initial draw: the parameters as prepare_model receives them (the
runner calls it right after building the seeded model, before any training or checkpoint
load), kept fixed for the whole run; its gradient 2 lambda (theta - theta_0) is added in
closed form (`QuadraticPenalty`). Plain L2
(weight decay) is the same with theta_0 = 0. Every parameter counts (weights, biases, heads).
A parameter that appears later (a method that grows the network) is anchored at its value
at the start of the first task that has it, i.e. its own initial draw. The penalty is added
to the loss, not applied as decoupled (AdamW-style) decay, which would change its strength
under Adam. The memory bill is one copy of the initial parameters (4P bytes in float32).
Hyperparameter: strength = lambda; the paper's grid was not checked, the default 0.01 is
engram's choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engram.schema import opt
from engram.methods.base import Context, Method, QuadraticPenalty


@dataclass
class L2InitParams:
    strength: float = opt(0.01, "lambda: weight of ||theta - theta_0||^2", low=0.0)


class L2Init(Method):
    """Quadratic penalty pulling every parameter back to its initial value."""

    Params = L2InitParams
    batchable = True  # its seeds may train as one stacked network (batch_seeds)

    def __init__(self, params: L2InitParams | None = None) -> None:
        super().__init__(params)
        self.initial: dict[str, torch.Tensor] = {}  # theta_0 by parameter name
        self._one: torch.Tensor | None = None  # the penalty's precision, a 0-d 1

    def prepare_model(self, model: nn.Module, ctx: Context) -> nn.Module:
        self._remember_new_parameters(model)
        return model

    def before_task(self, ctx: Context) -> None:
        self._remember_new_parameters(ctx.model)

    def _remember_new_parameters(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name not in self.initial:
                self.initial[name] = p.detach().clone()

    def quadratic_penalties(self, ctx: Context) -> list[QuadraticPenalty]:
        anchored = [(name, p) for name, p in ctx.model.named_parameters() if name in self.initial]
        if not anchored:
            return []
        device = anchored[0][1].device
        if self._one is None or self._one.device != device:  # every weight counts alike
            self._one = torch.ones((), device=device)
        one = self._one
        # lambda sum (theta - theta_0)^2 is (lambda' / 2) sum ... with lambda' = 2 lambda
        return [QuadraticPenalty(2 * self.params.strength, [p for _, p in anchored],
                                 [one] * len(anchored),
                                 [self._initial_on(name, p.device) for name, p in anchored])]

    def _initial_on(self, name: str, device: torch.device) -> torch.Tensor:
        """theta_0 of `name` on `device` (moved once if the model moved after prepare_model)."""
        if self.initial[name].device != device:
            self.initial[name] = self.initial[name].to(device)
        return self.initial[name]

    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial = dict(state["initial"])
