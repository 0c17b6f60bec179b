"""MAS importance (Aljundi et al. 2018, "Memory Aware Synapses", ECCV): a pure function.

    Omega_i = (1/N) sum_x | d ||f(x; theta)||_2^2 / d theta_i |

where f(x) are the raw outputs (logits) of the head the example uses. This is the paper's
per-example form (the reference code's `b1` mode); the released code's default takes |.| of
the batch-summed gradient, which lets signs cancel within a batch (reference sheet, MAS
pitfall 1). No labels are needed, so it can use unlabelled data.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from engram.importance.fisher import CHUNK_BUDGET_FLOATS


def mas_importance(model: nn.Module, x: torch.Tensor, task: torch.Tensor, *,
                   chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """Mean absolute per-example gradient of the squared L2 norm of the logits, per parameter."""
    if len(x) == 0:
        raise ValueError("MAS importance needs at least one example")
    was_training = model.training
    model.eval()
    try:
        params = {name: p.detach() for name, p in model.named_parameters()}
        importance = {name: torch.zeros_like(p) for name, p in params.items()}
        n_params = sum(p.numel() for p in params.values())
        chunk_size = chunk_size or max(1, CHUNK_BUDGET_FLOATS // n_params)

        def squared_norm(p, x_one, task_one):
            logits = functional_call(model, p, (x_one.unsqueeze(0), task_one.unsqueeze(0)))
            return logits.pow(2).sum()

        per_example_grad = vmap(grad(squared_norm), in_dims=(None, 0, 0))
        for start in range(0, len(x), chunk_size):
            grads = per_example_grad(params, x[start:start + chunk_size], task[start:start + chunk_size])
            for name, g in grads.items():  # g: (chunk, *param shape)
                importance[name] += g.abs().sum(dim=0)
        for name in importance:
            importance[name] /= len(x)
    finally:
        model.train(was_training)
    return importance
