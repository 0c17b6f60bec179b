"""MC-SGD: mode-connectivity SGD (Mirzadeh, Farajtabar, Gorur, Pascanu & Ghasemzadeh 2021,
"Linear mode connectivity in multitask and continual learning", ICLR).

Task k is learned in two stages:

1. The runner's loop trains from w̄_{k-1} (the merged solution of the previous task) to the
   continual solution ŵ_k with the plain task-k loss; this method adds nothing to the loop.
2. At the task's end (k >= 2) a point w̄_k is sought that is linearly connected, with low
   loss all along both straight lines, to w̄_{k-1} on the earlier tasks and to ŵ_k on task k:

       w̄_k = argmin_w  sum_{a in A} [ L_mem(w̄_{k-1} + a (w - w̄_{k-1}))
                                      + L_k (ŵ_k     + a (w - ŵ_k    )) ]

   A = {0, 1/n, ..., 1} (n = `line_samples`, n + 1 points, as `arange(0, 1.01, 1/n)` in
   CL-Gym and sequel); L_mem is the mean training loss (`ctx.loss_fn`: cross-entropy, or
   squared error on a regression) on a small episodic memory of the
   earlier tasks (`memory_per_task` examples of each, drawn uniformly without replacement
   from a task's training set when it ends); L_k is the mean training loss on task k's
   training data. The search starts at w = w̄_{k-1} + init_position (ŵ_k - w̄_{k-1}) and
   runs `lmc_steps` steps of SGD with heavy-ball momentum (PyTorch's convention:
   v <- m v + g, w <- w - lr v) on mini-batches: each step draws `lmc_batch_size` memory
   examples and as many task-k examples (with `ctx.generator`, without replacement within
   a step) and uses the same two batches at every point of the two lines.

   Gradient: each interpolated point is built from w inside the graph and the network is
   evaluated on it with `torch.func.functional_call`, so autograd gives the true gradient
   of the objective, sum_a a * grad L(point_a): the chain-rule factor a is INCLUDED. Both
   reimplementations (CL-Gym, sequel) add the raw grad L(point_a) without it (reference
   sheet, pitfall 1), which over-weights the points near the fixed ends; the a = 0 points
   are constants here and contribute no gradient.

Then w̄_k is loaded into the model: it is evaluated after task k and task k + 1 starts from
it (CL-Gym's behaviour and the paper's Algorithm; sequel instead evaluates w̄_k but reverts
the network to ŵ_k before training the next task). Task 1: w̄_1 = ŵ_1.

Multi-head (task-incremental): every memory example is evaluated with the head of its own
stored task id. Domain/class-incremental: the single head, as in the paper's other settings;
nothing changes. The network is in eval mode during the search (no dropout noise; CL-Gym
and sequel do the same for the point losses); the nets here have no batch norm, so the
reference sheet's pitfall 2 (statistics not interpolated) does not arise.

Simplifications against the paper and the reimplementations:
- several mini-batch steps (`lmc_steps`) instead of the reimplementations' single
  full-batch step (the paper's number of steps and per-benchmark lr were not checked);
- task k's loss uses all of its training data (sequel: a subset of memory_per_task
  examples), drawn in mini-batches;
- the objective is the plain sum over A and both lines (as in the formula and both codes),
  not a mean, so `lmc_lr` is per summed gradient;
- defaults are sequel's (memory 100 per task, momentum 0.8, batch 64, init 0.1, 10 line
  samples) except the learning rate: sequel's 0.05 on the summed objective overshot on split
  digits (one merge jumped from 2.9 to 30 at its first step and left a dead network), 0.01
  did not, on the validation split of all three scenarios; `lmc_steps` = 100 was set there
  too (10 steps leave the merge short of low memory loss in class-incremental learning).

Memory kept between tasks (extra_bytes): the episodic memory (x, y and task id of
memory_per_task examples per finished task) plus one copy of w̄ (P floats). During the search
it also holds ŵ_k, w and the momentum (3P floats more), freed when the task ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.func import functional_call

from engram.schema import opt
from engram.data.streams import TensorSet
from engram.errors import DivergenceError
from engram.methods.base import Context, Method, random_subset

Weights = dict[str, torch.Tensor]  # parameter name -> tensor, in model.named_parameters() order
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, targets) -> scalar


@dataclass
class MCSGDParams:
    memory_per_task: int = opt(100, "episodic-memory examples stored per finished task", low=1)
    line_samples: int = opt(10, "n: the line points are a = 0, 1/n, ..., 1 (n + 1 points)", low=1)
    init_position: float = opt(0.1, "the search starts at w̄_prev + this * (ŵ - w̄_prev)",
                               low=0.0, high=1.0)
    lmc_lr: float = opt(0.01, "learning rate of the connectivity search (on the summed objective)",
                        low=0.0)
    lmc_momentum: float = opt(0.8, "heavy-ball momentum of the connectivity search", low=0.0,
                              high=0.999)
    lmc_batch_size: int = opt(64, "memory examples and task examples per search step", low=1)
    lmc_steps: int = opt(100, "SGD steps of the connectivity search at each task end (k >= 2)",
                         low=0)


def line_points(n: int) -> list[float]:
    """A = [0, 1/n, ..., 1]: n + 1 evenly spaced points of [0, 1]."""
    return [i / n for i in range(n + 1)]


def line_loss(model: torch.nn.Module, w: Weights, start: Weights, points: list[float],
              data: TensorSet, loss_fn: LossFn) -> torch.Tensor:
    """sum_{a in points} loss_fn(model with weights start + a (w - start); data), loss_fn
    being the problem's training loss (ctx.loss_fn).

    The points are built from w inside the graph, so the gradient wrt w carries the chain-
    rule factor a of each point. Parameters not in `w` keep the model's own values.
    """
    total = torch.zeros((), device=data.y.device)
    for a in points:
        weights = {name: start[name] + a * (w[name] - start[name]) for name in w}
        logits = functional_call(model, weights, (data.x, data.task))  # (B, K)
        total = total + loss_fn(logits, data.y)
    return total


def connectivity_objective(model: torch.nn.Module, w: Weights, w_bar_prev: Weights,
                           w_hat: Weights, points: list[float], memory: TensorSet,
                           current: TensorSet, loss_fn: LossFn) -> torch.Tensor:
    """MC-SGD's objective: the memory loss along w̄_prev -> w plus the task loss along ŵ -> w."""
    return (line_loss(model, w, w_bar_prev, points, memory, loss_fn)
            + line_loss(model, w, w_hat, points, current, loss_fn))


