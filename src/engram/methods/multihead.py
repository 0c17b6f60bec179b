"""Multi-head: a shared trunk with one output head per task, the trunk frozen after a while.

The architecture answer that task-incremental learning is built on. engram gives a
task-incremental stream one head per task (`ContinualNet`: one Linear layer holding T heads
of K outputs, each example read out through the head of its task), so every method in the
task-incremental column is already multi-head; plain fine-tuning there (`naive`) is the
multi-head baseline with a trunk that keeps changing. What this method adds is the other
end of the dial: after `freeze_trunk_after` tasks the shared trunk (the body) stops
training and each later task learns only its own head on the frozen features,

    task t <= N:  train body and head            (N = freeze_trunk_after)
    task t >  N:  train the head only; body frozen

so earlier tasks' heads and the trunk they read never move: no forgetting in
task-incremental learning by construction, at the cost of plasticity (later tasks get a
linear read-out of features learned on the first N tasks). With N = 0 nothing is frozen and
the method is fine-tuning. Frozen parameters get `requires_grad = False` before the task's
optimizer is made, so they receive no gradient and no weight decay: they stay bit-identical.
Earlier tasks' heads get exactly zero gradient from later tasks, so they stay put too, unless
train.weight_decay > 0: the decay then shrinks them (all heads share one Linear layer).

In domain- and class-incremental learning the stream has one shared head (there is no task
id at test to choose a head by), so the method is "train the trunk on the first N tasks,
then only the shared head": a linear-probe baseline. Stores nothing: its memory bill is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from engram.schema import opt
from engram.methods.base import Context, Method


@dataclass
class MultiHeadParams:
    freeze_trunk_after: int = opt(1, "N: freeze the shared trunk after N tasks (0: never)", low=0)


class MultiHead(Method):
    """Shared trunk + per-task heads; the trunk trains on the first N tasks only."""

    Params = MultiHeadParams
    model_needs = ("head",)  # the trunk is the body

    def before_task(self, ctx: Context) -> None:
        n = self.params.freeze_trunk_after
        frozen = n > 0 and ctx.task.index >= n
        # The body is the trunk; the head layer holds every task's head (see ContinualNet).
        ctx.model.body.requires_grad_(not frozen)
