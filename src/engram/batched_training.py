"""Several seeds of one method trained at once, as one stacked network: `train_task_seeds`.

A library module beside engram.training, whose loop it follows step by step. Each seed keeps
everything a one-seed run has (built by engram.experiments.continual.prepare_run): its own
network (its own initial weights), Context (its own generator, hence its own data order and
every other draw), Method (its own state: anchors, buffers) and optimizer. Only the
network's forward and backward passes are shared: the seeds' parameters are stacked, (S,
*shape) each, and one forward pass runs every seed's mini-batch through its own weights,
torch.func.vmap over torch.func.functional_call, x (S, B, ...) -> logits (S, B, K). The sum
of the seeds' losses is backpropagated once; the stack hands each seed's parameters exactly
the gradient of its own loss, since no seed's loss depends on another's weights. Every hook
of the one-seed loop (make_batch, batch_loss, penalty, after_backward, the optimizer's step,
correct_update, after_step, after_task) then runs per seed, in the one-seed order, on that
seed's own objects, so the numbers are the one-seed path's up to float rounding (a batched
matrix product sums in another order).

Seeds may have different numbers of examples per task (each seed splits the data its own
way): a step pads the shorter mini-batches, and a seed whose epoch has ended sits out the
remaining steps (its optimizer does not step). Methods say whether this is exact for them
(`Method.batchable`); the caller refuses the others.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

from engram.data.streams import TensorSet, batches
from engram.methods.base import Context, Method
from engram.training import finish_epoch, finish_update, own_loss, task_optimizer


class StackedNetwork:
    """The forward pass of S networks of one architecture at once: `__call__(x, task)` with
    x (S, B, ...) and task (S, B) gives (S, B, K), row s from network s's own parameters.
    The parameters are re-stacked from the networks' own tensors at every call, so gradients
    reach those (each seed's optimizer steps them) and updates are seen at the next call."""

    def __init__(self, networks: Sequence[nn.Module]) -> None:
        from torch.func import functional_call, vmap

        self.names = [name for name, _ in networks[0].named_parameters()]
        self.per_network = [dict(net.named_parameters()) for net in networks]
        template = copy.deepcopy(networks[0]).to("meta")  # the architecture, no storage

        def one(params: dict[str, torch.Tensor], x: torch.Tensor,
                task: torch.Tensor) -> torch.Tensor:
            return functional_call(template, params, (x, task))

        self.forward = vmap(one)

    def __call__(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        stacked = {name: torch.stack([params[name] for params in self.per_network])
                   for name in self.names}  # (S, *shape) each
        return self.forward(stacked, x, task)


def stack_padded(parts: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """(S, B_max, ...) from S tensors (B_s, ...) (None: a seed sitting out the step), each
    padded with zeros to the longest: the padded rows' outputs are never read."""
    present = [part for part in parts if part is not None]
    longest = max(len(part) for part in present)
    if all(part is not None and len(part) == longest for part in parts):
        return torch.stack(list(parts))  # the common case: no padding
    out = present[0].new_zeros((len(parts), longest) + present[0].shape[1:])
    for s, part in enumerate(parts):
        if part is not None:
            out[s, :len(part)] = part
    return out


def train_task_seeds(ctxs: Sequence[Context], methods: Sequence[Method],
                     on_epoch: Callable[[int, int, float], None]) -> None:
    """Train each ctxs[s].model on ctxs[s].task with methods[s] for train.epochs epochs, all
    seeds in one stacked forward and backward pass per step (see the module docstring):
    engram.training.train_task for S seeds at once. `on_epoch(s, epoch, loss)` gets what
    train_task's on_epoch gets, per seed. Assumes full precision (no train.amp) and networks
    without buffers or random layers (no batch norm, no dropout): the caller checks."""
    cfg = ctxs[0].train_cfg
    for ctx, method in zip(ctxs, methods):
        ctx.model.train()
        method.before_task(ctx)
    pairs = [task_optimizer(ctx) for ctx in ctxs]  # after before_task, as in train_task
    per_step = pairs[0][1] is not None and cfg.scheduler_step == "step"
    data = [method.training_data(ctx.task.train, ctx) for ctx, method in zip(ctxs, methods)]
    network = StackedNetwork([ctx.model for ctx in ctxs])
    seeds = range(len(ctxs))
    for epoch in range(1, cfg.epochs + 1):
        orders = [torch.randperm(len(d), generator=ctx.generator) for d, ctx in zip(data, ctxs)]
        streams = [batches(d, order, cfg.batch_size) for d, order in zip(data, orders)]
        device = ctxs[0].device
        loss_sums = [torch.zeros((), device=device) for _ in seeds]  # trained, for divergence
        own_sums = [torch.zeros((), device=device) for _ in seeds]   # recorded (train_task)
        correct_sums = [torch.zeros((), device=device) for _ in seeds]
        while True:
            task_batches = [next(stream, None) for stream in streams]  # None: epoch ended
            active = [s for s in seeds if task_batches[s] is not None]
            if not active:
                break
            trained: list[TensorSet | None] = [None] * len(ctxs)
            for s in active:
                ctx, batch = ctxs[s], methods[s].make_batch(task_batches[s], ctxs[s])
                if ctx.transform is not None:  # augmentation, from the seed's own generator
                    batch = TensorSet(ctx.transform(batch.x, ctx.generator), batch.y, batch.task)
                trained[s] = batch
            outputs = network(stack_padded([b and b.x for b in trained]),
                              stack_padded([b and b.task for b in trained]))  # (S, B, K)
            total = torch.zeros((), device=device)
            losses = {}
            for s in active:
                ctx, method, batch = ctxs[s], methods[s], trained[s]
                out = outputs[s, :len(batch)]
                losses[s] = loss = method.batch_loss(out, batch, ctx)
                own, correct = own_loss(ctx, method, out, loss, task_batches[s],
                                        batch is not task_batches[s])
                own_sums[s] += own
                if correct is not None:
                    correct_sums[s] += correct
                ctx.batch = batch  # as apply_update: penalties may read it
                penalty = method.penalty(ctx)
                total = total + (loss if penalty is None else loss + penalty)
            for optimizer, _ in pairs:
                optimizer.zero_grad(set_to_none=True)
            total.backward()  # each seed's parameters get the gradient of its own loss
            for s in active:
                ctx, method, (optimizer, scheduler) = ctxs[s], methods[s], pairs[s]
                method.after_backward(ctx)
                optimizer.step()
                finish_update(ctx, method, task_batches[s])
                if per_step:
                    scheduler.step()
                loss_sums[s] += losses[s].detach()
        for s in seeds:
            optimizer, scheduler = pairs[s]
            on_epoch(s, epoch, finish_epoch(ctxs[s], scheduler, per_step, epoch, len(data[s]),
                                            loss_sums[s], own_sums[s], correct_sums[s]))
    for ctx, method in zip(ctxs, methods):
        method.after_task(ctx)
