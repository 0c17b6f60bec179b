"""SAM: sharpness-aware minimisation (Foret et al. 2021, ICLR), the "flat minimum" option.

SAM minimises max_{||e|| <= rho} L(w + e) with the first-order step of the paper (p = 2):

    e = rho * g / ||g||,   g = grad L(w);   then update w with grad L(w + e)

(google-research/sam, `dual_vector` / `get_sam_gradient`). Here L is the problem's own
training loss `ctx.loss_fn` (cross-entropy for classification, squared error on the
plasticity and sliding-window regressions) on the step's (possibly replay-mixed) batch.
Composed with penalty methods, only that loss is taken at w + e: the gradient becomes

    grad_total(w) - grad_L(w) + grad_L(w + e)

so EWC-like penalties keep their gradient at w. Costs two extra forward/backward passes per
step. Hyperparameter: rho (0.05 in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engram.schema import opt
from engram.methods.base import Context, Method, flat_grad, set_flat_grad
from engram.models.protocol import batch_norm_statistics_frozen


@dataclass
class SAMParams:
    rho: float = opt(0.05, "radius of the weight perturbation", low=0.0)


class SAM(Method):
    """Replace the task loss's gradient by its value at the worst nearby weights."""

    Params = SAMParams
    rewrites_gradients = True  # see Method.rewrites_gradients

    def after_backward(self, ctx: Context) -> None:
        model, batch = ctx.model, ctx.batch
        params = [p for p in model.parameters() if p.grad is not None]

        def loss_grad() -> torch.Tensor:
            # The runner's forward pass already counted this batch in any BatchNorm running
            # statistics; these extra passes (one at perturbed weights) must not count it again.
            with batch_norm_statistics_frozen(model):
                loss = ctx.loss_fn(model(batch.x, batch.task), batch.y)
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

        total = flat_grad(params)
        here = loss_grad()
        norm = here.norm()
        if norm == 0:
            return
        perturbation = self.params.rho * here / norm
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.nn.utils.parameters_to_vector(params) + perturbation, params)
        there = loss_grad()
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.nn.utils.parameters_to_vector(params) - perturbation, params)
        set_flat_grad(params, total - here + there)
