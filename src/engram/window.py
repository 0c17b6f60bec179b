"""The sliding-window memorisation experiment (issue 7): watching forgetting.

A network memorises `n_points` random points (x ~ N(0, 1) of width `x_dim`, y ~ N(0, 1) of
width `y_dim`, drawn independently) but is only ever trained on a contiguous window of
`window` of them. Each step is one full-batch step on the window's mean loss, the loss of a
point being the squared norm ||N(x) - y||^2. Whenever the window's mean loss is below
`threshold` the window moves forward by `shift` points, wrapping around the end.

The network is `depth` residual blocks h <- h + act(W h + b) of width `width` (= `x_dim`)
followed by a dense layer `width` -> `y_dim`. By default every weight and bias starts at zero.
That does not freeze training: with zero blocks the network is the identity into the output
layer, so the output layer's gradient 2 (N(x) - y) h^T is nonzero at step 0 while the blocks'
gradients are zero (they pass through the zero output weights). After the first step the
output weights are nonzero, the gradient reaches the blocks through the residual paths
(atan'(0) = tanh'(0) = 1), and every block's weights become nonzero from step 1 on (checked
in tests/test_window.py). With `activation: relu` and zero init the blocks never learn:
relu'(0) = 0 in torch and every pre-activation is exactly 0.

What is recorded (`WindowRecord`): after 0, k, 2k, ... steps (k = `record_every`) every
point's loss (one forward of all points), the window's start and the norm of all weights and
biases; per shift the step it happened and how many steps the window was trained on before
it (`relearn_steps`).

Step semantics: at step s (s = 0 .. max_steps - 1; s updates done so far) the current
window's mean loss L is computed; if L < threshold the window shifts (shift step s, at most
one shift per step) and the step trains on the new window; then one optimizer update. Row t of
the record holds the state after t updates: `point_loss[t]` are the losses the step-t check
sees and `window_start[t]` the window it checks.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from engram.config import _check_range, opt
from engram.errors import ConfigError, DivergenceError

ACTIVATIONS = {"atan": torch.atan, "tanh": torch.tanh, "relu": torch.relu}


@dataclass
class WindowConfig:
    n_points: int = opt(500, "points memorised", low=1)
    x_dim: int = opt(40, "input width (x ~ N(0, 1))", low=1)
    y_dim: int = opt(20, "target width (y ~ N(0, 1))", low=1)
    depth: int = opt(5, "residual blocks h <- h + act(W h + b)", low=0)
    width: int = opt(40, "width of the residual blocks (must equal x_dim)", low=1)
    activation: Literal["atan", "tanh", "relu"] = opt("atan", "activation in the blocks")
    init: Literal["zeros", "default"] = opt(
        "zeros", "zeros: every weight and bias 0; default: torch's Linear init")
    window: int = opt(50, "points in the training window", low=1)
    threshold: float = opt(1.0, "the window shifts when its mean loss is below this "
                                 "(a point's loss starts near y_dim)", low=0.0)
    shift: int = opt(1, "points the window moves per shift (wrapping around)", low=1)
    optimizer: Literal["sgd", "adam"] = opt(
        "adam", "optimizer (with sgd the net ends up memorising all points and relearning "
        "gets faster; with adam relearning gets slower)")
    lr: float = opt(0.001, "learning rate", low=0.0)
    weight_decay: float = opt(0.0, "L2 weight decay of the optimizer", low=0.0)
    max_steps: int = opt(60000, "optimizer steps", low=0)
    record_every: int = opt(1, "record every point's loss every this many steps", low=1)
    seed: int = opt(0, "seed of the data (and of the default init)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_range(getattr(self, f.name), f.metadata, f.name)
        if self.width != self.x_dim:
            raise ConfigError(f"width: the residual blocks keep the input's width, so width "
                              f"must equal x_dim ({self.x_dim}); got {self.width}")
        if self.window > self.n_points:
            raise ConfigError(f"window: {self.window} is more than n_points ({self.n_points})")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation: unknown {self.activation!r}; choose one of: "
                              + ", ".join(ACTIVATIONS))
        if self.init not in ("zeros", "default"):
            raise ConfigError(f"init: unknown {self.init!r}; choose zeros or default")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer: unknown {self.optimizer!r}; choose sgd or adam")


def window_data(cfg: WindowConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The points: x (n_points, x_dim) then y (n_points, y_dim), from Generator(seed)."""
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.n_points, cfg.x_dim, generator=g)
    y = torch.randn(cfg.n_points, cfg.y_dim, generator=g)
    return x, y


class ResidualNet:
    """depth blocks h <- h + act(h W_i^T + b_i), then h W_out^T + b_out; plain tensors.

    The block weights are stacked, `w` (depth, width, width) and `b` (depth, width), so the
    parameters are four tensors whatever the depth.
    """

    def __init__(self, cfg: WindowConfig) -> None:
        d, n, m = cfg.depth, cfg.width, cfg.y_dim
        self.act = ACTIVATIONS[cfg.activation]
        if cfg.init == "zeros":
            self.w, self.b = torch.zeros(d, n, n), torch.zeros(d, n)
            self.w_out, self.b_out = torch.zeros(m, n), torch.zeros(m)
        else:  # torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both
            g = torch.Generator().manual_seed(cfg.seed + 1)
            bound = 1.0 / math.sqrt(n)

            def u(*shape: int) -> torch.Tensor:
                return (torch.rand(*shape, generator=g) * 2 - 1) * bound

            self.w, self.b, self.w_out, self.b_out = u(d, n, n), u(d, n), u(m, n), u(m)
        for p in self.parameters():
            p.requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.w, self.b, self.w_out, self.b_out]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i in range(self.w.shape[0]):
            h = h + self.act(torch.addmm(self.b[i], h, self.w[i].T))
        return torch.addmm(self.b_out, h, self.w_out.T)

    def point_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each point's squared norm ||N(x) - y||^2, shape (len(x),)."""
        return (self(x) - y).pow(2).sum(1)

    def weight_norm(self) -> float:
        with torch.no_grad():
            return math.sqrt(sum(float(p.pow(2).sum()) for p in self.parameters()))


