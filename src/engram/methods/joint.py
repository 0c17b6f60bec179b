"""Joint training on every task seen so far: the upper bound of the comparison.

While learning task t the network trains on the union of the training sets of tasks
1..t (shuffled together) for the configured number of epochs, so it never needs to
remember: it always sees everything. Its cost grows with t, which is why it is a bound and
not a method. Also called "cumulative" or "offline" training in the literature.

Its memory bill is honest: after task t it must keep the training sets of tasks 1..t.
"""

from __future__ import annotations

from typing import Any

from engram.data.streams import TensorSet
from engram.methods.base import Context, Method


class Joint(Method):
    """Train on the concatenated training data of all tasks started so far."""

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.kept_bytes = 0  # the stored training sets of the tasks seen so far

    def training_data(self, data: TensorSet, ctx: Context) -> TensorSet:
        return TensorSet.concat([task.train for task in ctx.seen_tasks])

    def after_task(self, ctx: Context) -> None:
        self.kept_bytes = sum(part.numel() * part.element_size()
                              for task in ctx.seen_tasks for part in task.train)

    def state_dict(self) -> dict[str, Any]:
        return {"kept_bytes": self.kept_bytes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept_bytes = int(state["kept_bytes"])

    def extra_bytes(self) -> int:
        return self.kept_bytes
