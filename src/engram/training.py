"""The one training loop every experiment shares: read `train_task` top to bottom.

A library module (imports data, methods and the config parts, nothing above): the continual
runs, the plasticity streams and the sliding window all train through `apply_update`, so a
method's hooks run in the same order everywhere.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from engram.data.streams import TensorSet, batches
from engram.errors import ConfigError, DivergenceError
from engram.methods.base import Context, Method, add_quadratic_gradients
from engram.optimizers import build_optimizer, build_scheduler, is_plateau

EVAL_CHUNK = 4096  # examples per forward pass when evaluating


def make_optimizer(model: torch.nn.Module, cfg, foreach: bool | None = None
                   ) -> torch.optim.Optimizer:
    """The optimizer of `cfg` (a TrainConfig: any torch.optim class, engram.optimizers) over
    the model's parameters. foreach=True batches the update over all tensors, which on the
    CPU is faster for many small tensors (torch's default there is one tensor at a time)."""
    return build_optimizer(model.parameters(), cfg, foreach)


def new_optimizer(ctx: Context) -> tuple[torch.optim.Optimizer, Any]:
    """A new optimizer and LR scheduler (or None) over ctx.model's parameters: the user's
    factories when the Context has them (ctx.make_optimizer / ctx.make_scheduler, given to
    engram.fit), else the train config's classes (engram.optimizers)."""
    cfg = ctx.train_cfg
    if ctx.make_optimizer is None:
        optimizer = make_optimizer(ctx.model, cfg)
    else:
        optimizer = ctx.make_optimizer(ctx.model.parameters())
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer= must return a torch.optim.Optimizer; it returned "
                              f"a {type(optimizer).__name__}")
    # The scheduler right after the optimizer: making one may rescale its lr (LinearLR).
    if ctx.make_scheduler is None:
        return optimizer, build_scheduler(optimizer, cfg)
    scheduler = ctx.make_scheduler(optimizer)
    if not callable(getattr(scheduler, "step", None)):
        raise ConfigError(f"scheduler= must return an LR scheduler (with a step() method); it "
                          f"returned a {type(scheduler).__name__}")
    return optimizer, scheduler


