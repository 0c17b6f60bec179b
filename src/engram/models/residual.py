"""The residual network of the sliding-window experiment (`engram window`).

    h_0 = x                                    x (B, width)
    h_{l+1} = h_l + dropout(act(W_l h_l + b_l))   l = 0 .. depth-1, W_l (width, width)
    N(x) = W_out h_depth + b_out               W_out (out_dim, width)

Every block keeps the input's width, so `width` is the input width. `init: zeros` sets every
weight and bias to 0 (the experiment's default, as first described); `init: default` keeps
torch's nn.Linear initialisation U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

Zero init does not freeze training: with zero blocks the network is the identity into the
output layer, so the output layer's gradient 2 (N(x) - y) h^T is nonzero at step 0 while the
blocks' gradients are zero (they pass through the zero output weights). After the first step
the output weights are nonzero, the gradient reaches the blocks through the residual paths
(atan'(0) = tanh'(0) = 1), and every block learns from step 1 on. With relu and zero init the
blocks never learn: relu'(0) = 0 in torch and every pre-activation stays exactly 0.

A block's hidden units are the outputs of its `activation` module; each is added to the
residual stream with weight 1 (the identity skip), which is how continual backprop treats
them (engram.methods.continual_backprop).
"""

from __future__ import annotations

import torch
from torch import nn


class Atan(nn.Module):
    """The elementwise arctangent, as a module (so forward hooks can see its output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.atan(x)


ACTIVATION_MODULES: dict[str, type[nn.Module]] = {"atan": Atan, "tanh": nn.Tanh, "relu": nn.ReLU}


class ResidualBlock(nn.Module):
    """h -> h + dropout(act(W h + b))."""

    def __init__(self, width: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.activation = ACTIVATION_MODULES[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # addmm = self.linear(h) without a module call: for this tiny net the per-call
        # overhead is a sizeable part of a step (benchmarks/window_steps.py)
        out = self.activation(torch.addmm(self.linear.bias, h, self.linear.weight.T))
        return h + (out if self.dropout is None else self.dropout(out))


class ResidualNet(nn.Module):
    """`depth` residual blocks of width `width`, then a dense layer `width` -> `out_dim`."""

    def __init__(self, width: int, out_dim: int, depth: int, activation: str = "atan",
                 init: str = "zeros", dropout: float = 0.0) -> None:
        super().__init__()
        if activation not in ACTIVATION_MODULES:
            raise ValueError(f"activation: unknown {activation!r}; choose one of: "
                             + ", ".join(ACTIVATION_MODULES))
        self.blocks = nn.ModuleList(ResidualBlock(width, activation, dropout)
                                    for _ in range(depth))
        self.head = nn.Linear(width, out_dim)
        if init == "zeros":
            with torch.no_grad():
                for p in self.parameters():
                    p.zero_()
        elif init != "default":
            raise ValueError(f"init: unknown {init!r}; choose zeros or default")

    def forward(self, x: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, width) -> (B, out_dim); `task` is accepted (and ignored) like every engram
        model's, so the runner's methods can call it."""
        h = x
        for block in self.blocks:
            h = block(h)
        return self.head(h)
