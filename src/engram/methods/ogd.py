"""OGD: orthogonal gradient descent (Farajtabar et al. 2020, AISTATS).

After each task, gradients of the model's prediction for a few stored examples are
orthonormalised (Gram-Schmidt) into a basis S that grows across tasks. While learning later
tasks, each loss gradient loses its component in span(S):

    g~ = g - sum_{v in S} (g . v) v

so, to first order, the predictions on the stored examples of earlier tasks do not move.
Variant implemented: OGD-GTL, the gradient of the ground-truth logit f_y(x) (the paper
reports it close to OGD-ALL at 1/C of the memory), with samples_per_task examples drawn at
random from the task's training data (100, as in Bennani et al.'s reimplementation).
Memory grows with the stream: T x samples_per_task x P floats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call, grad, vmap

from engram.config import opt
from engram.errors import ConfigError
from engram.methods.base import Context, Method, flat_grad, random_subset, set_flat_grad


@dataclass
class OGDParams:
    samples_per_task: int = opt(100, "examples whose logit gradients join the basis per task", low=1)


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

    def __init__(self, params: OGDParams | None = None) -> None:
        super().__init__(params)
        self.basis: torch.Tensor | None = None  # (M, P), orthonormal rows

    def after_backward(self, ctx: Context) -> None:
        if self.basis is None:
            return
        params = list(ctx.model.parameters())
        if any(p.grad is None for p in params):
            raise ConfigError("ogd projects the gradient of every parameter, but some got none "
                              "(frozen by multihead, progressive or latent_replay?); OGD does "
                              "not compose with methods that freeze parameters")
        flat = flat_grad(params)
        set_flat_grad(params, flat - self.basis.T @ (self.basis @ flat))

    def after_task(self, ctx: Context) -> None:
        x, y, task = random_subset(ctx.task.train, self.params.samples_per_task, ctx.generator)
        model = ctx.model
        params = {name: p.detach() for name, p in model.named_parameters()}

        def true_logit(p, x_one, y_one, task_one):
            logits = functional_call(model, p, (x_one.unsqueeze(0), task_one.unsqueeze(0)))
            return logits.squeeze(0).gather(0, y_one.reshape(1)).squeeze(0)

        grads = vmap(grad(true_logit), in_dims=(None, 0, 0, 0))(params, x, y, task)
        vectors = torch.cat([grads[name].reshape(len(y), -1) for name in params], dim=1)  # (n, P)
        empty = torch.zeros((0, vectors.shape[1]), dtype=vectors.dtype, device=vectors.device)
        self.basis = orthonormal_extend(self.basis if self.basis is not None else empty, vectors)

    def state_dict(self) -> dict[str, Any]:
        return {"basis": self.basis}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.basis = state["basis"]
