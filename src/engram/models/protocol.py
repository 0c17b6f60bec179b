"""Bring your own network: `adapt(module)` makes any nn.Module mapping x -> logits an engram
network, and the structure protocol says which methods can act on it.

THE protocol (what engram's runner and methods call; `ContinualNet` implements it):

    net(x, task)            -> (B, head_dim)   logits; `task` (B,) picks each example's head
    net.all_logits(x)       -> (B, n_heads * head_dim)   every head at once
    net.n_heads, net.head_dim
    net.features(x)         -> (B, F)  \\
    net.output(features, task)         |  only on a network split into a body and a head
    net.body, net.head (nn.Linear)    /

    adapt(module)                            an nn.Sequential whose last child is an nn.Linear:
                                             body = the other children, head = that Linear;
                                             forward = head(body(x)), exactly module(x)
    adapt(module, features=f, head=h)        body = f, head = h (an nn.Linear): forward =
                                             h(f(x)), which replaces module's own forward
    adapt(module) otherwise                  a black box (BlackBoxNet): forward = module(x),
                                             so a custom forward (residual, attention...) is
                                             kept; no features, body or head

Only an nn.Sequential is split on its own: its forward is by definition the chain of its
children. Any other module, even one whose last child is a Linear, may do more in forward
(skip connections, reshapes), so splitting it would silently change the network; it stays a
black box unless `features=` and `head=` say where the split is (and that head(features(x))
is the network). The module's parameters are shared, not copied: training the adapted network
trains `module`'s layers (except a widened head, below).

Heads. With `n_heads` = 1 the head keeps its outputs (head_dim defaults to its width). For
task-incremental learning (`n_heads` > 1, one head of `head_dim` outputs per task) a head
with head_dim outputs is widened: it is replaced by a new nn.Linear(in_features,
n_heads * head_dim) (same bias flag, device and dtype) with torch's default initialisation,
drawn from the global torch RNG (seed it with torch.manual_seed for a reproducible head);
a head that already has n_heads * head_dim outputs is kept. A black box cannot be widened:
with n_heads > 1 the module itself must return n_heads * head_dim logits (task t's head in
columns t * head_dim .. (t + 1) * head_dim - 1).

Structure needs. A method declares what it needs of the network in `Method.model_needs`
(names of `NEEDS`); `unmet_need(model, needs)` says which one a network lacks and why, and
the runner refuses such a method before training (engram.methods.base.refuse_unusable_model)
instead of failing deep inside it.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from engram.errors import ConfigError
from engram.models.nets import ContinualNet
from engram.models.residual import ResidualNet

_BLACK_BOX = "engram.models.adapt found no body/head split in it"
ADAPT_HINT = "pass engram.models.adapt(module, features=..., head=...) to name the split"


class BlackBoxNet(ContinualNet):
    """A user module used as it is: `forward(x, task)` picks each example's head from
    module(x). It has no body/head split: `features` and `output` raise, and `body` and `head`
    do not exist, so methods that need them (`NEEDS`) are refused on it."""

    def __init__(self, module: nn.Module, n_heads: int = 1, head_dim: int | None = None) -> None:
        nn.Module.__init__(self)  # no body and no head: ContinualNet's __init__ would make them
        self.module = module
        self.n_heads, self.head_dim = n_heads, head_dim

    def all_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.module(x)
        if self.n_heads > 1 and (logits.ndim != 2 or logits.shape[1] != self.n_heads * self.head_dim):
            raise ConfigError(
                f"the adapted network returned logits of shape {tuple(logits.shape)}; with "
                f"n_heads={self.n_heads} and head_dim={self.head_dim} a black box must return "
                f"(B, {self.n_heads * self.head_dim}): pass adapt(module, features=..., head=...) "
                "to have engram widen the head instead")
        return logits

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise ConfigError(f"this network is a black box ({_BLACK_BOX}): it has no features(x); "
                          f"{ADAPT_HINT}")

    def output(self, features: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        raise ConfigError(f"this network is a black box ({_BLACK_BOX}): it has no "
                          f"output(features, task); {ADAPT_HINT}")


def adapt(module: nn.Module, *, features: nn.Module | None = None, head: nn.Linear | None = None,
          n_heads: int = 1, head_dim: int | None = None) -> ContinualNet:
    """`module` (x -> logits) as an engram network; see the module docstring for the rules.

    features, head: the split (both or neither); head must be an nn.Linear.
    n_heads: heads (tasks, in task-incremental learning); head_dim: outputs per head (default:
    the head's width; needed for a black box with n_heads > 1).
    Returns a ContinualNet (split) or a BlackBoxNet; ConfigError on inconsistent arguments."""
    if not isinstance(module, nn.Module):
        raise ConfigError(f"adapt: module must be a torch nn.Module, not {type(module).__name__}")
    if n_heads < 1 or (head_dim is not None and head_dim < 1):
        raise ConfigError(f"adapt: n_heads ({n_heads}) and head_dim ({head_dim}) must be >= 1")
    if (features is None) != (head is None):
        raise ConfigError("adapt: pass both features= and head= (the body and the output layer), "
                          "or neither")
    if features is not None:
        if not isinstance(features, nn.Module):
            raise ConfigError(f"adapt: features must be an nn.Module, not {type(features).__name__}")
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"adapt: head must be an nn.Linear, not {type(head).__name__}")
        return _split(features, head, n_heads, head_dim)
    children = list(module.named_children())
    if isinstance(module, nn.Sequential) and children and isinstance(children[-1][1], nn.Linear):
        body = nn.Sequential(OrderedDict(children[:-1]))  # the same layers, names and indices
        return _split(body, children[-1][1], n_heads, head_dim)
    if n_heads > 1 and head_dim is None:
        raise ConfigError(f"adapt: a black-box module with n_heads={n_heads} needs head_dim "
                          "(it must return n_heads * head_dim logits)")
    return BlackBoxNet(module, n_heads, head_dim)


def _split(body: nn.Module, head: nn.Linear, n_heads: int, head_dim: int | None) -> ContinualNet:
    """ContinualNet(body, head), the head widened to n_heads * head_dim outputs if needed."""
    width = head.out_features
    head_dim = head_dim if head_dim is not None else width
    if width == n_heads * head_dim:
        return ContinualNet(body, head.in_features, n_heads, head_dim, head=head)
    if n_heads > 1 and width == head_dim:  # one task's head: make room for every task's
        wide = nn.Linear(head.in_features, n_heads * head_dim, bias=head.bias is not None,
                         device=head.weight.device, dtype=head.weight.dtype)
        return ContinualNet(body, head.in_features, n_heads, head_dim, head=wide)
    expected = (f"{head_dim}" if n_heads == 1
                else f"{head_dim} (one head, widened) or {n_heads * head_dim} (every head)")
    raise ConfigError(f"adapt: the head has {width} outputs; with n_heads={n_heads} and "
                      f"head_dim={head_dim} it must have {expected}")


# ----------------------------------------------------------------------------- structure needs

# A need's name -> what it asks of the network (read as "it needs ...").
NEEDS: dict[str, str] = {
    "features": "body features: features(x) and output(features, task) of a network split into "
                "a body and a linear head",
    "head": "a body module and a separate nn.Linear output layer `head`",
    "sequential_body": "a body that is an nn.Sequential with Linear or Conv2d layers",
    "linear_conv_body": "an nn.Sequential body whose only layers with parameters or buffers "
                        "are Linear and Conv2d (activations, pooling, flatten and dropout are "
                        "fine)",
    "hidden_units": "hidden units of an mlp: an nn.Sequential body without Conv2d whose every "
                    "Linear is directly followed by a ReLU, Tanh, Sigmoid or LeakyReLU module, "
                    "then a Linear head (model.kind: mlp), or a ResidualNet",
    "no_batch_norm": "a network without BatchNorm layers (their running statistics are "
                     "updated in place by every forward pass in training mode and shared by "
                     "every task; this method neither keeps them per task nor computes "
                     "through them correctly)",
    "relu_mlp": "a ReLU mlp: a body of Flatten, Linear, ReLU and Dropout layers only, then a "
                "Linear head (model.kind: mlp with model.activation: relu)",
}
"""The structure needs a method may declare in `Method.model_needs`: name -> what it asks of
the network (read as "it needs ..."); see `unmet_need`."""

UNIT_ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU)
PARAMETRIC_LAYERS = (nn.Linear, nn.Conv2d)
RELU_MLP_LAYERS = (nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout)
BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)  # BatchNorm1d/2d/3d, SyncBatchNorm


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside (no dropout noise, BatchNorm reads its running statistics and does not
    update them); afterwards every module's own mode is restored (mixed modes too)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def batch_norm_statistics_frozen(model: nn.Module) -> Iterator[None]:
    """Forward passes inside leave every BatchNorm layer's running statistics as they were,
    while still normalising with the batch's own statistics in training mode: momentum 0
    (running <- 1 * running + 0 * batch; also for momentum=None, a cumulative average), and
    the count of batches seen written back afterwards (the running mean and variance cannot
    be: autograd keeps them for the backward pass). For extra passes over a batch already
    counted (SAM's gradient at the perturbed weights, a distillation pass over the trained
    batch), which would otherwise count it again."""
    norms = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
    momenta = [m.momentum for m in norms]
    counts = [None if m.num_batches_tracked is None else m.num_batches_tracked.clone()
              for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in zip(norms, momenta, counts):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def residual_net(model: nn.Module) -> ResidualNet | None:
    """The ResidualNet that `model` is or wraps as a black box, else None."""
    inner = model.module if isinstance(model, BlackBoxNet) else model
    return inner if isinstance(inner, ResidualNet) else None


def _split_gap(model: nn.Module) -> str | None:
    if isinstance(model, BlackBoxNet):
        return f"this network is a black box ({_BLACK_BOX})"
    body, head = getattr(model, "body", None), getattr(model, "head", None)
    if not isinstance(body, nn.Module) or not isinstance(head, nn.Linear):
        return f"this {type(model).__name__} has no body module and Linear head"
    return None


def structure_gap(model: nn.Module, need: str) -> str | None:
    """Why `model` does not meet `need` (a phrase, e.g. "its body has Conv2d layers"); None
    when it does. KeyError for a name not in NEEDS."""
    if need not in NEEDS:
        raise KeyError(f"unknown structure need {need!r}; known: {', '.join(NEEDS)}")
    if need == "features":
        if isinstance(model, BlackBoxNet):
            return f"this network is a black box ({_BLACK_BOX})"
        if not all(callable(getattr(model, name, None)) for name in ("features", "output")):
            return f"this {type(model).__name__} has no features(x) and output(features, task)"
        return None
    if need == "no_batch_norm":
        norms = [type(m).__name__ for m in model.modules() if isinstance(m, BATCH_NORMS)]
        return f"it has {len(norms)} {norms[0]} layers" if norms else None
    if need == "hidden_units" and residual_net(model) is not None:
        return None
    gap = _split_gap(model)
    if gap is not None or need == "head":
        return gap
    body = model.body
    if not isinstance(body, nn.Sequential):
        return f"its body is a {type(body).__name__}, not an nn.Sequential"
    layers = list(body.children())
    if need == "sequential_body":
        if not any(isinstance(layer, PARAMETRIC_LAYERS) for layer in layers):
            return "its body has no Linear or Conv2d layer"
        return None
    if need == "linear_conv_body":
        for layer in layers:
            holds = any(True for _ in layer.parameters()) or any(True for _ in layer.buffers())
            if holds and not isinstance(layer, PARAMETRIC_LAYERS):
                return f"its body has a {type(layer).__name__} layer with parameters or buffers"
        return None
    if need == "relu_mlp":
        if not all(isinstance(layer, RELU_MLP_LAYERS) for layer in layers):
            return "its body has: " + ", ".join(type(layer).__name__ for layer in layers)
        return None
    # hidden_units
    if any(isinstance(m, nn.Conv2d) for m in body.modules()):
        return "its body has Conv2d layers, whose units are channels (mlp bodies only)"
    for i, layer in enumerate(layers):
        after = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, nn.Linear) and not isinstance(after, UNIT_ACTIVATIONS):
            return (f"its body's Linear {i} is followed by {type(after).__name__}, not an "
                    "activation module it knows (relu, tanh, sigmoid, leaky_relu)")
    return None


def unmet_need(model: nn.Module, needs: tuple[str, ...] | list[str]) -> str | None:
    """The first of `needs` that `model` does not meet, as a phrase following "it" ("needs
    WHAT, and WHY not"), with a hint when adapt() could help; None when it meets them all."""
    for need in needs:
        gap = structure_gap(model, need)
        if gap is not None:
            hint = f"; {ADAPT_HINT}" if _split_gap(model) is not None and \
                residual_net(model) is None else ""
            return f"needs {NEEDS[need]}, and {gap}{hint}"
    return None


def require_structure(model: nn.Module, needs: tuple[str, ...] | list[str], who: str) -> None:
    """ConfigError "WHO cannot act on this network: it needs ..." when `model` lacks a need."""
    reason = unmet_need(model, needs)
    if reason is not None:
        raise ConfigError(f"{who} cannot act on this network: it {reason}")
