"""LwF: learning without forgetting (Li & Hoiem 2016, ECCV; TPAMI 2017).

Before a new task, the current network is frozen as the "old model". While training the
new task, the outputs the old model gives on the *new* task's images are targets for the
outputs that belong to earlier tasks, through a temperature-softened cross-entropy:

    L = L_new + lambda_o * L_old,   L_old = - sum_j y'_o,j log yhat'_o,j
    y'_o = softmax(z_old / T),      yhat'_o = softmax(z / T)

with T = 2 and lambda_o = 1 as in the authors' code (no T^2 rescaling). "Outputs of earlier
tasks" are: task-incremental, each earlier task's head (L_old averaged over those heads);
domain-incremental, the shared head; class-incremental, the columns of the classes of
earlier tasks (van de Ven's single-head variant). The paper's warm-up stage (training the
new head alone first) is not done. Hyperparameters: strength = lambda_o, temperature = T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engram.schema import opt
from engram.methods.base import Context, Method, ProblemInfo, frozen_copy, needs_class_scores
from engram.models.protocol import batch_norm_statistics_frozen


@dataclass
class LwFParams:
    strength: float = opt(1.0, "lambda_o: weight of the distillation loss", low=0.0)
    temperature: float = opt(2.0, "T: softens both distributions", low=0.01)


def distillation(old_logits: torch.Tensor, new_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of -sum_j softmax(old/T)_j log softmax(new/T)_j; logits (B, K)."""
    targets = F.softmax(old_logits / temperature, dim=-1)
    return -(targets * F.log_softmax(new_logits / temperature, dim=-1)).sum(-1).mean()


class LwF(Method):
    """Distil the previous model's outputs for earlier tasks on the new task's images."""

    Params = LwFParams

    def __init__(self, params: LwFParams | None = None) -> None:
        super().__init__(params)
        self.old_model: torch.nn.Module | None = None
        self.old_columns: torch.Tensor | None = None  # class-incremental: earlier classes
        self.n_old_heads = 0
        self._loaded: dict | None = None  # old model weights waiting for a model to fill

    def before_task(self, ctx: Context) -> None:
        if ctx.task.index == 0:
            return
        # At a task start the model is the previous task's final model (also after a resume,
        # which restarts from a task boundary), so the snapshot needs no checkpoint state.
        self.old_model = frozen_copy(ctx.model)
        earlier = ctx.seen_tasks[:-1]
        self.n_old_heads = len(earlier)
        if ctx.stream.scenario == "class":
            self.old_columns = torch.unique(torch.cat([t.train.y for t in earlier]))

    def unusable_reason(self, problem: ProblemInfo) -> str | None:
        return needs_class_scores(problem, "distils a softmax over the outputs")

    def distillation_inputs(self, ctx: Context) -> torch.Tensor:
        """The images the old model's outputs are distilled on: LwF uses the new task's."""
        return ctx.batch.x

    def _earlier_outputs(self, model: torch.nn.Module, x: torch.Tensor, ctx: Context) -> list:
        if ctx.stream.n_heads > 1:  # every head at once, (B, H, K); keep the earlier heads
            raw = model.all_logits(x).view(len(x), model.n_heads, model.head_dim)
            return [raw[:, h] for h in range(self.n_old_heads)]
        logits = model(x)
        return [logits[:, self.old_columns] if self.old_columns is not None else logits]

    def penalty(self, ctx: Context) -> torch.Tensor | None:
        if self.old_model is None and self._loaded is not None:  # restored from a state dict
            self.old_model, self._loaded = frozen_copy(ctx.model, self._loaded), None
        if self.old_model is None:
            return None
        x = self.distillation_inputs(ctx)
        with torch.no_grad():
            old = self._earlier_outputs(self.old_model, x, ctx)
        with batch_norm_statistics_frozen(ctx.model):  # x is (or holds) the trained batch
            new = self._earlier_outputs(ctx.model, x, ctx)
        loss = sum(distillation(o, n, self.params.temperature) for o, n in zip(old, new)) / len(old)
        return self.params.strength * loss

    def state_dict(self) -> dict:
        old = self.old_model.state_dict() if self.old_model is not None else self._loaded
        return {"old_model": old, "old_columns": self.old_columns, "n_old_heads": self.n_old_heads}

    def load_state_dict(self, state: dict) -> None:
        self.old_model, self._loaded = None, state["old_model"]
        self.old_columns, self.n_old_heads = state["old_columns"], int(state["n_old_heads"])
