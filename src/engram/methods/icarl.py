"""iCaRL: incremental classifier and representation learning (Rebuffi et al., CVPR 2017).

Three parts, as in the paper:

- **Exemplar memory.** A fixed budget of K examples in all. After each task every class seen
  so far holds m = K // (classes seen) exemplars: earlier classes keep the first m of their
  ordered lists (Alg. 5), each new class gets m chosen by herding on the L2-normalised
  features (Alg. 4): `engram.methods.replay.herding_memory`, the memory replay's `herding`
  policy keeps. A class is a (task id, target) key.
- **Training.** The task trains on its examples with the exemplars mixed in (one shuffled
  set, as the paper's "training set = new data ∪ exemplars"), and from the second task on a
  distillation term pulls the sigmoid outputs of the earlier classes toward those of the
  network as it was when the task began (frozen copy, eval mode, on the same batch):

      D = strength * (1/B) sum_b sum_{c old} BCE(sigmoid(z_c(x_b)), sigmoid(z_old_c(x_b)))

  "Old outputs" are the columns of every class of earlier tasks (class- and domain-IL; in
  domain-IL that is the shared head) or the heads of earlier tasks (task-IL).
  Deviation: the paper's loss is binary cross-entropy on *all* outputs, one-hot targets for
  the new classes and these distillation targets for the old ones; Mammoth's iCaRL does the
  same (aimagelab/mammoth, models/icarl.py: `binary_cross_entropy_with_logits` on the seen
  classes' outputs, old-class targets `sigmoid(old_net(x))`). engram's runner owns the
  classification loss (cross-entropy on every trained example, exemplars included), so here
  the new-class part is that cross-entropy and only the old-class part, D with strength 1,
  is the paper's (per-class sum as in its formula, so each old output gets the paper's
  gradient sigmoid(z) - sigmoid(z_old)). Cost per step: two more forward passes (the frozen
  copy and the live network on the batch), as LwF.
- **Nearest-mean-of-exemplars classifier (NME)** at evaluation: `eval_model` returns
  `NearestMeanOfExemplars`, which computes, with the current network, the mean of the
  L2-normalised features of each class's exemplars, re-normalised (as the authors' code
  does), and gives each example the class whose mean is nearest. Its outputs are scores
  -||phi(x) - mu_c||^2 (argmax = the NME prediction); a class without exemplars (not seen
  yet; in task-IL, another task's) scores NO_MEAN_SCORE, below every real score (unit vectors
  are at most 2 apart). The loss `measure` reports on them is the cross-entropy of a softmax
  over negative squared distances (the prototypical-network loss): meaningful for comparing
  NME runs, but bounded near log(classes) because the distances lie in [0, 4], so it is not
  comparable with a linear head's loss. The paper also averages the means over horizontally
  flipped exemplars; here only with `flip_means: true` (image inputs only), off by default.

Scenarios: class-IL is its home. In task-IL the nearest mean is searched among the classes
of the example's own task (the task id is given); in domain-IL among all (task, class) means,
predicting the class of the nearest. Needs the network's `features` (herding and NME).
Memory bill: the K exemplars plus the previous network's copy (kept in the checkpoint too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engram.data.streams import TensorSet
from engram.errors import ConfigError
from engram.methods.base import Context, Method, ProblemInfo, frozen_copy, task_ids_at_test
from engram.methods.replay import class_keys, herding_memory
from engram.models.protocol import batch_norm_statistics_frozen, eval_mode
from engram.schema import opt

NO_MEAN_SCORE = -5.0  # score of a class without exemplars: below -4, the lowest real score


@dataclass
class ICaRLParams:
    memory: int = opt(2000, "K: exemplars kept in all; each class seen keeps K // classes", low=1)
    strength: float = opt(1.0, "weight of the distillation term (the paper: 1)", low=0.0)
    flip_means: bool = opt(False, "class means also average the horizontally flipped exemplars "
                           "(the paper's CIFAR setting; image inputs only)")


def unit_features(model: nn.Module, x: torch.Tensor, flip: bool) -> torch.Tensor:
    """L2-normalised features (N, d) of `x`; with `flip`, the average of those of x and of x
    flipped left-right, so a class mean over them is the mean over 2N unit features (the
    paper's class means)."""
    features = F.normalize(model.features(x), dim=1)
    if not flip:
        return features
    if x.ndim != 4:
        raise ConfigError(f"icarl flip_means: true needs image inputs (N, C, H, W); these are "
                          f"{tuple(x.shape)}: set flip_means: false")
    return (features + F.normalize(model.features(x.flip(-1)), dim=1)) / 2


class NearestMeanOfExemplars(nn.Module):
    """iCaRL's classifier: scores -||phi(x) - mu_c||^2 (B, width) for class c, phi the unit
    features of the live network, mu_c the re-normalised mean of class c's exemplars' unit
    features (computed here, once, with the network as it is now). Several means may share a
    target (domain-IL: one per task); a target scores its nearest. With `per_task` (task-IL)
    only the means of the example's own task count. Holds no parameters of its own."""

    def __init__(self, model: nn.Module, exemplars: TensorSet, width: int, per_task: bool,
                 flip: bool = False) -> None:
        super().__init__()
        object.__setattr__(self, "live", model)  # not a submodule: nothing of it is copied
        self.width, self.per_task = width, per_task
        keys = class_keys(exemplars)
        classes = list(dict.fromkeys(keys.tolist()))
        means, self.labels, self.tasks = [], [], []
        with torch.no_grad(), eval_mode(model):  # means without dropout noise or BN updates
            for key in classes:
                rows = keys == key
                means.append(F.normalize(unit_features(model, exemplars.x[rows], flip).mean(0),
                                         dim=0))
                self.labels.append(int(exemplars.y[rows][0]))
                self.tasks.append(int(exemplars.task[rows][0]))
        device = exemplars.y.device
        self.means = torch.stack(means)                                 # (C, d)
        self.labels = torch.tensor(self.labels, device=device)           # (C,)
        self.tasks = torch.tensor(self.tasks, device=device)             # (C,)
        self.train(model.training)

    def train(self, mode: bool = True) -> NearestMeanOfExemplars:
        self.training = mode
        self.live.train(mode)
        return self

    def forward(self, x: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        features = F.normalize(self.live.features(x), dim=1)                        # (B, d)
        squared = ((features[:, None, :] - self.means[None, :, :]) ** 2).sum(-1)    # (B, C)
        if self.per_task:
            squared = squared.masked_fill(task[:, None] != self.tasks[None, :], float("inf"))
        scores = squared.new_full((len(x), self.width), NO_MEAN_SCORE)
        columns = self.labels[None, :].expand(len(x), -1)
        return scores.scatter_reduce(1, columns, -squared, reduce="amax")


class ICaRL(Method):
    """Herding exemplars mixed into training, sigmoid distillation of earlier classes, and
    the nearest-mean-of-exemplars classifier at evaluation."""

    Params = ICaRLParams
    model_needs = ("features",)

    def __init__(self, params: ICaRLParams | None = None) -> None:
        super().__init__(params)
        self.memory: TensorSet | None = None  # x (M, ...), y (M,), task (M,): exemplars
        self.old_model: nn.Module | None = None   # the network when the task began
        self.old_columns: torch.Tensor | None = None  # all_logits columns of earlier classes
        self._loaded: dict | None = None  # old model weights waiting for a model to fill

    def unusable_reason(self, problem: ProblemInfo) -> str | None:
        if not problem.classification:
            return ("classifies by the nearest class mean of its exemplars, and this problem "
                    "is a regression (squared error on real-valued targets), which has no classes")
        if problem.outputs < 2:
            return (f"classifies by the nearest class mean of its exemplars, and this problem "
                    f"has {problem.outputs} output (one class: nothing to tell apart)")
        return None

    def before_task(self, ctx: Context) -> None:
        earlier = ctx.seen_tasks[:-1]
        self._loaded = None
        if not earlier:
            self.old_model, self.old_columns = None, None
            return
        # At a task start the model is the previous task's final model (also after a resume,
        # which restarts from a task boundary), so the copy needs no checkpoint state.
        self.old_model = frozen_copy(ctx.model)
        if ctx.stream.n_heads > 1:  # task-IL: every earlier task's head
            self.old_columns = torch.arange(len(earlier) * ctx.stream.head_dim)
        else:  # one head: the columns of the classes earlier tasks trained
            self.old_columns = torch.unique(torch.cat([t.train.y for t in earlier])).cpu()

    def training_data(self, data: TensorSet, ctx: Context) -> TensorSet:
        return data if self.memory is None else TensorSet.concat([data, self.memory])

    def penalty(self, ctx: Context) -> torch.Tensor | None:
        if self.old_model is None and self._loaded is not None:  # restored from a state dict
            self.old_model, self._loaded = frozen_copy(ctx.model, self._loaded), None
        if self.old_model is None:
            return None
        x = ctx.batch.x
        columns = self.old_columns.to(x.device)
        with torch.no_grad():
            targets = torch.sigmoid(self.old_model.all_logits(x)[:, columns])  # (B, old)
        with batch_norm_statistics_frozen(ctx.model):  # the runner's pass counted x already
            logits = ctx.model.all_logits(x)[:, columns]
        summed = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
        return self.params.strength * summed / len(x)

    def after_task(self, ctx: Context) -> None:
        self.memory = herding_memory(self.memory, ctx.task.train, ctx.model, self.params.memory)

    def eval_model(self, ctx: Context) -> nn.Module:
        if self.memory is None or len(self.memory) == 0:
            return ctx.model  # before the first task ends there are no class means
        return NearestMeanOfExemplars(ctx.model, self.memory, ctx.stream.head_dim,
                                      per_task=task_ids_at_test(ctx),
                                      flip=self.params.flip_means)

    def state_dict(self) -> dict[str, Any]:
        old = self.old_model.state_dict() if self.old_model is not None else self._loaded
        return {"memory": None if self.memory is None else list(self.memory),
                "old_model": old, "old_columns": self.old_columns}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory = None if state["memory"] is None else TensorSet(*state["memory"])
        self.old_model, self._loaded = None, state["old_model"]
        self.old_columns = state["old_columns"]
