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
of the one-seed loop (make_batch, batch_loss, penalty, the quadratic penalties' gradients,
after_backward, the optimizer's step, correct_update, after_step, after_task) then runs per
seed, in the one-seed order, on that seed's own objects, so the numbers are the one-seed path's up to float rounding (a batched
matrix product sums in another order).

Seeds may have different numbers of examples per task (each seed splits the data its own
way): a step pads the shorter mini-batches, and a seed whose epoch has ended sits out the
remaining steps (its optimizer does not step). A seed that diverges (a non-finite mean loss
at an epoch's end) sits out the rest the same way, and the caller records it as a one-seed run
that diverged there. Methods say whether this is exact for them (`Method.batchable`); the
caller runs the others' seeds one at a time.
"""

from __future__ import annotations

import copy
from typing import Callable, Collection, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engram.data.streams import TensorSet, batches
from engram.errors import DivergenceError
from engram.methods.base import Context, Method
from engram.optimizers import build_optimizer, build_scheduler
from engram.training import (finish_epoch, finish_gradients, finish_update, own_loss,
                              task_optimizer)


class SeedGroup:
    """S networks of one architecture whose parameters live in one stacked tensor per
    parameter name, (S, *shape): network s's parameters become views of row s, so the
    seeds' optimizers, hooks and evaluations keep using each network as it is, and one
    forward pass runs all of them (`__call__`, vmap over functional_call). Gradients of the
    stacked forward land on the stacked tensors; `hand_out_gradients` passes each row to its
    network's parameter (a quadratic penalty's gradient, EWC's, is added there after). Made once per run: optimizers kept across tasks refer to these parameters."""

    def __init__(self, networks: Sequence[nn.Module]) -> None:
        from torch.func import functional_call, vmap

        self.networks = list(networks)
        self.names = [name for name, _ in networks[0].named_parameters()]
        # Matrices (Linear weights, (out, in)) are stored transposed, (S, in, out): the stacked
        # forward then multiplies by a contiguous matrix and the backward writes the weight
        # gradient in that layout, where in the (S, out, in) layout vmap's backward copies
        # every weight gradient into place (measured on the CPU: 1.4x slower steps).
        self.transposed = {name for name in self.names
                           if networks[0].get_parameter(name).ndim == 2}
        self.stacked = {}  # name -> (S, *shape) leaf, or (S, in, out) for a matrix
        for name in self.names:
            rows = [net.get_parameter(name).detach() for net in networks]
            if name in self.transposed:
                rows = [row.t() for row in rows]
            self.stacked[name] = torch.stack(rows).requires_grad_()
        for s, net in enumerate(networks):
            for name in self.names:
                old = net.get_parameter(name)
                owner, _, attr = name.rpartition(".")
                setattr(net.get_submodule(owner), attr, nn.Parameter(
                    self.row(name, self.stacked[name].detach(), s),
                    requires_grad=old.requires_grad))  # shares row s's storage
        self.params = [{name: net.get_parameter(name) for name in self.names}
                       for net in networks]  # the new parameters, network by network
        template = copy.deepcopy(networks[0]).to("meta")  # the architecture, no storage

        def one(params: dict[str, torch.Tensor], x: torch.Tensor,
                task: torch.Tensor) -> torch.Tensor:
            return functional_call(template, params, (x, task))

        self.forward = vmap(one)
        # the one optimizer (and LR scheduler) of all seeds, when shares_one_optimizer
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None

    def row(self, name: str, stacked: torch.Tensor, s: int) -> torch.Tensor:
        """Network s's `name` (a parameter or its gradient) as a view of `stacked`, in the
        parameter's own shape."""
        return stacked[s].t() if name in self.transposed else stacked[s]

    def __call__(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """x (S, B, ...), task (S, B) -> (S, B, K): row s from network s's parameters."""
        params = {name: stacked.transpose(1, 2) if name in self.transposed else stacked
                  for name, stacked in self.stacked.items()}  # (S, *shape) each
        return self.forward(params, x, task)

    def hand_out_gradients(self, active: Sequence[int]) -> None:
        """Add row s of each stacked gradient to network s's parameter for the `active`
        seeds; the others' gradients become None, so no optimizer moves them (a seed whose
        epoch has ended sits the step out). Clears the stacked gradients."""
        active_set = set(active)
        for name in self.names:
            grad = self.stacked[name].grad  # (S, *shape), or None: the name took no gradient
            self.stacked[name].grad = None
            for s, params in enumerate(self.params):
                param = params[name]
                if s not in active_set or not param.requires_grad:  # frozen: never moved
                    param.grad = None
                elif grad is not None:
                    mine = self.row(name, grad, s)
                    param.grad = mine if param.grad is None else param.grad + mine

    def parameters(self) -> list[nn.Parameter]:
        """Every network's parameters, network after network."""
        return [p for params in self.params for p in params.values()]


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


def shares_one_optimizer(ctxs: Sequence[Context]) -> bool:
    """Whether one optimizer over every seed's parameters is exact: torch's optimizers keep
    state per parameter (Adam's step count too) and skip parameters without a gradient, so
    yes, unless the LR schedule could differ between seeds: a scheduler stepped per
    optimizer step (seeds take different numbers of steps) or on the loss (plateau), or
    the user's own factories (engram.fit)."""
    cfg = ctxs[0].train_cfg
    if any(ctx.make_optimizer is not None or ctx.make_scheduler is not None for ctx in ctxs):
        return False
    return cfg.scheduler is None or (cfg.scheduler_step == "epoch"
                                     and cfg.scheduler != "reducelronplateau")


def seed_losses(outputs: torch.Tensor, trained: Sequence[TensorSet | None],
                task_batches: Sequence[TensorSet | None], ctxs: Sequence[Context],
                methods: Sequence[Method]) -> tuple[torch.Tensor, torch.Tensor,
                                                     torch.Tensor | None]:
    """Each seed's training loss (S,), the loss of its step's own examples (S,, detached)
    and how many of them it classified right (S,, or None unless count_correct), what
    train_task takes from one seed's step (own_loss), from the stacked `outputs` (S, B, K)
    of the `trained` batches (None: the seed sits out and gets 0). When every seed trains
    on plain cross-entropy (the problem's loss, no method's own batch_loss) this is one
    cross-entropy over all S x B rows, averaged per seed, instead of three calls per seed
    (small calls, whose cost is Python and kernel launches rather than arithmetic)."""
    present = [s for s, batch in enumerate(trained) if batch is not None]
    mixed = [trained[s] is not task_batches[s] for s in present]
    if all(ctxs[s].loss_fn is F.cross_entropy and not methods[s].replaces_loss
           for s in present):
        targets = stack_padded([b and b.y for b in trained])  # (S, B), 0 where padded
        per_example = F.cross_entropy(outputs.flatten(0, 1), targets.flatten(),
                                      reduction="none").view(targets.shape)  # (S, B)
        losses = per_row_mean(per_example, [b and len(b) for b in trained])
        own_lengths = [b and len(b) for b in task_batches]
        own = (per_row_mean(per_example.detach(), own_lengths) if any(mixed)
               else losses.detach())
        correct = None
        if ctxs[present[0]].count_correct:  # the same for every seed (one config)
            right = (outputs.detach().argmax(2) == targets).float()  # (S, B)
            correct = per_row_mean(right, own_lengths, total=True)
        return losses, own, correct
    # a method's own loss (ER-ACE's masked one) or another problem loss: seed by seed
    zero = outputs.new_zeros(())
    losses, owns, rights = [zero] * len(trained), [zero] * len(trained), [zero] * len(trained)
    for s in present:
        batch, out = trained[s], outputs[s, :len(trained[s])]
        losses[s] = loss = methods[s].batch_loss(out, batch, ctxs[s])
        owns[s], right = own_loss(ctxs[s], methods[s], out, loss, task_batches[s],
                                  batch is not task_batches[s])
        rights[s] = zero if right is None else right.float()
    correct = torch.stack(rights) if ctxs[present[0]].count_correct else None
    return torch.stack(losses), torch.stack(owns), correct


def per_row_mean(values: torch.Tensor, lengths: Sequence[int | None],
                 total: bool = False) -> torch.Tensor:
    """(S,) the mean (or with total=True the sum) of row s's first lengths[s] entries of
    `values` (S, B); 0 for a row whose length is None (a seed sitting out)."""
    if all(n == lengths[0] for n in lengths) and lengths[0] is not None:  # the common case
        part = values[:, :lengths[0]]
        return part.sum(1) if total else part.mean(1)
    counts = torch.tensor([n or 0 for n in lengths], device=values.device)
    keep = torch.arange(values.shape[1], device=values.device) < counts[:, None]  # (S, B)
    sums = torch.where(keep, values, torch.zeros_like(values)).sum(1)
    return sums if total else sums / counts.clamp_min(1)


def train_task_seeds(group: SeedGroup, ctxs: Sequence[Context], methods: Sequence[Method],
                     on_epoch: Callable[[int, int, float], None],
                     alive: Collection[int] | None = None) -> dict[int, DivergenceError]:
    """Train each ctxs[s].model (the networks of `group`) on ctxs[s].task with methods[s] for
    train.epochs epochs, all seeds in one stacked forward and backward pass per step (see
    the module docstring): engram.training.train_task for S seeds at once. `on_epoch(s,
    epoch, loss)` gets what train_task's on_epoch gets, per seed. Assumes full precision (no
    train.amp) and networks without buffers or random layers (no batch norm, no dropout):
    the caller checks.

    Only the seeds in `alive` (default: all) train; the others sit out every step (no hook
    runs, no gradient, no optimizer step). A seed whose epoch ends in a non-finite loss
    (finish_epoch's DivergenceError, where train_task would raise) leaves the training
    there: no on_epoch, no after_task, and it sits out the rest, while the others go on.
    Returns the DivergenceError of each seed that diverged on this task."""
    cfg = ctxs[0].train_cfg
    training = set(range(len(ctxs)) if alive is None else alive)  # shrinks as seeds diverge
    diverged: dict[int, DivergenceError] = {}
    for s in sorted(training):
        ctxs[s].model.train()
        methods[s].before_task(ctxs[s])
    # after before_task, as in train_task; one optimizer for all seeds where that is exact
    # (fewer, larger updates: foreach over every seed's tensors), else each seed's own
    one_for_all = shares_one_optimizer(ctxs)
    if one_for_all:
        if group.optimizer is None or cfg.optimizer_policy == "fresh":
            group.optimizer = build_optimizer(group.parameters(), cfg, foreach=True)
            group.scheduler = build_scheduler(group.optimizer, cfg)
        # optimizers[0] steps every seed; the schedule is stepped once per epoch, below
        optimizers, schedulers = [group.optimizer] * len(ctxs), [None] * len(ctxs)
    else:
        pairs = [task_optimizer(ctx) for ctx in ctxs]
        optimizers, schedulers = [o for o, _ in pairs], [sched for _, sched in pairs]
    per_step = cfg.scheduler is not None and cfg.scheduler_step == "step"
    seeds = range(len(ctxs))
    data = [methods[s].training_data(ctxs[s].task.train, ctxs[s]) if s in training else None
            for s in seeds]
    device = ctxs[0].device
    for epoch in range(1, cfg.epochs + 1):
        # a seed out of training gets no mini-batches: it sits out every step
        streams = [batches(data[s], torch.randperm(len(data[s]), generator=ctxs[s].generator),
                           cfg.batch_size) if s in training else iter(()) for s in seeds]
        loss_sums = torch.zeros(len(ctxs), device=device)  # (S,) trained, for divergence
        own_sums = torch.zeros(len(ctxs), device=device)   # (S,) recorded (train_task)
        correct_sums = torch.zeros(len(ctxs), device=device)
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
            outputs = group(stack_padded([b and b.x for b in trained]),
                            stack_padded([b and b.task for b in trained]))  # (S, B, K)
            losses, own, correct = seed_losses(outputs, trained, task_batches, ctxs, methods)
            own_sums += own
            if correct is not None:
                correct_sums += correct
            total = losses.sum()  # a seed sitting out adds 0
            for s in active:
                ctxs[s].batch = trained[s]  # as apply_update: penalties may read it
                penalty = methods[s].penalty(ctxs[s])
                if penalty is not None:
                    total = total + penalty
            for optimizer in optimizers[:1] if one_for_all else optimizers:
                optimizer.zero_grad(set_to_none=True)
            total.backward()  # each seed's rows of the stack get the gradient of its own loss
            group.hand_out_gradients(active)
            finish_gradients([ctxs[s] for s in active], [methods[s] for s in active])
            for s in (active[:1] if one_for_all else active):  # seeds sitting out: no step
                optimizers[s].step()
            loss_sums += losses.detach()
            for s in active:
                finish_update(ctxs[s], methods[s], task_batches[s])
                if per_step:  # never with one_for_all (shares_one_optimizer)
                    schedulers[s].step()
        for s in sorted(training):
            try:
                mean_loss = finish_epoch(ctxs[s], schedulers[s], per_step, epoch, len(data[s]),
                                         loss_sums[s], own_sums[s], correct_sums[s])
            except DivergenceError as error:  # where a one-seed run stops; the others go on
                diverged[s] = error
                training.discard(s)
                continue
            on_epoch(s, epoch, mean_loss)
        if one_for_all and group.scheduler is not None:
            group.scheduler.step()  # the shared schedule: the epoch step each seed's would take
    for s in sorted(training):
        methods[s].after_task(ctxs[s])
    return diverged
