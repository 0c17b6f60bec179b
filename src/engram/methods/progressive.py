"""Progressive neural networks (Rusu et al. 2016, "Progressive Neural Networks", arXiv:1606.04671).

One column per task, each a copy of the base network with fresh weights. Column k learns task
k; every earlier column is frozen, and column k reads each earlier column's activations
through lateral connections. The basic form (the paper's Eq. 1) is implemented:

    h_i^(k) = f( W_i^(k) h_{i-1}^(k) + sum_{j<k} U_i^(k:j) h_{i-1}^(j) )

at every Linear/Conv2d layer after the first and at the output layer (no activation there:
the logits). The first layer reads the input x, which every column shares, so it has no
laterals. A lateral U_i^(k:j) is Linear(in, out, bias=False) for a linear layer and
Conv2d(in, out, 1, stride as the layer's, bias=False) for a conv layer (the 1x1 reduction the
paper uses in conv adapters). Simplifications against the paper:
- no adapters (Eq. 2: the learned scale alpha, the projection V and the non-linearity
  before U are left out), as in the A-GEM repository's PNN baseline;
- stateless layers of the body (activations, pooling, flatten, dropout) are applied to each
  column as in the base network; only Linear and Conv2d layers may carry parameters;
- each column is a full copy of the base network's layers, so in task-incremental learning
  its output layer holds every task's head and column k uses only head k (the other heads'
  rows stay at their initial values and are billed as part of the column); the head
  laterals likewise have n_heads * head_dim outputs;
- the laterals start from PyTorch's default initialisation times `lateral_scale`
  (the paper does not say how U is initialised; 0 starts each new column as an
  independent network whose laterals then learn from zero).

Which column answers. Task-incremental: each example uses the column of its task id (only
columns 0..max task of the batch are computed). Domain- and class-incremental have no task
id at test time (`task_ids_at_test`): every example uses the most recently trained column,
which sees all earlier columns through its laterals; while training task k that is column
k, the one being trained.

Training task k: before_task freezes every parameter outside column k and its laterals
(requires_grad False, grad None), and the runner's optimizer is made afterwards from
model.parameters(). SGD and Adam skip parameters whose grad is None, weight decay and
momentum included, so earlier columns stay bit-identical (tested, also with weight decay).

Memory. All len(stream) columns and their O(T^2) laterals are preallocated in
prepare_model (the parameter set must be fixed before a checkpoint is loaded): a future
column exists from the start but is neither trained nor read by earlier columns, and is
not billed until its task starts. The live model is column 0 (one base network); after
task t (1-based) extra_bytes is every other column used so far with its laterals:

    bytes * ( (t - 1) * P + L * t (t - 1) / 2 )

with P the base network's parameter count and L the lateral parameters from one earlier
column into a later one (sum over lateral layers of in * out, and features x outputs at
the head).

Composing with other methods: the net has `features(x, task)` (each example's column) but
no `head` and no `output(features)` (a column's output also reads earlier columns), so LwF
does not compose; a task-incremental forward reads the batch's largest task id as a
Python int, which vmap-based per-example gradients (EWC, MAS, OGD) cannot trace. Nothing
is shared between columns, so those regularisers would have nothing to protect anyway.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engram.schema import opt
from engram.errors import ConfigError
from engram.methods.base import Context, Method, task_ids_at_test
from engram.models.protocol import require_structure

PARAMETRIC = (nn.Linear, nn.Conv2d)


@dataclass
class ProgressiveParams:
    lateral_scale: float = opt(1.0, "multiplies the laterals' default initial weights "
                               "(0: each new column starts as an independent network)", low=0.0)


def lateral_for(layer: nn.Module) -> nn.Module:
    """U^(k:j) for one layer: maps an earlier column's input of that layer to its output."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, layer.out_features, bias=False)
    if 2 * layer.padding[0] != layer.dilation[0] * (layer.kernel_size[0] - 1) or \
            2 * layer.padding[1] != layer.dilation[1] * (layer.kernel_size[1] - 1):
        raise ConfigError("progressive: a conv layer without 'same' padding has an output size "
                          "a 1x1 lateral cannot match; use padding (kernel_size - 1) // 2")
    return nn.Conv2d(layer.in_channels, layer.out_channels, 1, stride=layer.stride, bias=False)


class Column(nn.Module):
    """One column: a copy of the base body and head, plus laterals from `index` earlier
    columns at every parametric layer after the first (keyed by body position) and at the
    head (key "head"): laterals[key][j] = U^(index:j)."""

    def __init__(self, body: nn.Sequential, head: nn.Linear, index: int) -> None:
        super().__init__()
        self.body, self.head = body, head
        self.laterals = nn.ModuleDict()
        if index == 0:
            return
        parametric = [i for i, layer in enumerate(body) if isinstance(layer, PARAMETRIC)]
        for i in parametric[1:]:  # the first layer reads x, which every column shares
            self.laterals[str(i)] = nn.ModuleList(lateral_for(body[i]) for _ in range(index))
        self.laterals["head"] = nn.ModuleList(lateral_for(head) for _ in range(index))


# Laterals are built for the body's Linear/Conv2d layers and the head, so every other body
# layer must be stateless (engram.models.protocol.NEEDS).
MODEL_NEEDS = ("head", "linear_conv_body")


