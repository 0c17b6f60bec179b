"""A-GEM: averaged gradient episodic memory (Chaudhry et al. 2019, "Efficient lifelong
learning with A-GEM", ICLR).

An episodic memory of earlier tasks' examples (here filled by reservoir sampling, as in
`replay`) gives, at every step, a reference gradient g_ref: the loss gradient on a random
memory batch. If the new gradient g would increase that loss (g . g_ref < 0), it is
projected so that it no longer does:

    g~ = g - (g . g_ref / (g_ref . g_ref + eps)) g_ref     if g . g_ref < 0,   else g~ = g

(facebookresearch/agem model.py; eps as in van de Ven's code). The memory is only used for
the constraint: A-GEM never trains on it directly. It holds earlier tasks only: a finished
task's training examples are offered to a reservoir of `memory` slots (uniform over all
earlier tasks' examples) when the task ends; the paper's code fills per-class slots. The
memory loss is the problem's own training loss (`ctx.loss_fn`: cross-entropy, or squared
error on the plasticity problems' regression). Hyperparameters: memory (examples kept),
reference_batch_size (256 in the paper for MNIST), eps, project.

Under which optimizer (`project`): the rule above keeps the memory loss from rising to first
order only when the step is -lr g~, i.e. under plain SGD. Adam rescales each coordinate and
momentum mixes in earlier gradients (measured: the memory loss rose on 27 of 30 Adam steps).
With `project: update` (the default) the gradient is projected as above and then the update
the optimizer actually made, d = w_new - w_old, gets the same rule in update form: if
g_ref . d > 0 (the step would raise the memory loss to first order),

    d~ = d - (d . g_ref / (g_ref . g_ref + eps)) g_ref,

and w_old + d~ is written back (`engram.methods.base.UpdateSnapshot`); g_ref is the reference
gradient at w_old. Under plain SGD without momentum or weight decay d = -lr g~ already
satisfies it (up to rounding and the part eps / (g_ref . g_ref) of the conflict that eps
leaves in g~), so this changes nothing more. `project: gradient` is the paper's
gradient rule alone (the behaviour before this option existed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from engram.schema import opt
from engram.data.streams import TensorSet
from engram.methods.base import Context, Method, UpdateSnapshot, flat_grad, set_flat_grad
from engram.methods.replay import Replay, ReplayParams


@dataclass
class AGEMParams:
    memory: int = opt(200, "examples the episodic memory holds (fixed budget)", low=1)
    reference_batch_size: int = opt(256, "memory examples per reference gradient", low=1)
    eps: float = opt(1e-7, "added to g_ref . g_ref in the projection", low=0.0)
    project: Literal["update", "gradient"] = opt(
        "update", "update: also project the step the optimizer actually makes (holds under "
        "Adam and momentum too); gradient: the paper's gradient projection only, which holds "
        "under plain SGD alone")


def project_agem(grad: torch.Tensor, reference: torch.Tensor, eps: float) -> torch.Tensor:
    """A-GEM's projection of a flat gradient against a flat reference gradient. An update d
    (a step along -g) is projected as -project_agem(-d, reference, eps)."""
    dot = torch.dot(grad, reference)
    if dot >= 0:
        return grad
    return grad - dot / (torch.dot(reference, reference) + eps) * reference


class AGEM(Method):
    """Project each gradient so it does not increase the loss on an episodic memory."""

    Params = AGEMParams
    rewrites_gradients = True  # see Method.rewrites_gradients

    def __init__(self, params: AGEMParams | None = None) -> None:
        super().__init__(params)
        # the memory is a reservoir, filled exactly as replay's (never mixed into batches)
        self.memory = Replay(ReplayParams(memory=self.params.memory))
        self.snapshot = UpdateSnapshot()
        self.reference: torch.Tensor | None = None  # g_ref at the weights before this step

    def after_backward(self, ctx: Context) -> None:
        filled = self.memory.n_filled
        if filled == 0:
            return
        buffer = self.memory.buffer
        size = min(self.params.reference_batch_size, filled)
        pick = torch.randperm(filled, generator=ctx.generator)[:size].to(buffer.y.device)
        params = [p for p in ctx.model.parameters() if p.grad is not None]  # the trainable ones
        reference_loss = ctx.loss_fn(ctx.model(buffer.x[pick], buffer.task[pick]), buffer.y[pick])
        reference = torch.autograd.grad(reference_loss, params)
        flat_reference = torch.cat([g.reshape(-1) for g in reference])
        set_flat_grad(params, project_agem(flat_grad(params), flat_reference, self.params.eps))
        if self.params.project == "update":
            self.reference = flat_reference
            self.snapshot.take(params)

    def correct_update(self, ctx: Context) -> None:
        if not self.snapshot.taken:
            return
        update = self.snapshot.update()
        if torch.dot(update, self.reference) > 0:  # the step would raise the memory loss
            self.snapshot.replace(-project_agem(-update, self.reference, self.params.eps))
        else:
            self.snapshot.forget()
        self.reference = None

    def after_task(self, ctx: Context) -> None:
        # The memory holds earlier tasks only (as in A-GEM's code, it is written when a task
        # ends): the finished task's examples are offered to the reservoir in batches.
        data = ctx.task.train
        for start in range(0, len(data), 256):
            self.memory.after_step(TensorSet(*(part[start:start + 256] for part in data)), ctx)

    def state_dict(self) -> dict[str, Any]:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state)
