"""The reduced ResNet-18 of the continual-learning literature, as a body for ContinualNet.

GEM (Lopez-Paz & Ranzato, NeurIPS 2017, "Gradient Episodic Memory for Continual Learning",
code: facebookresearch/GradientEpisodicMemory, model/common.py) and Mammoth (Buzzega et al.,
NeurIPS 2020, "Dark Experience for General Continual Learning", code:
aimagelab/mammoth, backbone/ResNet18.py) train this network on Seq-CIFAR and
Seq-TinyImageNet:

    stem     conv3x3(C -> nf, stride 1, no bias), BatchNorm, ReLU      (no max-pool)
    layer1   2 BasicBlocks, nf     channels, stride 1
    layer2   2 BasicBlocks, 2 nf   channels, stride 2 (first block)
    layer3   2 BasicBlocks, 4 nf   channels, stride 2
    layer4   2 BasicBlocks, 8 nf   channels, stride 2
    pool     global average pool -> (B, 8 nf) features
    head     nn.Linear(8 nf, classes)  (engram's ContinualNet head, one per task if multi-head)

    BasicBlock(x) = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)),
    shortcut = conv1x1(stride) + BatchNorm when the stride or width changes, else identity.

Mammoth uses nf = 64 (11,173,962 parameters with a 10-class head, the same network as the
widely used CIFAR ResNet-18 of kuangliu/pytorch-cifar); GEM's "reduced ResNet-18" uses
nf = 20 (`resnet18_slim` here, small enough for CPU tests). The global pool makes the network
work on any image size (8x8 digits, 32x32 CIFAR, 64x64 TinyImageNet); Mammoth's avg_pool2d
with the last map's size is the same thing on square inputs.

The body is not an nn.Sequential and holds BatchNorm layers: methods that need a sequential
body, or per-task BatchNorm statistics they do not keep, are refused on it
(engram.models.protocol NEEDS "sequential_body", "no_batch_norm").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engram.config import ModelConfig

LITERATURE_WIDTH = 64  # Mammoth's nf
GEM_WIDTH = 20  # GEM's reduced ResNet-18


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and a residual connection (He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Sequential()  # identity
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetBody(nn.Module):
    """x (B, C, H, W) -> features (B, 8 nf): the reduced ResNet-18 without its linear layer."""

    def __init__(self, in_channels: int, nf: int = LITERATURE_WIDTH,
                 blocks: tuple[int, ...] = (2, 2, 2, 2)) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, nf)
        self.bn1 = nn.BatchNorm2d(nf)
        layers, channels = [], nf
        for i, n_blocks in enumerate(blocks):
            width, stride = nf * 2 ** i, 1 if i == 0 else 2
            stage = []
            for j in range(n_blocks):
                stage.append(BasicBlock(channels, width, stride if j == 0 else 1))
                channels = width
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.n_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return out.mean(dim=(2, 3))  # global average pool, (B, 8 nf)


def resnet18_body(input_shape: tuple[int, ...], cfg: ModelConfig) -> tuple[nn.Module, int]:
    """Mammoth's ResNet-18 body (nf = 64) for (C, H, W) images. Returns (body, features)."""
    body = ResNetBody(input_shape[0], LITERATURE_WIDTH)
    return body, body.n_features


def resnet18_slim_body(input_shape: tuple[int, ...], cfg: ModelConfig) -> tuple[nn.Module, int]:
    """GEM's reduced ResNet-18 body (nf = 20) for (C, H, W) images. Returns (body, features)."""
    body = ResNetBody(input_shape[0], GEM_WIDTH)
    return body, body.n_features
