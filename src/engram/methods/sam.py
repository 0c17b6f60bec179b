"""SAM: sharpness-aware minimisation (Foret et al. 2021, ICLR), the "flat minimum" option.

SAM minimises max_{||e|| <= rho} L(w + e) with the first-order step of the paper (p = 2):

    e = rho * g / ||g||,   g = grad L(w);   then update w with grad L(w + e)

(google-research/sam, `dual_vector` / `get_sam_gradient`). Here L is the cross-entropy of
the step's (possibly replay-mixed) batch. Composed with penalty methods, only the
cross-entropy part is taken at w + e: the gradient becomes

    grad_total(w) - grad_CE(w) + grad_CE(w + e)

so EWC-like penalties keep their gradient at w. Costs two extra forward/backward passes per
step. Hyperparameter: rho (0.05 in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engram.config import opt
from engram.methods.base import Context, Method, flat_grad, set_flat_grad


@dataclass
class SAMParams:
    rho: float = opt(0.05, "radius of the weight perturbation", low=0.0)


class SAM(Method):
    """Replace the cross-entropy gradient by its value at the worst nearby weights."""

    Params = SAMParams
    rewrites_gradients = True  # see Method.rewrites_gradients

    def after_backward(self, ctx: Context) -> None:
        model, batch = ctx.model, ctx.batch
        params = [p for p in model.parameters() if p.grad is not None]

        def ce_grad() -> torch.Tensor:
            loss = F.cross_entropy(model(batch.x, batch.task), batch.y)
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

        total = flat_grad(params)
        ce_here = ce_grad()
        norm = ce_here.norm()
        if norm == 0:
            return
        perturbation = self.params.rho * ce_here / norm
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.nn.utils.parameters_to_vector(params) + perturbation, params)
        ce_there = ce_grad()
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.nn.utils.parameters_to_vector(params) - perturbation, params)
        set_flat_grad(params, total - ce_here + ce_there)
