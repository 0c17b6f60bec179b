"""Shrink and perturb (S&P): scale the weights down and add noise, to keep a network trainable.

Two variants, chosen by `every`:

- `every: task` (default; Ash & Adams, "On warm-starting neural network training", NeurIPS
  2020; code JordanAsh/warm_start run.py, shrink_perturb()): once at the start of every task
  but the first (when new data arrives, before training on it),

      theta <- shrink * theta + perturb * theta_fresh,

  theta_fresh being a freshly initialised copy of the network (every module's own
  reset_parameters, so each layer's noise follows its own initial distribution). Defaults
  shrink 0.4, perturb 0.1 (the code's and README's). shrink 0, perturb 1 is a fresh random
  start; shrink 1, perturb 0 is a pure warm start.
- `every: step` (Dohare et al., Nature 2024; LoP lop/algos/bp.py Backprop.perturb): after
  every optimizer step,

      theta <- shrink * theta + perturb * eps,   eps ~ N(0, 1) per weight and bias,

  i.e. perturb is the noise std sigma. Dohare's shrink is the optimizer's coupled weight
  decay: with SGD at learning rate alpha, weight_decay lambda multiplies theta by
  (1 - alpha * lambda) every step, so set `train.weight_decay` and leave shrink at its step
  default 1 (with momentum or Adam the decay is not a plain factor). Defaults here: shrink
  1, perturb 1e-4 (Dohare's permuted-MNIST sigma grid is {1e-4, 1e-5, 1e-6}, with weight
  decay 1e-4 at alpha 0.003).

Left null, shrink and perturb take their mode's default. Every parameter of the model
(weights, biases, heads) is shrunk and perturbed, as in both codes. All noise comes from
ctx.generator: the step noise is drawn on the CPU and moved to the device; the fresh
network is initialised on a CPU copy under a CPU seed drawn from ctx.generator (the global
RNG is saved and restored around it). S&P keeps no state between tasks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from engram.schema import opt
from engram.methods.base import Batch, Context, Method

DEFAULTS = {"task": (0.4, 0.1), "step": (1.0, 1e-4)}  # every -> (shrink, perturb)


@dataclass
class ShrinkPerturbParams:
    every: Literal["task", "step"] = opt("task", "task: once per new task with a fresh init "
                                         "(Ash & Adams 2020); step: after every step with "
                                         "Gaussian noise (Dohare et al. 2024)")
    shrink: float | None = opt(None, "factor on the weights (null: 0.4 per task, 1 per step: "
                               "use train.weight_decay as Dohare)", low=0.0, high=1.0)
    perturb: float | None = opt(None, "task: weight of a fresh initialisation (null: 0.1); "
                                "step: std of the Gaussian noise (null: 1e-4)", low=0.0)

    def resolved(self) -> tuple[float, float]:
        """(shrink, perturb) with the mode's defaults filled in."""
        shrink, perturb = DEFAULTS[self.every]
        return (shrink if self.shrink is None else self.shrink,
                perturb if self.perturb is None else self.perturb)


def fresh_parameters(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A fresh initialisation of `model`'s parameters {name: tensor on the model's device}:
    every submodule's reset_parameters() on a CPU copy, seeded from `generator`."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    fresh = copy.deepcopy(model).cpu()
    with torch.random.fork_rng(devices=[]):  # leave the global CPU RNG as it was
        torch.manual_seed(seed)
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    devices = {name: p.device for name, p in model.named_parameters()}
    return {name: p.detach().to(devices[name]) for name, p in fresh.named_parameters()}


class ShrinkPerturb(Method):
    """Shrink and perturb, once per task (Ash & Adams 2020) or after every step (Dohare 2024)."""

    Params = ShrinkPerturbParams

    def before_task(self, ctx: Context) -> None:
        if self.params.every != "task" or ctx.task is None or ctx.task.index == 0:
            return  # the first task starts from a fresh network already
        shrink, perturb = self.params.resolved()
        fresh = fresh_parameters(ctx.model, ctx.generator)
        with torch.no_grad():
            for name, p in ctx.model.named_parameters():
                p.mul_(shrink).add_(fresh[name], alpha=perturb)

    def after_step(self, batch: Batch, ctx: Context) -> None:
        if self.params.every != "step":
            return
        shrink, perturb = self.params.resolved()
        with torch.no_grad():
            for p in ctx.model.parameters():
                noise = torch.randn(p.shape, generator=ctx.generator, dtype=p.dtype)
                p.mul_(shrink).add_(noise.to(p.device), alpha=perturb)
