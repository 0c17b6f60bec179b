"""Networks: a body (MLP or small CNN) and a linear output that may hold one head per task.

    MODELS.get("mlp")(input_shape, cfg) -> nn.Module mapping (B, C, H, W) -> (B, features)
    ContinualNet(body, n_features, n_heads, head_dim) -> model(x, task) -> (B, head_dim)
    adapt(module, *, features=None, head=None, n_heads=1, head_dim=None) -> ContinualNet
        your own nn.Module as an engram network (THE protocol: engram.models.protocol)
"""

from __future__ import annotations

from engram.models.nets import ContinualNet, build_model, cnn_body, mlp_body
from engram.models.protocol import BlackBoxNet, adapt
from engram.registry import MODELS

MODELS.add("mlp", mlp_body, "fully connected ReLU network on flattened pixels (model.hidden widths)")
MODELS.add("cnn", cnn_body, "small CNN: 3x3 conv + ReLU + 2x2 max-pool blocks (model.channels), then a linear head")

__all__ = ["MODELS", "BlackBoxNet", "ContinualNet", "adapt", "build_model"]