def task_optimizer(ctx: Context) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer and LR scheduler (or None) to train the current task with, kept in
    ctx.optimizer / ctx.scheduler. train.optimizer_policy fresh: new ones, so no momentum or
    moments cross tasks and the schedule restarts; carry: the run's one pair, made for its
    first task (or restored from a checkpoint) and kept with its state."""
    if ctx.optimizer is None or ctx.train_cfg.optimizer_policy == "fresh":
        ctx.optimizer, ctx.scheduler = new_optimizer(ctx)
    return ctx.optimizer, ctx.scheduler


def restore_optimizer(ctx: Context, optimizer_state: dict, scheduler_state: dict | None
                      ) -> None:
    """Rebuild the run's optimizer (and scheduler) with the state a checkpoint saved, for
    optimizer_policy carry: the resumed tasks then train on with the same moments and
    schedule as an uninterrupted run."""
    # The scheduler is made first (new_optimizer): making one may rescale the optimizer's lr
    # (LinearLR, OneCycleLR); the saved param groups (lr, initial_lr) then overwrite that.
    ctx.optimizer, ctx.scheduler = new_optimizer(ctx)
    ctx.optimizer.load_state_dict(optimizer_state)
    if ctx.scheduler is not None and scheduler_state is not None:
        ctx.scheduler.load_state_dict(scheduler_state)


class MixedPrecision(NamedTuple):
    """train.amp's settings on one device: the autocast dtype (None: full precision) and
    the gradient scaler (None: gradients unscaled)."""
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The forward pass's context: torch.autocast, or nothing at all when amp is off."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def mixed_precision(amp: bool, device: torch.device,
                    scaler: torch.amp.GradScaler | None = None) -> MixedPrecision:
    """train.amp on `device`: off -> full precision; CUDA -> float16 autocast with a
    GradScaler (float16's range is too small for small gradients without loss scaling,
    Micikevicius et al. 2018, "Mixed Precision Training"): `scaler`, the run's so far, or a
    new one; other devices -> bfloat16 autocast, whose range is float32's, so no scaler (on
    the CPU this is slow: for tests)."""
    if not amp:
        return MixedPrecision(None, None)
    if device.type == "cuda":
        return MixedPrecision(torch.float16, scaler or torch.amp.GradScaler("cuda"))
    return MixedPrecision(torch.bfloat16, None)


def apply_update(ctx: Context, method: Method, optimizer: torch.optim.Optimizer,
                 loss: torch.Tensor, batch: TensorSet, task_batch: TensorSet,
                 precision: MixedPrecision | None = None) -> None:
    """One optimizer update from the training `loss` of `batch` (what make_batch returned),
    with the method's penalty and hooks in the order every method relies on. `task_batch` is
    what after_step is given: the examples the stream delivers at this step (train_task: the
    mini-batch; the sliding window: the points entering it for the first time, often none).
    Shared by train_task and the sliding-window experiment (engram.experiments.window).

    Under train.amp (`precision`) the penalty's forward passes (a replay method's memory
    batches) run under the same autocast as the step's. With a gradient scaler (CUDA) the
    backward pass runs on the scaled loss and the gradients are unscaled before
    after_backward, so the hooks that read or project gradients see their true values (the
    quadratic penalties' gradients, added in closed form after the unscaling, are never
    scaled, and the scaler's check below does not see them). When
    an unscaled gradient is inf or NaN the scaler skips the update, and so does this: no
    hook after the backward pass runs (SI's path integral, a replay buffer's insertion, ...
    would otherwise read a non-finite gradient or an update that was not made) and ctx.step
    does not advance; the scaler lowers its scale for the next step."""
    ctx.batch = batch  # LwF distils on the batch being trained
    autocast = contextlib.nullcontext() if precision is None else precision.autocast(ctx.device)
    with autocast:
        penalty = method.penalty(ctx)  # EWC's quadratic anchor, DER's memory batches, ...
    total = loss if penalty is None else loss + penalty
    optimizer.zero_grad(set_to_none=True)
    scaler = None if precision is None else precision.scaler
    if scaler is None:
        total.backward()
        finish_gradients([ctx], [method])
        optimizer.step()
    else:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)  # true gradients for the hooks; records inf/NaN
        # The scaler's own record of inf/NaN in this optimizer's gradients (what its step()
        # reads; a sync, as step() makes anyway).
        if any(found.item() for found in scaler._found_inf_per_device(optimizer).values()):
            scaler.step(optimizer)  # skips the update
            scaler.update()  # and lowers the scale
            return
        finish_gradients([ctx], [method])
        scaler.step(optimizer)
        scaler.update()
    finish_update(ctx, method, task_batch)


def finish_gradients(ctxs: Sequence[Context], methods: Sequence[Method]) -> None:
    """The gradients after the backward pass, before the optimizer's step, of one run
    (apply_update: one Context and Method) or of the seeds of a batched group
    (engram.batched_training): the quadratic penalties' gradients added in closed form
    (EWC, MAS, SI, ...: Method.quadratic_penalties; all seeds' in one set of foreach
    passes), then each method's own after_backward (projections, SAM), which sees them as
    it sees any penalty's."""
    add_quadratic_gradients([quadratic for ctx, method in zip(ctxs, methods)
                             for quadratic in method.quadratic_penalties(ctx)])
    for ctx, method in zip(ctxs, methods):
        method.after_backward(ctx)


def finish_update(ctx: Context, method: Method, task_batch: TensorSet) -> None:
    """The hooks after the optimizer's step, and the step count: the end of apply_update
    (shared with the seed-batched loop, engram.batched_training)."""
    method.correct_update(ctx)  # OGD / A-GEM project the update the optimizer made
    method.after_step(task_batch, ctx)  # buffer updates, path integrals, unit resets
    ctx.step += 1


def own_loss(ctx: Context, method: Method, outputs: torch.Tensor, loss: torch.Tensor,
             task_batch: TensorSet, mixed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the loss of the step's own examples, how many of them the network classified right,
    or None unless ctx.count_correct), from the step's `outputs` (B, K) before its update.
    The own examples are the first len(task_batch) of the batch (make_batch's contract); the
    loss is the problem's whatever a method trains on (in float32 also under train.amp;
    .float() is a no-op otherwise): the trained `loss` itself when nothing was mixed in."""
    own = outputs[:len(task_batch)].detach().float()
    value = (ctx.loss_fn(own, task_batch.y) if mixed or method.replaces_loss
             else loss.detach())
    correct = (own.argmax(1) == task_batch.y).sum() if ctx.count_correct else None
    return value, correct


def finish_epoch(ctx: Context, scheduler: Any, per_step: bool, epoch: int, n: int,
                 loss_sum: torch.Tensor, own_loss_sum: torch.Tensor,
                 correct_sum: torch.Tensor) -> float:
    """The end of one epoch over `n` examples: ctx.epoch_accuracy, the divergence check on
    the trained loss, the LR scheduler's epoch step; returns the epoch's recorded loss (the
    mean over mini-batches of the own examples' loss, see train_task)."""
    cfg = ctx.train_cfg
    n_batches = -(-n // cfg.batch_size)
    mean_loss = float(loss_sum) / n_batches  # one sync per epoch
    ctx.epoch_accuracy = float(correct_sum) / n if ctx.count_correct else None
    if not math.isfinite(mean_loss):
        raise DivergenceError(
            f"training diverged on task {ctx.task.index + 1} ({ctx.task.name}), epoch {epoch}: "
            f"the mean loss is {mean_loss}; lower train.lr (now {cfg.lr}) or the method's strength")
    if scheduler is not None and not per_step:
        if is_plateau(scheduler):  # it watches the epoch's trained loss
            scheduler.step(mean_loss)
        else:
            scheduler.step()
    return float(own_loss_sum) / n_batches


def train_task(ctx: Context, method: Method, on_epoch: Callable[[int, float], None]) -> None:
    """Train `ctx.model` on `ctx.task` for train.epochs epochs: the loop every method shares.

    `on_epoch(epoch, loss)` gets the epoch's mean over its mini-batches of the loss of each
    mini-batch's own examples (the task's, not the memory examples replay mixes in, nor any
    penalty), computed in the forward pass of the step, before its update: the online error
    of the plasticity runner and `engram run`'s train_loss. The divergence check watches the
    loss actually trained on (replay's mixed batch)."""
    cfg, model = ctx.train_cfg, ctx.model
    model.train()
    method.before_task(ctx)
    # Made (under the fresh policy) after before_task, which may change which parameters
    # train (progressive nets, PackNet).
    optimizer, scheduler = task_optimizer(ctx)
    per_step = scheduler is not None and cfg.scheduler_step == "step"
    # One scaler for the run: a new one would start every task at 2**16 and skip steps
    # until it had backed off again (it is not checkpointed: a resume starts afresh).
    precision = mixed_precision(cfg.amp, ctx.device, ctx.grad_scaler)
    ctx.grad_scaler = precision.scaler
    if cfg.channels_last:  # 4-d weights (convolutions) in NHWC order; the rest as they are
        model.to(memory_format=torch.channels_last)
    data = method.training_data(ctx.task.train, ctx)  # joint training widens this
    n = len(data)
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(n, generator=ctx.generator)
        loss_sum = torch.zeros((), device=ctx.device)  # the trained loss, for divergence
        own_loss_sum = torch.zeros((), device=ctx.device)  # the recorded loss (see above)
        correct_sum = torch.zeros((), device=ctx.device)
        for task_batch in batches(data, order, cfg.batch_size):  # x (B, C, H, W)
            batch = method.make_batch(task_batch, ctx)  # replay appends memory examples here
            mixed = batch is not task_batch
            if ctx.transform is not None:  # augmentation: the batch trained on, not task_batch
                batch = TensorSet(ctx.transform(batch.x, ctx.generator), batch.y, batch.task)
            x = batch.x
            if cfg.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with precision.autocast(ctx.device):
                outputs = model(x, batch.task)
                # cross-entropy unless a problem says else (or a method: ER-ACE's masked one)
                loss = method.batch_loss(outputs, batch, ctx)
            # the online loss and accuracy of the step's own examples, before the update
            own, correct = own_loss(ctx, method, outputs, loss, task_batch, mixed)
            own_loss_sum += own
            if correct is not None:
                correct_sum += correct
            apply_update(ctx, method, optimizer, loss, batch, task_batch, precision)
            if per_step:
                scheduler.step()
            loss_sum += loss.detach()
        on_epoch(epoch, finish_epoch(ctx, scheduler, per_step, epoch, n, loss_sum,
                                     own_loss_sum, correct_sum))
    method.after_task(ctx)


class Evaluation(NamedTuple):
    """What `measure` finds on one split: accuracy, mean loss, and each extra metric's value."""
    accuracy: float
    loss: float
    metrics: dict[str, float]


@torch.no_grad()
def measure(model: torch.nn.Module, data: TensorSet,
            loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
            metrics: Sequence[Callable[[torch.Tensor, torch.Tensor], Any]] = ()) -> Evaluation:
    """Accuracy, mean `loss` and `metrics` (by __name__, each given all of the split's logits
    and targets) of `model` on `data`, in eval mode. The loss is averaged over examples: a
    chunk's loss (a mean, as torch losses reduce by default) counts len(chunk) times;
    cross-entropy is summed exactly per example."""
    was_training = model.training
    model.eval()
    correct, loss_sum, every_logits = 0.0, 0.0, []
    for x, y, task in batches(data, None, EVAL_CHUNK):
        logits = model(x, task)
        correct += float((logits.argmax(dim=1) == y).sum())
        if loss is F.cross_entropy:  # engram's own numbers, summed as they always were
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        else:
            loss_sum += float(loss(logits, y)) * len(y)
        if metrics:
            every_logits.append(logits)
    model.train(was_training)
    values = {}
    if metrics:
        logits = torch.cat(every_logits)
        values = {metric.__name__: float(metric(logits, data.y)) for metric in metrics}
    return Evaluation(correct / len(data), loss_sum / len(data), values)


def evaluate(model: torch.nn.Module, data: TensorSet,
             loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
             ) -> tuple[float, float]:
    """(accuracy, mean loss, cross-entropy unless `loss` says else) of `model` on `data`, in
    eval mode (see `measure`)."""
    return measure(model, data, loss)[:2]