class ProgressiveNet(nn.Module):
    """T columns of a ContinualNet with laterals; `forward(x, task) -> logits (B, head_dim)`.

    With `by_task` (task-incremental) each example uses its task's column; otherwise every
    example uses `active_column`, the column of the task started last (set by the method).
    """

    def __init__(self, columns: list[Column], n_heads: int, head_dim: int, by_task: bool) -> None:
        super().__init__()
        self.columns = nn.ModuleList(columns)
        self.n_heads, self.head_dim = n_heads, head_dim
        self.by_task = by_task
        self.active_column = 0

    def get_extra_state(self) -> dict[str, int]:
        return {"active_column": self.active_column}  # checkpointed with the weights

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.active_column = int(state["active_column"])

    def _columns_of(self, x: torch.Tensor, task: torch.Tensor | None) -> torch.Tensor:
        """The column index of each example, (B,)."""
        if self.by_task and task is not None:
            return task.long()
        # no task ids (domain/class, or features(x) for replay's herding): the active column
        return torch.full((len(x),), self.active_column, dtype=torch.long, device=x.device)

    def _hidden(self, x: torch.Tensor, last: int) -> list[torch.Tensor]:
        """Body outputs of columns 0..last, each (B, F): the columns run side by side, layer
        by layer, because column k's layer i reads layer i-1 of every column j <= k."""
        hs = [x] * (last + 1)  # h_0 = x for every column
        for i in range(len(self.columns[0].body)):
            key = str(i)
            new = []
            for k in range(last + 1):
                column = self.columns[k]
                out = column.body[i](hs[k])  # W_i^(k) h_{i-1}^(k) (+ bias), or a stateless layer
                if key in column.laterals:
                    for j, lateral in enumerate(column.laterals[key]):
                        out = out + lateral(hs[j])  # U_i^(k:j) h_{i-1}^(j)
                new.append(out)
            hs = new
        return hs

    def _logits(self, hs: list[torch.Tensor], k: int) -> torch.Tensor:
        """Column k's output layer, (B, n_heads * head_dim)."""
        column = self.columns[k]
        out = column.head(hs[k])
        if k > 0:
            for j, lateral in enumerate(column.laterals["head"]):
                out = out + lateral(hs[j])
        return out

    def features(self, x: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        """Body features (B, F) of each example's column (task-incremental with task ids),
        else of the active column."""
        columns = self._columns_of(x, task)
        last = self._last(columns, task)
        hs = torch.stack(self._hidden(x, last))  # (C, B, F)
        return hs[columns, torch.arange(len(x), device=x.device)]

    def _last(self, columns: torch.Tensor, task: torch.Tensor | None) -> int:
        if self.by_task and task is not None:
            return int(columns.max())  # one sync: which columns this batch needs
        return self.active_column

    def forward(self, x: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        if self.by_task and task is None:
            raise ValueError("a task-incremental progressive net needs the task id of every example")
        columns = self._columns_of(x, task)
        last = self._last(columns, task)
        hs = self._hidden(x, last)
        rows = torch.arange(len(x), device=x.device)
        if self.by_task:
            needed = range(last + 1)
            logits = torch.stack([self._logits(hs, k) for k in needed])[columns, rows]  # (B, H*K)
        else:
            logits = self._logits(hs, last)
        if self.n_heads == 1:
            return logits
        return logits.view(len(x), self.n_heads, self.head_dim)[rows, task]  # (B, K)

    def output(self, features: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        raise TypeError("a progressive net cannot compute logits from one column's features: "
                        "its output layer also reads every earlier column through laterals; "
                        "call model(x, task)")


def build_progressive(model: nn.Module, n_columns: int, by_task: bool, seed: int,
                      lateral_scale: float = 1.0) -> ProgressiveNet:
    """Columns 1.. get fresh weights from each layer's reset_parameters, drawn on the CPU
    from `seed` (the global RNG is left as it was); column 0 keeps `model`'s weights."""
    require_structure(model, MODEL_NEEDS, "progressive")
    device = next(model.parameters()).device
    template = copy.deepcopy(model).cpu()
    columns = [Column(copy.deepcopy(template.body), copy.deepcopy(template.head), 0)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for k in range(1, n_columns):
            column = Column(copy.deepcopy(template.body), copy.deepcopy(template.head), k)
            for layer in column.modules():
                if isinstance(layer, PARAMETRIC):
                    layer.reset_parameters()
            with torch.no_grad():
                for lateral in column.laterals.parameters():
                    lateral.mul_(lateral_scale)
            columns.append(column)
    return ProgressiveNet(columns, model.n_heads, model.head_dim, by_task).to(device)


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class Progressive(Method):
    """A new, laterally connected column per task; earlier columns frozen."""

    Params = ProgressiveParams
    model_needs = MODEL_NEEDS

    def __init__(self, params: ProgressiveParams | None = None) -> None:
        super().__init__(params)
        self.columns_used = 0  # columns whose task has started
        self.column_bytes: list[int] = []  # each column's parameters with its laterals

    def prepare_model(self, model: nn.Module, ctx: Context) -> nn.Module:
        seed = int(torch.randint(2**62, (), generator=ctx.generator))
        net = build_progressive(model, len(ctx.stream), task_ids_at_test(ctx), seed,
                                self.params.lateral_scale)
        self.column_bytes = [parameter_bytes(column) for column in net.columns]
        return net

    def before_task(self, ctx: Context) -> None:
        net = ctx.model
        if not isinstance(net, ProgressiveNet):
            raise TypeError("progressive: ctx.model is not the net prepare_model returned")
        k = ctx.task.index
        for index, column in enumerate(net.columns):
            for p in column.parameters():
                p.requires_grad_(index == k)  # column k and its laterals U^(k:j) train
                if index != k:
                    p.grad = None  # the optimizer skips parameters without a gradient
        net.active_column = k
        self.columns_used = max(self.columns_used, k + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"columns_used": self.columns_used}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.columns_used = int(state["columns_used"])

    def extra_bytes(self) -> int:
        """Columns 1..used-1 with their laterals: what the net uses beyond one base network."""
        return sum(self.column_bytes[1:self.columns_used])
