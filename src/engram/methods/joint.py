"""Joint training on every task seen so far: the upper bound of the comparison.

While learning task t the network trains on the union of the training sets of tasks
1..t (shuffled together) for the configured number of epochs, so it never needs to
remember: it always sees everything. Its cost grows with t, which is why it is a bound and
not a method. Also called "cumulative" or "offline" training in the literature.
"""

from __future__ import annotations

from engram.data.streams import TensorSet
from engram.methods.base import Context, Method


class Joint(Method):
    """Train on the concatenated training data of all tasks started so far."""

    def training_data(self, data: TensorSet, ctx: Context) -> TensorSet:
        return TensorSet.concat([task.train for task in ctx.seen_tasks])
