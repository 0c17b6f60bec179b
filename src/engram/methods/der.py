"""Dark Experience Replay: DER and DER++ (Buzzega et al., NeurIPS 2020, "Dark Experience for
General Continual Learning: a Strong, Simple Baseline", Algorithms 1 and 2).

A reservoir memory of `memory` examples (replay's Algorithm R, `reservoir_slots`) keeps, with
each example x, its target y, its task id and z = the network's logits on x at the time it
was stored: all of them, every head's (`all_logits`, (M, n_heads * head_dim)); engram's
class-incremental head has every class's column from the start, so z has a fixed width. Each
step adds to the task's loss, on examples drawn from the memory,

    DER:    L = L_task + alpha * mean (z' - h(x'))^2                 (x', z') ~ M
    DER++:  L = L_task + alpha * mean (z' - h(x'))^2 + beta * CE(f(x''), y'')
                                                      (x'', y'') ~ M, drawn independently

h(x) = all_logits(x), f(x) = net(x, task) (each example's own head); the squared error is
averaged over the batch and the logits (torch's mse_loss, as the authors' Mammoth code does).
The buffer batches are extra forward passes in `penalty`, on inputs augmented by ctx.transform
when it is set (the paper augments x' and x''); with the problem's loss (`ctx.loss_fn`: cross
entropy, or squared error on a regression problem) in the beta term.

Which logits are stored. The paper stores the logits of the step's own forward pass (on the
augmented input, before the update, in training mode). Here, in `after_step`, the examples
the reservoir keeps are passed once more through the network in eval mode, unaugmented, under
no_grad: z is then the network's response to the stored example itself at storing time (one
update later than the paper's), with no dropout noise, no dependence on the other examples
of the batch through batch-norm statistics, and no side effect on batch-norm running
statistics. It costs a forward pass over the kept examples only (a fraction memory / seen of
the stream once the memory is full). The price, with BatchNorm: the first examples are
stored within a task's first steps, when the running statistics (which eval mode uses) have
seen few batches, so their z can differ from the training-mode response the MSE term is
later matched against. On an MLP (no dropout, no BatchNorm) z equals the paper's up to the
one update: on Seq-MNIST storing the logits before the update gave the same accuracy
(README, "Standard benchmarks").

Memory examples are drawn uniformly with replacement, as engram's replay does (Mammoth draws
without replacement; for batches much smaller than the memory the two agree).

Defaults: memory 500 with Mammoth's best hyperparameters for Seq-CIFAR-10 at that buffer size
(aimagelab/mammoth, utils/best_args.py, 'seq-cifar10'): DER alpha 0.3; DER++ alpha 0.2,
beta 0.5 (there also: lr 0.03, batch and minibatch size 32, 50 epochs; buffer 200: DER alpha
0.3, DER++ alpha 0.1, beta 0.5; buffer 5120: DER alpha 0.3, DER++ alpha 0.1, beta 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from engram.data.streams import TensorSet
from engram.methods.base import Batch, Context, Method
from engram.models.protocol import eval_mode
from engram.methods.replay import empty_memory, memory_draw, reservoir_insert
from engram.schema import opt


@dataclass
class DERParams:
    memory: int = opt(500, "examples (with their logits) the buffer holds", low=1)
    replay_batch_size: int | None = opt(None, "memory examples per term and step (null: "
                                              "train.batch_size)", low=1)
    alpha: float = opt(0.3, "weight of the logit-matching term alpha * mean (z' - h(x'))^2",
                       low=0.0)


@dataclass
class DERppParams(DERParams):
    alpha: float = opt(0.2, "weight of the logit-matching term alpha * mean (z' - h(x'))^2",
                       low=0.0)
    beta: float = opt(0.5, "weight of the cross-entropy on a second memory batch", low=0.0)


class DER(Method):
    """Reservoir memory of examples with their logits; match the logits on replay (DER)."""

    Params = DERParams
    second_batch: ClassVar[bool] = False  # DER++ draws a second memory batch for its beta term

    def __init__(self, params: DERParams | None = None) -> None:
        super().__init__(params)
        self.buffer: TensorSet | None = None  # x (M, ...), y (M,), task (M,)
        self.logits: torch.Tensor | None = None  # (M, n_heads * head_dim) z at storing time
        self.n_seen = 0  # examples offered to the reservoir so far

    @property
    def beta(self) -> float:
        """Weight of the replayed cross-entropy: none in DER."""
        return 0.0

    @property
    def n_filled(self) -> int:
        return min(self.n_seen, self.params.memory)

    def draw(self, ctx: Context) -> tuple[TensorSet, torch.Tensor]:
        """A batch of memory examples drawn uniformly with replacement, x augmented by
        ctx.transform when set, and their stored logits (B, L)."""
        pick = memory_draw(self.n_filled, self.params.replay_batch_size, ctx)
        pick = pick.to(self.logits.device)
        x, y, task = (part[pick] for part in self.buffer)
        if ctx.transform is not None:
            x = ctx.transform(x, ctx.generator)
        return TensorSet(x, y, task), self.logits[pick]

    def penalty(self, ctx: Context) -> torch.Tensor | None:
        if self.n_filled == 0:
            return None
        model, alpha = ctx.model, self.params.alpha
        # Both draws happen whatever the weights, so alpha = 0 and alpha > 0 see the same
        # random numbers (and the same beta batch); a zero-weight term skips its forward pass.
        logit_batch, stored = self.draw(ctx)
        total = torch.zeros((), device=stored.device)
        if alpha > 0:
            total = total + alpha * F.mse_loss(model.all_logits(logit_batch.x), stored)
        if self.second_batch:
            label_batch, _ = self.draw(ctx)
            if self.beta > 0:
                outputs = model(label_batch.x, label_batch.task)
                total = total + self.beta * ctx.loss_fn(outputs, label_batch.y)
        return total

    @torch.no_grad()
    def stored_logits(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        """z = all_logits(x) (n, L) of the network now, in eval mode (see the module doc)."""
        with eval_mode(ctx.model):
            return ctx.model.all_logits(x).float()

    def after_step(self, batch: Batch, ctx: Context) -> None:
        memory, n = self.params.memory, len(batch)
        if self.buffer is None:
            self.buffer = empty_memory(batch, memory)
        slots, sources = reservoir_insert(self.buffer, batch, self.n_seen, ctx.generator)
        if len(slots):
            logits = self.stored_logits(batch.x[sources], ctx)  # (k, L) of the kept examples
            if self.logits is None:
                self.logits = logits.new_zeros((memory, logits.shape[1]))
            self.logits[slots] = logits
        self.n_seen += n

    def state_dict(self) -> dict[str, Any]:
        buffer = None if self.buffer is None else list(self.buffer)
        return {"buffer": buffer, "logits": self.logits, "n_seen": self.n_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = None if state["buffer"] is None else TensorSet(*state["buffer"])
        self.logits = state["logits"]
        self.n_seen = int(state["n_seen"])


class DERpp(DER):
    """DER plus the cross-entropy on a second, independently drawn memory batch (DER++)."""

    Params = DERppParams
    second_batch = True

    @property
    def beta(self) -> float:
        return self.params.beta

