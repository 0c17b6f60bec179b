"""OGD: orthogonal gradient descent (Farajtabar et al. 2020, AISTATS).

After each task, gradients of the model's prediction for a few stored examples are
orthonormalised (Gram-Schmidt) into a basis S that grows across tasks. While learning later
tasks, each loss gradient loses its component in span(S):

    g~ = g - sum_{v in S} (g . v) v

so, to first order, the predictions on the stored examples of earlier tasks do not move.
Variant implemented: OGD-GTL, the gradient of the ground-truth logit f_y(x) (the paper
reports it close to OGD-ALL at 1/C of the memory), with samples_per_task examples drawn at
random from the task's training data (100, as in Bennani et al.'s reimplementation). On a
regression problem (real-valued targets, e.g. the plasticity problems' bit flipping) there is
no true logit: the gradients of every output join the basis (OGD-ALL; one output there).
Memory grows with the stream: T x samples_per_task x P floats (x outputs for regression).

Under which optimizer (`project`): the paper's rule projects the gradient, and the update is
then orthogonal to S only under plain SGD. Adam rescales each coordinate and momentum or
weight decay add other directions, so the step leaves the orthogonal complement (measured:
19% of an Adam update inside span(S)). With `project: update` (the default) the gradient is
projected as above, so the optimizer's moments only ever see projected gradients, and then
the update the optimizer actually made, d = w_new - w_old, is projected the same way and
written back, w = w_old + d - S^T S d (`engram.methods.base.UpdateSnapshot`): under any
optimizer the step is orthogonal to span(S) up to float rounding. Under plain SGD without
momentum or weight decay d is already -lr g~, so this changes nothing but rounding.
`project: gradient` is the paper's rule alone (the behaviour before this option existed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.func import functional_call, grad, jacrev, vmap

from engram.schema import opt
from engram.errors import ConfigError
from engram.methods.base import (Context, Method, UpdateSnapshot, flat_grad, random_subset,
                                 set_flat_grad)


@dataclass
class OGDParams:
    samples_per_task: int = opt(100, "examples whose logit gradients join the basis per task", low=1)
    project: Literal["update", "gradient"] = opt(
        "update", "update: also project the step the optimizer actually makes (orthogonal "
        "under Adam and momentum too); gradient: the paper's gradient projection only, "
        "orthogonal under plain SGD alone")


def orthonormal_extend(basis: torch.Tensor, vectors: torch.Tensor, rel_tol: float = 1e-4
                       ) -> torch.Tensor:
    """Append `vectors` (n, P) to an orthonormal `basis` (M, P) by Gram-Schmidt, dropping any
    vector that lies (numerically) in the span already: one whose part outside the span is
    below rel_tol of its length (float32 rounding leaves ~1e-7 of it). Returns the (M', P)
    basis."""
    lengths = vectors.norm(dim=1)  # (n,)
    # Against the existing basis, one block at a time: two matrix products instead of a
    # Python loop over its rows ("twice is enough": the second pass restores float32 accuracy).
    for _ in range(2):
        vectors = vectors - (vectors @ basis.T) @ basis  # (n, P)
    # Within the new block: modified Gram-Schmidt, twice, each vector against those kept.
    kept: list[torch.Tensor] = []
    for v, length in zip(vectors, lengths):
        for _ in range(2):
            for u in kept:
                v = v - torch.dot(v, u) * u
        norm = v.norm()
        if norm > rel_tol * length:
            kept.append(v / norm)
    return torch.cat([basis, torch.stack(kept)]) if kept else basis


class OGD(Method):
    """Project gradients orthogonal to stored prediction gradients of earlier tasks."""

    Params = OGDParams
    rewrites_gradients = True  # see Method.rewrites_gradients
    # per-example output gradients (torch.func) cannot pass BatchNorm's in-place statistics
    model_needs = ("no_batch_norm",)

    def __init__(self, params: OGDParams | None = None) -> None:
        super().__init__(params)
        self.basis: torch.Tensor | None = None  # (M, P), orthonormal rows
        self.snapshot = UpdateSnapshot()

    def remove_span(self, vector: torch.Tensor) -> torch.Tensor:
        """v - S^T (S v): the part of a flat (P,) vector orthogonal to the stored basis."""
        return vector - self.basis.T @ (self.basis @ vector)

    def after_backward(self, ctx: Context) -> None:
        if self.basis is None:
            return
        params = list(ctx.model.parameters())
        if any(p.grad is None for p in params):
            raise ConfigError("ogd projects the gradient of every parameter, but some got none "
                              "(frozen by multihead, progressive or latent_replay?); OGD does "
                              "not compose with methods that freeze parameters")
        set_flat_grad(params, self.remove_span(flat_grad(params)))
        if self.params.project == "update":
            self.snapshot.take(params)

    def correct_update(self, ctx: Context) -> None:
        if self.snapshot.taken:
            self.snapshot.replace(self.remove_span(self.snapshot.update()))

    def after_task(self, ctx: Context) -> None:
        x, y, task = random_subset(ctx.task.train, self.params.samples_per_task, ctx.generator)
        model = ctx.model
        params = {name: p.detach() for name, p in model.named_parameters()}

        def outputs(p, x_one, task_one):
            return functional_call(model, p, (x_one.unsqueeze(0), task_one.unsqueeze(0))).squeeze(0)

        def true_logit(p, x_one, y_one, task_one):
            return outputs(p, x_one, task_one).gather(0, y_one.reshape(1)).squeeze(0)

        if y.dtype.is_floating_point:  # regression: every output's gradient, {name: (n, K, ...)}
            grads = vmap(jacrev(outputs), in_dims=(None, 0, 0))(params, x, task)
        else:  # classification: the true logit's, {name: (n, ...)}
            grads = vmap(grad(true_logit), in_dims=(None, 0, 0, 0))(params, x, y, task)
        # one row per (example, output): (n, P) for classification, (n * K, P) for regression
        vectors = torch.cat([grads[name].reshape(len(y), -1, p.numel())
                             for name, p in params.items()], dim=2).flatten(0, 1)
        empty = torch.zeros((0, vectors.shape[1]), dtype=vectors.dtype, device=vectors.device)
        self.basis = orthonormal_extend(self.basis if self.basis is not None else empty, vectors)

    def state_dict(self) -> dict[str, Any]:
        return {"basis": self.basis}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.basis = state["basis"]
