"""Per-task weight snapshots: keep a whole copy of the network after every task.

The bluntest answer to forgetting, and the fair question a memory bill exists for: after
task t, store theta_t, a copy of every weight and buffer. At test time an example of task t
is classified by theta_t, so in task-incremental learning nothing is ever forgotten: each
task's accuracy stays exactly what it was when that task ended. The price is one model per
task, P * 4 bytes * T in float32, and no transfer between tasks beyond the warm start
(training continues from the previous task's weights, as fine-tuning does).

Only task-incremental learning gives the task id at test time. In domain- and
class-incremental learning there is nothing to pick a snapshot by, so the live model is
evaluated and the method is fine-tuning that pays for copies it cannot use (the table shows
exactly that). Memory bill: every stored copy (after task t, t copies).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from engram.methods.base import Context, Method, task_ids_at_test


class SnapshotNet(nn.Module):
    """Evaluates each example with the snapshot of its own task (the live model for tasks
    not trained yet). Holds no parameters of its own."""

    def __init__(self, model: nn.Module, snapshots: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        object.__setattr__(self, "live", model)  # not a submodule: nothing of it is copied
        self.snapshots = snapshots
        self.train(model.training)

    def train(self, mode: bool = True) -> SnapshotNet:
        self.training = mode
        self.live.train(mode)
        return self

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        outputs: torch.Tensor | None = None
        for t in torch.unique(task).tolist():  # evaluation chunks usually hold one task
            rows = task == t
            if t < len(self.snapshots):
                logits = functional_call(self.live, self.snapshots[t], (x[rows], task[rows]))
            else:
                logits = self.live(x[rows], task[rows])
            if outputs is None:  # (B, K) in the dtype and width the network gives
                outputs = logits.new_empty((len(x),) + logits.shape[1:])
            outputs[rows] = logits
        return outputs


class Snapshots(Method):
    """Store the whole model after each task; evaluate each task with its own copy."""

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.snapshots: list[dict[str, torch.Tensor]] = []  # task index -> state dict

    def after_task(self, ctx: Context) -> None:
        self.snapshots.append({name: value.detach().clone()
                               for name, value in ctx.model.state_dict().items()})

    def eval_model(self, ctx: Context) -> nn.Module:
        if not task_ids_at_test(ctx) or not self.snapshots:
            return ctx.model
        return SnapshotNet(ctx.model, self.snapshots)

    def state_dict(self) -> dict[str, Any]:
        return {"snapshots": self.snapshots}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshots = list(state["snapshots"])
