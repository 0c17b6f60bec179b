"""Pseudo-rehearsal (Robins 1995, "Catastrophic forgetting, rehearsal and pseudorehearsal",
Connection Science 7:123-146): rehearse the old network's input-output function on random
inputs, so no training example is ever stored.

Robins fed random binary patterns to the trained network, kept its outputs as targets
("pseudo-items") and trained them alongside each new item. The variant implemented is the
modern analogue (reference sheet, section 16): at the start of each task after the first,
the current network is frozen; at every step `pseudo_batch_size` fresh inputs are drawn
uniformly from [0, 1] (the range engram scales every dataset to), and the new network is
trained to match the frozen network's softened outputs on them for the earlier tasks'
outputs, with LwF's distillation loss:

    L = L_new + lambda * L_pseudo,   L_pseudo = - sum_j softmax(z_old(u) / T)_j log softmax(z(u) / T)_j,
    u ~ U[0, 1]^(input shape)

The outputs distilled are those of the earlier tasks, exactly as in LwF (`engram.methods.lwf`):
each earlier head (task-incremental), the shared head (domain), the earlier classes' columns
(class). Drawing fresh inputs each step, instead of Robins's fixed pseudo-population, keeps
the memory at one frozen copy of the network (4P bytes) and no data.
Hyperparameters: strength = lambda, temperature = T, pseudo_batch_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engram.schema import opt
from engram.methods.base import Context
from engram.methods.lwf import LwF


@dataclass
class PseudoRehearsalParams:
    strength: float = opt(1.0, "lambda: weight of the pseudo-item distillation loss", low=0.0)
    temperature: float = opt(2.0, "T: softens both distributions", low=0.01)
    pseudo_batch_size: int | None = opt(None, "random inputs per step (null: train.batch_size)",
                                        low=1)


class PseudoRehearsal(LwF):
    """LwF's distillation on uniform random inputs instead of the new task's images."""

    Params = PseudoRehearsalParams

    def distillation_inputs(self, ctx: Context) -> torch.Tensor:
        size = self.params.pseudo_batch_size or ctx.train_cfg.batch_size
        shape = (size,) + tuple(ctx.stream.input_shape)
        return torch.rand(shape, generator=ctx.generator).to(ctx.device)
