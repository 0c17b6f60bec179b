"""ReDo: recycle dormant units (Sokar, Agarwal, Castro & Evci, "The dormant neuron phenomenon
in deep reinforcement learning", ICML 2023; code google/dopamine labs/redo; Dohare's port
LoP lop/algos/gntRedo.py).

Every `every` optimizer steps (global step count, after the step), for every hidden layer l
of an mlp body, on the activations h (N, n) of the training examples of the last `window`
steps (default 1: that step's batch, as LoP's port; the plasticity problems train on one
example per step, where one example cannot tell a dormant unit from one that is merely off
for it, so give them a window such as 256, dopamine's sample size):

    s_i = mean_N |h_i| / ( (1/n) sum_k mean_N |h_k| + 1e-9 )      (the code's 1e-9)

and every tau-dormant unit (s_i <= tau; tau = 0 picks exactly the dead units) gets:
fresh input weights W_l[i, :] ~ U(-b, b) from the layer's initial distribution (`init`, the
same bounds as continual_backprop; by default PyTorch's nn.Linear init U(-1/sqrt(fan_in),
1/sqrt(fan_in)), which engram's networks start from; `kaiming`, the activation's gain, is
LoP's port's choice, whose networks start from that distribution),
bias b_l[i] = 0, outgoing weights W_{l+1}[:, i] = 0 (init_method_outgoing='zero'), so the
network's output does not change except through the unit's old mean output (ReDo makes no
bias correction). The output layer is never recycled. All layers are scored on the same
forward pass before any is reset (a weight between new units of two consecutive layers ends
at 0, as in continual_backprop). Hidden units, hooks and new rows are those of
`engram.methods.continual_backprop` (forward hooks on the activation modules, armed in
make_batch for the steps of the window only). The sums of |h| over a window that a
checkpoint cuts in two are part of the state.

Differences from the code: the dopamine code redraws with the network's own initialiser
(xavier_uniform there; engram's default does the same for its own networks) and zeroes the recycled weights' Adam moments; engram cannot reach the
runner's optimizer (a fresh one is made each task), so moments are not reset. The statistic
is the training batch (dopamine: a separate 256-state replay sample; LoP: the current
minibatch, as here). Defaults tau 0.1 (the paper's high-replay-ratio value; 0.025 otherwise)
and F = 1000 (the paper's, not the code's 200k) are from memory, unverified. mlp bodies only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engram.schema import opt
from engram.errors import ConfigError
from engram.methods.base import Batch, Context, Method
from engram.metrics.plasticity import scores_from_activity  # the one ReDo score formula
from engram.methods.continual_backprop import (ActivationRecorder, HiddenLayer, Init,
                                               draw_input_rows, hooked_layers, reinitialise_units,
                                               zero_outgoing)



@dataclass
class ReDoParams:
    tau: float = opt(0.1, "a unit is dormant when its normalised mean |activation| is <= tau",
                     low=0.0)
    every: int = opt(1000, "F: look for dormant units every F optimizer steps", low=1)
    init: Init = opt("default", "distribution of new input weights: default (PyTorch's "
                     "nn.Linear init, which engram's networks start from), kaiming (activation "
                     "gain, as LoP), lecun, xavier, zeros")
    window: int = opt(1, "the statistic uses the training examples of the last `window` steps "
                      "up to the scoring step (1: its batch alone)", low=1)

    def __post_init__(self) -> None:
        if self.window > self.every:
            raise ConfigError(f"redo.window: {self.window} is longer than redo.every "
                              f"({self.every}); windows would overlap")


def dormancy_scores(h: torch.Tensor) -> torch.Tensor:
    """s_i = mean_B |h_i| / (mean over units of mean_B |h_k| + 1e-9). h (B, n) -> (n,)."""
    return scores_from_activity(h.abs().mean(0))


class ReDo(Method):
    """Every F steps, reinitialise the tau-dormant hidden units (zero outgoing weights)."""

    Params = ReDoParams
    model_needs = ("hidden_units",)

    def __init__(self, params: ReDoParams | None = None) -> None:
        super().__init__(params)
        self.layers: list[HiddenLayer] = []
        self.recorder = ActivationRecorder()
        self.recycled: dict[str, int] = {}  # layer -> units recycled so far
        self.last_recycled: dict[str, torch.Tensor] = {}  # layer -> units recycled this step
        self.activity: dict[str, torch.Tensor] = {}  # layer -> sum of |h| over the window (n,)
        self.examples = 0                            # examples summed in the window so far

    def prepare_model(self, model: nn.Module, ctx: Context) -> nn.Module:
        self.layers = hooked_layers(model, self.recorder, "redo")
        for layer in self.layers:
            self.recycled.setdefault(layer.name, 0)
        return model

    def _steps_to_scoring(self, ctx: Context) -> int:
        """0 on a scoring step; ctx.step counts the steps before this one."""
        return -(ctx.step + 1) % self.params.every

    def make_batch(self, batch: Batch, ctx: Context) -> Batch:
        if self._steps_to_scoring(ctx) < self.params.window:
            self.recorder.arm()
        return batch

    def after_step(self, batch: Batch, ctx: Context) -> None:
        wait = self._steps_to_scoring(ctx)
        if wait >= self.params.window:
            return
        batch_size = 0
        for layer in self.layers:  # sum |h| over the window's examples
            h = self.recorder.take(layer.name)  # (B, n)
            previous, total = self.activity.get(layer.name), h.abs().sum(0)  # (n,)
            self.activity[layer.name] = total if previous is None else previous + total
            batch_size = len(h)
        self.examples += batch_size
        if wait == 0:
            self._recycle(ctx)

    def _recycle(self, ctx: Context) -> None:
        """Reinitialise the tau-dormant units of every layer; start a new window."""
        activity = {name: total / self.examples for name, total in self.activity.items()}
        self.activity, self.examples = {}, 0
        self.last_recycled = {}
        for layer in self.layers:
            dormant = torch.nonzero(scores_from_activity(activity[layer.name]) <= self.params.tau)
            units = dormant.flatten()  # (k,)
            if len(units):
                rows = draw_input_rows(layer, len(units), self.params.init, ctx.generator)
                reinitialise_units(layer, units, rows, mean_hat=None)
                self.recycled[layer.name] += len(units)
            self.last_recycled[layer.name] = units
        zero_outgoing([(layer, self.last_recycled[layer.name]) for layer in self.layers])

    def state_dict(self) -> dict[str, Any]:
        return {"recycled": dict(self.recycled), "activity": dict(self.activity),
                "examples": self.examples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recycled, self.activity = dict(state["recycled"]), dict(state["activity"])
        self.examples = state["examples"]
