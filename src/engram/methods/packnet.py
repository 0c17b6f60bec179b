"""PackNet: pack several tasks into one network by iterative pruning (Mallya & Lazebnik,
CVPR 2018, "PackNet: Adding Multiple Tasks to a Single Network by Iterative Pruning").

Every Linear/Conv2d weight of `model.body` has an owner (uint8 map, 0 = free, t = task t).
For each task t (1-based), inside the runner's one training loop:

1. before the task, every free weight becomes owned by t (`make_finetuning_mask`);
2. train: after each backward pass the gradient of every masked weight with owner != t is
   zeroed (`make_grads_zero`), so only t's weights learn;
3. at step (1 - retrain_fraction) * S of the task's S = epochs * ceil(N / batch_size) steps,
   per layer, the `prune` fraction of t's weights with the smallest |w| is set to 0 and
   freed (owner 0). As in the authors' code the cutoff is the k-th smallest |w| with
   k = round(prune * n_t), and every weight of t with |w| <= cutoff goes (ties included);
4. retrain the survivors for the remaining steps; the freed weights get zero gradient and
   are set back to 0 after every step (`make_pruned_zero`: the optimizer's moments from
   before the prune would otherwise move them);
5. the survivors are frozen for good. The last task of the stream is not pruned (it keeps
   every weight still free, as the reference scripts' `-1`).

At test time a task-t example sees only the weights with owner in 1..t (free and later
tasks' weights zeroed, `apply_mask(t)`), so with the task id given (task-incremental
learning) task t's outputs do not move at all after task t: its weights, the biases and its
head are bit-identical (see "frozen" below) and so is every input to its forward pass.
`eval_model` returns a module that picks these weights per example with
`torch.func.functional_call`, one call per distinct task id in the batch.

What is frozen, and why it is exact: gradients are zeroed from the first step of every
task and the runner makes a fresh optimizer each task, so Adam's / SGD-momentum's state of a
frozen weight stays exactly zero and its update is exactly 0 (pitfall 1 of the reference
sheet). Weight decay would still move frozen weights, so train.weight_decay > 0 is a
ConfigError, as is train.optimizer_policy: carry (moments carried into the next task), and so is composing PackNet with a method that recomputes the gradient after
the mask (SAM, A-GEM, OGD: see Compose). Biases of the body (and any body parameter that is not a masked weight) are
trained with task 1 and frozen afterwards: the reference's default `nobias`, which freezes
the pretrained network's biases; engram starts from random weights, so task 1 sets them.

PackNet is a task-incremental method: it needs the task id to pick the weights. Heads:
- task-incremental: one head per task; only the current task's head rows receive a
  gradient (also enforced in `after_backward`), so earlier heads are frozen too;
- domain- and class-incremental: the one head is shared and trained by every task, and the
  live model is evaluated. At the end of task t the live model's body holds exactly the
  weights of tasks 1..t (the pruned ones are 0), i.e. every example is answered with all
  tasks' weights so far and the shared head as last trained: the body of earlier tasks does
  not move, but the shared head forgets as in plain fine-tuning.

Simplifications against the paper/code: no ImageNet-pretrained, 50%-pruned start (task 1
trains from random weights, all of them free); one prune fraction for every task (the
scripts use one per task, 0.75 for their three tasks); training and post-prune retraining
are one run of the runner's optimizer at its learning rate (the code fine-tunes 20 epochs
with a decayed lr, then retrains 10 epochs at lr 1e-4 with a new optimizer); engram bodies
have no BatchNorm, so no BN statistics are kept per task (pitfall 2).
If another composed method changes how many steps the task has, the prune step comes from
the task's own training-set size; a task that ends before it is pruned in `after_task`.

Memory (`extra_bytes`): the owner maps at 1 byte per masked weight, as the reference code
keeps them; ceil(log2(T + 1)) bits per weight would suffice. Biases and heads live in the
model itself (frozen, not copied), so nothing else is kept beyond the live model.
Hyperparameters: prune (fraction freed per layer after each task but the last),
retrain_fraction (share of the task's steps after the prune). Default prune 0.75, the
scripts' value: on 5-task split digits (val split, seed 0) prune 0.5 leaves the last task
1/16 of the weights (0.90 val accuracy on it, 0.979 on average), 0.75 and 0.9 give 1.000.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from engram.schema import opt
from engram.errors import ConfigError
from engram.methods.base import Context, Method, task_ids_at_test


@dataclass
class PackNetParams:
    prune: float = opt(0.75, "fraction of the current task's weights freed per layer after it "
                       "trains (every task but the last)", low=0.0, high=0.99)
    retrain_fraction: float = opt(0.25, "share of each task's steps spent retraining the "
                                  "survivors after the prune", low=0.0, high=0.9)


def masked_weight_names(model: nn.Module) -> list[str]:
    """Names (as in model.named_parameters()) of every Linear/Conv2d weight of model.body."""
    return [f"body.{name}.weight" for name, module in model.body.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))]


def prune_smallest(weight: torch.Tensor, owner: torch.Tensor, task: int,
                   fraction: float) -> torch.Tensor:
    """The owner map after freeing the `fraction` of task `task`'s weights with the smallest
    |w|: cutoff = k-th smallest |w| among them, k = round(fraction * n); every weight of the
    task with |w| <= cutoff gets owner 0 (ties at the cutoff too, as the reference's `le`).
    weight and owner have the same shape; other tasks' weights are never touched."""
    mine = owner == task
    magnitudes = weight[mine].abs()  # (n,)
    rank = round(fraction * magnitudes.numel())  # Python round, as the reference
    if rank == 0:
        return owner.clone()
    cutoff = magnitudes.kthvalue(rank).values
    return owner.masked_fill(mine & (weight.abs() <= cutoff), 0)


def weights_for_task(weight: torch.Tensor, owner: torch.Tensor, task: int) -> torch.Tensor:
    """`weight` with every entry not owned by tasks 1..task (free or later) set to +0."""
    keep = (owner > 0) & (owner <= task)
    return torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


class PackNetEvalNet(nn.Module):
    """`net(x, task) -> logits` where the examples of task t (0-based id t - 1) are answered
    by the model with only the weights of tasks 1..t (`weights_for_task`)."""

    def __init__(self, model: nn.Module, owners: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model = model  # a submodule, so evaluate()'s eval()/train() reach it
        self.owners = owners
        self.train(model.training)  # evaluate() restores this flag on the model afterwards

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        out: torch.Tensor | None = None
        for task_id in torch.unique(task).tolist():
            rows = task == task_id  # (B,)
            masked = {name: weights_for_task(params[name], owner, task_id + 1)
                      for name, owner in self.owners.items()}
            logits = functional_call(self.model, masked, (x[rows], task[rows]))  # (b, K)
            if out is None:
                out = logits.new_empty((len(x), logits.shape[1]))
            out[rows] = logits
        return out


class PackNet(Method):
    """Per-task weight ownership: train the free weights, prune, retrain, freeze."""

    Params = PackNetParams
    masks_gradients = True  # see Method.masks_gradients
    # masks the body's weights; task-IL: the current task's head rows. BatchNorm statistics
    # would be shared by every task's weights (no per-task copies: pitfall 2): refused.
    model_needs = ("head", "no_batch_norm")

    def __init__(self, params: PackNetParams | None = None) -> None:
        super().__init__(params)
        self.owners: dict[str, torch.Tensor] = {}  # masked weight name -> uint8 owner map
        self.current = 0          # 1-based index of the task being trained
        self.steps_done = 0       # steps of the current task so far
        self.prune_after = 0      # prune once steps_done reaches this
        self.pruned = False       # whether the current task has been pruned

    # --- checks ------------------------------------------------------------------------

    @staticmethod
    def _check(ctx: Context) -> None:
        if ctx.train_cfg.weight_decay > 0:
            raise ConfigError(
                f"packnet: train.weight_decay={ctx.train_cfg.weight_decay} would shrink the "
                "weights frozen for earlier tasks (their gradient is zero, the decay is not); "
                "set train.weight_decay: 0")
        if ctx.train_cfg.optimizer_policy == "carry":
            raise ConfigError(
                "packnet: train.optimizer_policy=carry would keep the optimizer's momentum or "
                "moments of the weights frozen for earlier tasks, which then still move; "
                "set train.optimizer_policy: fresh")
        if len(ctx.stream) > 255:
            raise ConfigError(f"packnet: the owner maps are uint8, so at most 255 tasks; the "
                              f"stream has {len(ctx.stream)}")

    def prepare_model(self, model: nn.Module, ctx: Context) -> nn.Module:
        self._check(ctx)  # before any training or baseline rows
        return model

    # --- the task -------------------------------------------------------------------------

    def before_task(self, ctx: Context) -> None:
        self._check(ctx)
        params = dict(ctx.model.named_parameters())
        if not self.owners:
            self.owners = {name: torch.zeros_like(params[name], dtype=torch.uint8)
                           for name in masked_weight_names(ctx.model)}
        self.current = ctx.task.index + 1
        for owner in self.owners.values():
            owner.masked_fill_(owner == 0, self.current)  # make_finetuning_mask: free -> mine
        cfg = ctx.train_cfg
        total = cfg.epochs * math.ceil(len(ctx.task.train) / cfg.batch_size)
        self.prune_after = max(1, round((1 - self.params.retrain_fraction) * total))
        self.steps_done, self.pruned = 0, False

    def after_backward(self, ctx: Context) -> None:
        params = dict(ctx.model.named_parameters())
        with torch.no_grad():
            for name, owner in self.owners.items():  # make_grads_zero
                grad = params[name].grad
                if grad is not None:
                    grad.masked_fill_(owner != self.current, 0)
            if self.current > 1:  # biases: trained with task 1 only
                for name, p in params.items():
                    if name.startswith("body.") and name not in self.owners and p.grad is not None:
                        p.grad.zero_()
            if ctx.stream.n_heads > 1:  # task-incremental: only this task's head rows learn
                self._keep_own_head_rows(ctx.model)

    def _keep_own_head_rows(self, model: nn.Module) -> None:
        """Zero the head gradient outside rows [index * K, (index + 1) * K) of this task."""
        first = (self.current - 1) * model.head_dim
        for p in (model.head.weight, model.head.bias):  # (H*K, F), (H*K,)
            if p.grad is not None:
                p.grad[:first] = 0
                p.grad[first + model.head_dim:] = 0

    def after_step(self, batch: Any, ctx: Context) -> None:
        self.steps_done += 1
        if self.pruned:
            self._zero_free_weights(ctx.model)  # make_pruned_zero
        elif self.steps_done == self.prune_after and not self._is_last(ctx):
            self.prune(ctx.model)

    def after_task(self, ctx: Context) -> None:
        if not self.pruned and not self._is_last(ctx):  # fewer steps than planned
            self.prune(ctx.model)

    @staticmethod
    def _is_last(ctx: Context) -> bool:
        return ctx.task.index == len(ctx.stream) - 1

    def prune(self, model: nn.Module) -> None:
        """Free the `prune` fraction of the current task's smallest weights, per layer, and
        set them to 0."""
        params = dict(model.named_parameters())
        for name, owner in self.owners.items():
            freed = prune_smallest(params[name].detach(), owner, self.current, self.params.prune)
            owner.copy_(freed)
        self._zero_free_weights(model)
        self.pruned = True

    def _zero_free_weights(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, owner in self.owners.items():
                params[name].masked_fill_(owner == 0, 0)

    # --- evaluation, state, memory ------------------------------------------------------

    def eval_model(self, ctx: Context) -> nn.Module:
        """Task-incremental: each example sees the weights of tasks 1..its own task only.
        Otherwise (no task id at test) the live model, i.e. all tasks' weights so far."""
        if task_ids_at_test(ctx) and self.owners:
            return PackNetEvalNet(ctx.model, self.owners)
        return ctx.model

    def state_dict(self) -> dict[str, Any]:
        return {"owners": dict(self.owners)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.owners = dict(state["owners"])

    def extra_bytes(self) -> int:
        """The owner maps, 1 byte per masked weight (ceil(log2(T + 1)) bits would do)."""
        return sum(owner.numel() for owner in self.owners.values())