def _draw(data: TensorSet, size: int, generator: torch.Generator) -> TensorSet:
    """`size` examples of `data` without replacement (all of them if it holds fewer)."""
    pick = torch.randperm(len(data), generator=generator)[:size].to(data.y.device)
    return TensorSet(*(part[pick] for part in data))


def _weights(model: torch.nn.Module) -> Weights:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


class MCSGD(Method):
    """Merge each continual solution with the previous merged one along low-loss lines."""

    Params = MCSGDParams
    # The line search evaluates interpolated weights in training mode: BatchNorm layers would
    # fold those points' batch statistics into the merged network's running statistics.
    model_needs = ("no_batch_norm",)

    def __init__(self, params: MCSGDParams | None = None) -> None:
        super().__init__(params)
        self.memory: TensorSet | None = None  # earlier tasks: x (M, ...), y (M,), task (M,)
        self.w_bar: Weights | None = None     # w̄ of the last finished task

    def after_task(self, ctx: Context) -> None:
        if ctx.task.index > 0 and self.w_bar is not None:
            merged = self.connect(ctx)
            with torch.no_grad():
                for name, p in ctx.model.named_parameters():
                    p.copy_(merged[name])
        self.w_bar = _weights(ctx.model)  # w̄_k (w̄_1 = ŵ_1)
        stored = random_subset(ctx.task.train, self.params.memory_per_task, ctx.generator)
        self.memory = stored if self.memory is None else TensorSet.concat([self.memory, stored])

    def connect(self, ctx: Context) -> Weights:
        """Run the connectivity search from the initial point; return w̄_k (detached)."""
        p, model = self.params, ctx.model
        w_hat = _weights(model)
        w = {name: (self.w_bar[name] + p.init_position * (w_hat[name] - self.w_bar[name]))
             .requires_grad_(True) for name in w_hat}
        velocity = {name: torch.zeros_like(t) for name, t in w.items()}
        points = line_points(p.line_samples)
        was_training = model.training
        model.eval()  # no dropout noise in the point losses
        last = torch.zeros(())
        for _ in range(p.lmc_steps):
            memory = _draw(self.memory, p.lmc_batch_size, ctx.generator)
            current = _draw(ctx.task.train, p.lmc_batch_size, ctx.generator)
            loss = connectivity_objective(model, w, self.w_bar, w_hat, points, memory, current,
                                          ctx.loss_fn)
            grads = torch.autograd.grad(loss, list(w.values()))
            with torch.no_grad():
                for (name, weight), grad in zip(w.items(), grads):
                    velocity[name].mul_(p.lmc_momentum).add_(grad)
                    weight.sub_(p.lmc_lr * velocity[name])
            last = loss.detach()
        model.train(was_training)
        finite = torch.isfinite(last) and all(bool(torch.isfinite(t).all()) for t in w.values())
        if not finite:  # also after the last update, whose objective was never evaluated
            raise DivergenceError(
                f"MC-SGD's connectivity search diverged after task {ctx.task.index + 1} (objective "
                f"{float(last)}); lower the method's lmc_lr (now {p.lmc_lr})")
        return {name: t.detach() for name, t in w.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"memory": None if self.memory is None else list(self.memory),
                "w_bar": self.w_bar}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory = None if state["memory"] is None else TensorSet(*state["memory"])
        self.w_bar = state["w_bar"]
