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

from engram.importance.fisher import CHUNK_BUDGET_FLOATS
from engram.importance.per_example import per_example_statistic


def mas_importance(model: nn.Module, x: torch.Tensor, task: torch.Tensor, *,
                   chunk_size: int | None = None, fast: bool = True) -> dict[str, torch.Tensor]:
    """Mean absolute per-example gradient of the squared L2 norm of the logits, per parameter.

    The seed at the outputs f is d||f||^2/df = 2f; Linear / Conv2d parameters use the hooked
    closed form (sum_b |g_b| |a_b|^T for a Linear on (B, in)), the rest torch.func
    (engram.importance.per_example; fast=False: torch.func for all)."""
    if len(x) == 0:
        raise ValueError("MAS importance needs at least one example")
    was_training = model.training
    model.eval()
    try:
        def seeds_fn(outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return (2 * outputs).unsqueeze(0), torch.ones_like(outputs[:, 0]).unsqueeze(0)

        sums = per_example_statistic(model, x, task, seeds_fn, "abs", 1, chunk_size=chunk_size or None,
                                     budget_floats=CHUNK_BUDGET_FLOATS, fast=fast)
        importance = {name: value / len(x) for name, value in sums.items()}
    finally:
        model.train(was_training)
    return importance
