"""ER-ACE: experience replay with an asymmetric cross-entropy (Caccia et al., ICLR 2022, "New
Insights on Reducing Abrupt Representation Change in Online Continual Learning", Sec. 4).

In class-incremental learning the incoming batch's cross-entropy pushes down the logits of
every other class, the old classes included, which is what drags the old classes'
representations when new ones arrive. ER-ACE computes the incoming batch's loss only over
the classes it can fairly compete with, and keeps the full cross-entropy for the replayed
batch:

    L = CE_masked(f(x_in), y_in) + CE(f(x_mem), y_mem)
    CE_masked(z, y) = -z_y + log sum_{c not in A} exp z_c,   A = seen classes absent from the batch

Masked here, as in the authors' code (pclucas14/AML, methods/er_ace.py; also Mammoth's
er_ace.py): from the second task on, the classes seen so far (this batch's included) below
the largest of them that are absent from this batch; the largest seen class and the classes
after it (not seen yet, in engram's split streams where classes arrive in index order) stay in
the softmax. In the first task nothing is masked and nothing is replayed, as in that code. The
masked logits are set to the dtype's most negative value, so they get zero probability and
zero gradient.

The incoming loss replaces the runner's loss on the step's own forward pass (`batch_loss`);
the memory is replay's (same `memory`, `replay_batch_size` and `policy`; reservoir by default,
as in the paper) but its batch is not mixed into the step's batch: it is a second forward pass
in `penalty`, augmented by ctx.transform when set, weighted 1 as in the paper.

Task- and domain-incremental learning: no masking, so ER-ACE is experience replay with the
memory batch in a separate forward pass and summed (not averaged) with the incoming loss. In
task-IL each example's softmax covers only its own task's head, whose classes are all
current; in domain-IL every task has the same classes, so no class is old-only.
"""

from __future__ import annotations

from typing import Any

import torch

from engram.methods.base import Batch, Context, ProblemInfo, needs_class_scores
from engram.methods.replay import Replay


class ERACE(Replay):
    """Replay whose incoming batch's cross-entropy ignores the seen classes absent from it."""

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.seen_classes = torch.zeros(0, dtype=torch.long)  # sorted class ids seen so far

    def unusable_reason(self, problem: ProblemInfo) -> str | None:
        return (super().unusable_reason(problem) or needs_class_scores(
            problem, "masks the incoming batch's cross-entropy to its classes"))

    def make_batch(self, batch: Batch, ctx: Context) -> Batch:
        return batch  # the memory batch is a separate term (penalty), not mixed in

    def absent_classes(self, batch: Batch) -> torch.Tensor:
        """The classes masked for `batch`, (k,) long: those seen so far (this batch's
        included) below the largest of them, that `batch` lacks."""
        present = batch.y.unique().cpu()
        seen = torch.cat([self.seen_classes, present]).unique()  # sorted
        below_largest = seen[seen < seen.max()]
        return below_largest[~torch.isin(below_largest, present)]

    def batch_loss(self, outputs: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        if ctx.stream.scenario != "class" or ctx.task.index == 0:
            return ctx.loss_fn(outputs, batch.y)
        absent = self.absent_classes(batch).to(outputs.device)
        masked = outputs.index_fill(1, absent, torch.finfo(outputs.dtype).min)  # (B, K)
        return ctx.loss_fn(masked, batch.y)

    def penalty(self, ctx: Context) -> torch.Tensor | None:
        if self.n_filled == 0 or ctx.task.index == 0:  # replay from the second task on
            return None
        memory = self.sample(ctx)
        x = memory.x if ctx.transform is None else ctx.transform(memory.x, ctx.generator)
        return ctx.loss_fn(ctx.model(x, memory.task), memory.y)

    def after_step(self, batch: Batch, ctx: Context) -> None:
        super().after_step(batch, ctx)
        self.seen_classes = torch.cat([self.seen_classes, batch.y.long().cpu()]).unique()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seen_classes": self.seen_classes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.seen_classes = state["seen_classes"]
