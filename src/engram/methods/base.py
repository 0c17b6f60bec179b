"""The Method interface: small hooks the runner calls around its one training loop.

The runner owns the step (see `engram.runner.train_task`):

    model = method.prepare_model(model, ctx)     # once per run: progressive nets add columns
    method.before_task(ctx)
    data = method.training_data(task.train, ctx)
    for batch in batches(data):
        batch = method.make_batch(batch, ctx)
        loss = cross_entropy(model(batch.x, batch.task), batch.y)
        penalty = method.penalty(ctx)            # None means "no penalty"
        if penalty is not None: loss = loss + penalty
        optimizer.zero_grad(); loss.backward()
        method.after_backward(ctx); optimizer.step(); method.after_step(batch, ctx)
    method.after_task(ctx)
    accuracy = evaluate(method.eval_model(ctx), test_data)  # snapshots, PackNet pick by task

A method never calls `optimizer.step()` itself, so methods compose. All of its state that
matters for resuming lives in `state_dict()` (tensors, numbers, strings, lists and dicts
only: checkpoints are loaded with `torch.load(weights_only=True)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from engram.config import TrainConfig
from engram.data.streams import Stream, Task, TensorSet

Batch = TensorSet  # a mini-batch is a TensorSet of B examples: x (B, ...), y (B,), task (B,)


@dataclass
class Context:
    """What a hook may read. The runner updates `task` and `step`; hooks do not write here."""
    model: nn.Module
    stream: Stream
    train_cfg: TrainConfig
    # CPU generator: all of a run's randomness after init, except dropout masks, which
    # come from torch's global RNG (the runner checkpoints that too, so resume stays exact)
    generator: torch.Generator
    device: torch.device
    task: Task | None = None
    step: int = 0
    seen_tasks: list[Task] = field(default_factory=list)  # tasks started so far, current last
    batch: TensorSet | None = None  # the batch of the current step, set before penalty()
    # The training loss, (outputs, targets) -> scalar: cross-entropy for classification;
    # the plasticity problems' regression uses mean squared error.
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    # Online accuracy: when set, the runner counts the task examples each step classifies
    # correctly *before* its update and leaves the epoch's fraction in epoch_accuracy.
    count_correct: bool = False
    epoch_accuracy: float | None = None


@dataclass
class NoParams:
    """This method has no parameters."""


class Method:
    """Base class: every hook does nothing. Subclasses override the hooks they need."""

    Params: ClassVar[type] = NoParams
    # Freezing by zeroing gradients (PackNet) is undone by a method that recomputes the
    # gradient (SAM, A-GEM, OGD); Compose refuses to combine the two kinds.
    masks_gradients: ClassVar[bool] = False
    rewrites_gradients: ClassVar[bool] = False

    def __init__(self, params: Any = None) -> None:
        self.params = params if params is not None else self.Params()

    def prepare_model(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Called once per run, before any task (and before a checkpoint is loaded into the
        model): return the network to train. Architecture methods return a wrapper."""
        return model

    def before_task(self, ctx: Context) -> None:
        pass

    def training_data(self, data: TensorSet, ctx: Context) -> TensorSet:
        return data

    def make_batch(self, batch: Batch, ctx: Context) -> Batch:
        """The batch to train on: `batch` itself, or its examples first, in order, followed by
        any extra ones (replay's memory examples). The runner relies on that order to record
        the loss and accuracy of the step's own examples."""
        return batch

    def penalty(self, ctx: Context) -> torch.Tensor | None:
        return None

    def after_backward(self, ctx: Context) -> None:
        pass

    def after_step(self, batch: Batch, ctx: Context) -> None:
        pass

    def after_task(self, ctx: Context) -> None:
        pass

    def eval_model(self, ctx: Context) -> nn.Module:
        """The network that is evaluated, `net(x, task) -> logits`: the live model, unless
        the method keeps per-task weights (snapshots, PackNet masks) and may pick them by
        task id, which only task-incremental learning allows (see `task_ids_at_test`)."""
        return ctx.model

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def extra_bytes(self) -> int:
        """Bytes of tensors the method keeps between tasks (anchors, Fishers, buffers)."""
        return sum(t.numel() * t.element_size() for t in _tensors(self.state_dict()))


def task_ids_at_test(ctx: Context) -> bool:
    """Whether the task identity may be used at test time: task-incremental learning only."""
    return ctx.stream.scenario == "task"


def _tensors(tree: Any):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def random_subset(data: TensorSet, n: int | None, generator: torch.Generator) -> TensorSet:
    """At most `n` examples of `data` drawn without replacement (all of them if n is None)."""
    if n is None or n >= len(data):
        return data
    pick = torch.randperm(len(data), generator=generator)[:n].to(data.y.device)
    return TensorSet(*(part[pick] for part in data))


def flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    """All parameters' .grad as one vector (P,), in `params` order."""
    return torch.cat([p.grad.reshape(-1) for p in params])


def set_flat_grad(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Write a (P,) vector back into the parameters' .grad, in `params` order."""
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()