def window_indices(start: int, window: int, n_points: int) -> torch.Tensor:
    """The window's point indices, wrapping around the end."""
    return (torch.arange(window) + start) % n_points


TIDY_COLUMNS = ["variant", "seed", "step", "metric", "value"]


@dataclass
class WindowRecord:
    steps: np.ndarray  # (S,) int64: updates done at each recorded row
    point_loss: np.ndarray  # (S, n_points) float32
    window_start: np.ndarray  # (S,) int64: the window the next step checks
    weight_norm: np.ndarray  # (S,) float64: norm of all weights and biases
    shift_steps: list[int] = field(default_factory=list)
    relearn_steps: list[int] = field(default_factory=list)
    window: int = 0
    seed: int = 0
    seconds: float = 0.0

    def window_mean_loss(self) -> np.ndarray:
        """Mean loss of the window at each recorded row, shape (S,)."""
        n = self.point_loss.shape[1]
        idx = (self.window_start[:, None] + np.arange(self.window)[None, :]) % n
        return np.take_along_axis(self.point_loss, idx, axis=1).mean(1)

    def save_npz(self, path: str | Path) -> None:
        np.savez_compressed(
            path, steps=self.steps, point_loss=self.point_loss, window_start=self.window_start,
            weight_norm=self.weight_norm, shift_steps=np.asarray(self.shift_steps, np.int64),
            relearn_steps=np.asarray(self.relearn_steps, np.int64),
            window=np.int64(self.window), seed=np.int64(self.seed),
            seconds=np.float64(self.seconds))

    @classmethod
    def load_npz(cls, path: str | Path) -> WindowRecord:
        with np.load(path, allow_pickle=False) as z:
            return cls(steps=z["steps"], point_loss=z["point_loss"],
                       window_start=z["window_start"], weight_norm=z["weight_norm"],
                       shift_steps=[int(s) for s in z["shift_steps"]],
                       relearn_steps=[int(s) for s in z["relearn_steps"]],
                       window=int(z["window"]), seed=int(z["seed"]),
                       seconds=float(z["seconds"]))

    def tidy_rows(self, variant: str) -> list[dict]:
        """Rows variant, seed, step, metric, value: relearn_steps (one per shift, at the
        shift's step), weight_norm and window_mean_loss (every recorded row)."""
        rows = [{"variant": variant, "seed": self.seed, "step": int(s),
                 "metric": "relearn_steps", "value": float(r)}
                for s, r in zip(self.shift_steps, self.relearn_steps)]
        for metric, values in (("weight_norm", self.weight_norm),
                               ("window_mean_loss", self.window_mean_loss())):
            rows += [{"variant": variant, "seed": self.seed, "step": int(s),
                      "metric": metric, "value": float(v)}
                     for s, v in zip(self.steps, values)]
        return rows


def run_window(cfg: WindowConfig) -> WindowRecord:
    """Train on the sliding window for cfg.max_steps steps; see the module doc."""
    t0 = time.perf_counter()
    x, y = window_data(cfg)
    net = ResidualNet(cfg)
    params = net.parameters()
    if cfg.optimizer == "sgd":
        optim = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    else:
        optim = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 foreach=True)
    n_rows = cfg.max_steps // cfg.record_every + 1
    steps = np.zeros(n_rows, np.int64)
    point_loss = np.zeros((n_rows, cfg.n_points), np.float32)
    window_start = np.zeros(n_rows, np.int64)
    weight_norm = np.zeros(n_rows, np.float64)
    shift_steps: list[int] = []
    relearn_steps: list[int] = []
    start, last_shift, row = 0, 0, 0

    def record(t: int) -> None:
        nonlocal row
        with torch.no_grad():
            point_loss[row] = net.point_loss(x, y).numpy()
            weight_norm[row] = math.sqrt(float(sum(p.pow(2).sum() for p in params)))
        steps[row], window_start[row] = t, start
        row += 1

    record(0)
    idx = window_indices(start, cfg.window, cfg.n_points)
    xw, yw = x[idx], y[idx]
    for s in range(cfg.max_steps):
        loss = net.point_loss(xw, yw).mean()
        value = loss.item()
        if not math.isfinite(value):
            raise DivergenceError(f"window run diverged at step {s} (window loss {value}); "
                                  f"lower lr (now {cfg.lr})")
        if value < cfg.threshold:
            shift_steps.append(s)
            relearn_steps.append(s - last_shift)
            last_shift = s
            start = (start + cfg.shift) % cfg.n_points
            idx = window_indices(start, cfg.window, cfg.n_points)
            xw, yw = x[idx], y[idx]
            loss = net.point_loss(xw, yw).mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if (s + 1) % cfg.record_every == 0:
            record(s + 1)
    return WindowRecord(steps=steps[:row], point_loss=point_loss[:row],
                        window_start=window_start[:row], weight_norm=weight_norm[:row],
                        shift_steps=shift_steps, relearn_steps=relearn_steps,
                        window=cfg.window, seed=cfg.seed, seconds=time.perf_counter() - t0)
