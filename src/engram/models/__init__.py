"""Networks: a body (MLP or small CNN) and a linear output that may hold one head per task.

    MODELS.get("mlp")(input_shape, cfg) -> nn.Module mapping (B, C, H, W) -> (B, features)
    ContinualNet(body, n_features, n_heads, head_dim) -> model(x, task) -> (B, head_dim)
    adapt(module, *, features=None, head=None, n_heads=1, head_dim=None) -> ContinualNet
        your own nn.Module as an engram network (THE protocol: engram.models.protocol)
"""

from __future__ import annotations

from engram.models.nets import ContinualNet, build_model, cnn_body, mlp_body
from engram.models.protocol import BlackBoxNet, adapt
from engram.models.resnet import resnet18_body, resnet18_slim_body
from engram.registry import MODELS

MODELS.add("mlp", mlp_body, "fully connected ReLU network on flattened pixels (model.hidden widths)")
MODELS.add("cnn", cnn_body, "small CNN: 3x3 conv + ReLU + 2x2 max-pool blocks (model.channels), then a linear head")
MODELS.add("resnet18", resnet18_body, "the reduced ResNet-18 of Mammoth/DER (3x3 stem, no max-pool, "
           "BatchNorm, widths 64-512, 11.2M parameters; Buzzega et al. 2020)")
MODELS.add("resnet18_slim", resnet18_slim_body, "GEM's reduced ResNet-18, widths 20-160 "
           "(Lopez-Paz & Ranzato 2017); fast enough for CPU tests")

__all__ = ["MODELS", "BlackBoxNet", "ContinualNet", "adapt", "build_model"]
