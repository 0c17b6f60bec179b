"""The two network bodies and the (multi-)head wrapper every method trains."""

from __future__ import annotations

import math

import torch
from torch import nn

from engram.config import ModelConfig

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU}


def mlp_body(input_shape: tuple[int, ...], cfg: ModelConfig) -> tuple[nn.Module, int]:
    """Flatten, then Linear + activation for each width in cfg.hidden. Returns (body, features)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for hidden in cfg.hidden:
        layers += [nn.Linear(width, hidden), ACTIVATIONS[cfg.activation]()]
        if cfg.dropout > 0:  # only when asked, so the default body's layer indices stay put
            layers.append(nn.Dropout(cfg.dropout))
        width = hidden
    return nn.Sequential(*layers), width


def cnn_body(input_shape: tuple[int, ...], cfg: ModelConfig) -> tuple[nn.Module, int]:
    """3x3 conv (padding 1) + activation + 2x2 max-pool per entry of cfg.channels, then flatten."""
    channels, height, width = input_shape
    layers: list[nn.Module] = []
    for out_channels in cfg.channels:
        layers += [nn.Conv2d(channels, out_channels, 3, padding=1), ACTIVATIONS[cfg.activation]()]
        if min(height, width) >= 2:  # 8x8 digits allow three halvings, 28x28 MNIST more
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        channels = out_channels
    layers.append(nn.Flatten())
    return nn.Sequential(*layers), channels * height * width


class ContinualNet(nn.Module):
    """A body followed by one linear layer holding `n_heads` heads of `head_dim` outputs each.

    With one head (domain- and class-incremental) `forward(x, task)` ignores `task`. With one
    head per task (task-incremental, multi-head) the linear layer computes every head at once,
    (B, n_heads * head_dim), and each example keeps the head of its own task, (B, head_dim).

    The protocol every method may rely on (engram.models.adapt makes any module follow it):
    `forward(x, task)` and `all_logits(x)` -> (B, n_heads * head_dim) always; `features(x)`,
    `output(features, task)`, `body` and `head` only where the network splits into a body and
    a linear head (engram.models.protocol.BlackBoxNet does not: a method that needs them declares
    so in `Method.model_needs` and is refused on it). `head` is built here, or given (adapt).
    """

    def __init__(self, body: nn.Module, n_features: int, n_heads: int, head_dim: int,
                 head: nn.Linear | None = None) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(n_features, n_heads * head_dim) if head is None else head
        self.n_heads, self.head_dim = n_heads, head_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def all_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every head's logits, (B, n_heads * head_dim)."""
        return self.head(self.body(x))

    def forward(self, x: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        return self.pick_heads(self.all_logits(x), task)

    def output(self, features: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from body features (B, F): the head, then each example's own head."""
        return self.pick_heads(self.head(features), task)

    def pick_heads(self, logits: torch.Tensor, task: torch.Tensor | None) -> torch.Tensor:
        """(B, n_heads * head_dim) -> (B, head_dim): each example's own head (all of it with
        one head, whatever `task` is)."""
        if self.n_heads == 1:
            return logits
        if task is None:
            raise ValueError("a multi-head model needs the task id of every example")
        rows = len(logits)
        per_head = logits.view(rows, self.n_heads, self.head_dim)  # (B, H, K)
        return per_head[torch.arange(rows, device=logits.device), task]  # (B, K)


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], n_heads: int,
                head_dim: int) -> ContinualNet:
    from engram.registry import MODELS

    body, n_features = MODELS.get(cfg.kind)(input_shape, cfg)
    return ContinualNet(body, n_features, n_heads, head_dim)
