"""Diagonal Fisher information estimators: pure functions, the model is never changed.

The Fisher being approximated (Martens 2020; van de Ven 2025, "On the computation of the
Fisher information in continual learning", ICLR blog post):

    F_i = E_x E_{y ~ p_theta(y|x)} [ (d log p_theta(y|x) / d theta_i)^2 ]

Libraries disagree silently on how to estimate it; engram makes the choice a named
parameter that is recorded with every result:

- "exact":     (1/N) sum_x sum_c p(c|x) g_c(x)^2            expectation over labels (C grads per x)
- "sample":    (1/N) sum_x g_{c_x}(x)^2,  c_x ~ p(.|x)       an unbiased Monte-Carlo estimate
- "empirical": (1/N) sum_x g_{y_x}(x)^2,  y_x the true label the "empirical Fisher"
- "batch":     (1/M) sum_b (mean_{x in b} g_{y_x}(x))^2      squared mini-batch *mean* gradient
                                                            (Avalanche/PyCIL style; ~ empirical / b
                                                            near an optimum, so lambda differs)

where g_c(x) = d log p(c|x) / d theta. The per-example sums come from
engram.importance.per_example: for nn.Linear / nn.Conv2d parameters in closed form from the
layer inputs and output gradients of one forward and one batched backward (C seeds e_c - p
at the logits for "exact", one for "sample" / "empirical"); every other parameter through
torch.func (vmap over a vjp of a functional call). The tests check every estimator, on both
paths, against a plain per-example autograd loop. The model is evaluated in eval mode (pitfall 1 of the
reference sheet) and restored to its previous mode afterwards.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from engram.importance.per_example import per_example_statistic

FisherEstimator = Literal["exact", "sample", "empirical", "batch"]
FISHER_ESTIMATORS: tuple[str, ...] = ("exact", "sample", "empirical", "batch")
# Per-example gradients of one chunk may hold about this many floats (128 MiB in float32):
# the default chunk size is the largest that fits, at least one example; where one
# example's C gradients do not fit, the classes are taken in groups (per_example._groups).
CHUNK_BUDGET_FLOATS = 2**25


def fisher_diagonal(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: torch.Tensor,
                    estimator: FisherEstimator = "exact", *, batch_size: int = 32,
                    generator: torch.Generator | None = None,
                    chunk_size: int | None = None, fast: bool = True) -> dict[str, torch.Tensor]:
    """Estimate the diagonal Fisher of `model` on examples x (N, ...), targets y (N,), tasks (N,).

    Returns {parameter name: tensor shaped like the parameter}. `batch_size` is used only by
    the "batch" estimator; `generator` only by "sample" (labels drawn once per chunk);
    `chunk_size` = examples per forward pass. chunk_size=None picks the largest chunk within
    CHUNK_BUDGET_FLOATS floats (at least one example): the hooked layers' activations x (C + 1)
    per example (C = 1 unless "exact"), or, with no hooked layer, the per-example gradients
    (C x P floats for "exact", P otherwise: for a 784-400-400-10 MLP, 7 and 70 examples).
    Whatever the chunk, the per-example gradients materialised at once stay within the budget
    (the C classes in groups if need be) unless one gradient of one layer exceeds it.
    fast=False computes every parameter through torch.func (the slower reference path).
    """
    if estimator not in FISHER_ESTIMATORS:
        raise ValueError(f"unknown Fisher estimator {estimator!r}; choose one of {FISHER_ESTIMATORS}")
    if len(y) == 0:
        raise ValueError("the Fisher needs at least one example")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    was_training = model.training
    model.eval()
    try:
        params = {name: p.detach() for name, p in model.named_parameters()}
        fisher = {name: torch.zeros_like(p) for name, p in params.items()}
        if estimator == "batch":
            _batch_fisher(model, params, fisher, x, y, task, batch_size)
        else:
            _per_example_fisher(model, fisher, x, y, task, estimator, generator, chunk_size, fast)
    finally:
        model.train(was_training)
    return fisher


def _n_seeds(model: nn.Module, x: torch.Tensor, task: torch.Tensor, estimator: str) -> int:
    """Backward passes per example: C for "exact" (one per class), else 1."""
    if estimator != "exact":
        return 1
    with torch.no_grad():
        return model(x[:1], task[:1]).shape[-1]  # C outputs


def _fisher_seeds(estimator: str, y: torch.Tensor, generator: torch.Generator | None):
    """seeds_fn for per_example_statistic: the gradient of log p(c|x) with respect to the
    logits z is e_c - softmax(z), so the seeds are e_c - p (K = C classes weighted by p(c|x)
    for "exact", K = 1 with the drawn or the true label otherwise). Called once per chunk,
    in order: "sample" draws its labels there, one multinomial call per chunk."""
    position = [0]

    def seeds_fn(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(logits, dim=-1)  # (B, C)
        n_classes = probs.shape[-1]
        if estimator == "exact":
            eye = torch.eye(n_classes, dtype=probs.dtype, device=probs.device)
            return eye.unsqueeze(1) - probs.unsqueeze(0), probs.T  # (C, B, C), (C, B)
        if estimator == "sample":
            labels = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1)
        else:  # empirical
            labels = y[position[0]:position[0] + len(probs)]
        position[0] += len(probs)
        one_hot = F.one_hot(labels.to(probs.device), n_classes).to(probs.dtype)
        return (one_hot - probs).unsqueeze(0), torch.ones_like(probs[:, 0]).unsqueeze(0)

    return seeds_fn


def _per_example_fisher(model, fisher, x, y, task, estimator, generator, chunk_size, fast):
    n_seeds = _n_seeds(model, x, task, estimator)
    sums = per_example_statistic(model, x, task, _fisher_seeds(estimator, y, generator), "square",
                                 n_seeds, chunk_size=chunk_size,
                                 budget_floats=CHUNK_BUDGET_FLOATS, fast=fast)
    for name in fisher:
        fisher[name] += sums[name] / len(y)


def _batch_fisher(model, params, fisher, x, y, task, batch_size):
    n_batches = 0
    for start in range(0, len(y), batch_size):
        loss = F.cross_entropy(model(x[start:start + batch_size], task[start:start + batch_size]),
                               y[start:start + batch_size])  # mean over the batch
        grads = torch.autograd.grad(loss, list(model.parameters()))
        for (name, _), g in zip(model.named_parameters(), grads):
            fisher[name] += g.pow(2)
        n_batches += 1
    for name in fisher:
        fisher[name] /= n_batches
