"""The sliding-window memorisation experiment: network, window, shift rule, record."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engram.errors import ConfigError
from engram.window import (WindowConfig, WindowRecord, run_window, squared_norm_loss,
                           weight_norm, window_data, window_indices)


def small(**kw) -> WindowConfig:
    base = dict(n_points=30, x_dim=6, y_dim=3, width=6, depth=3, window=5, lr=0.05,
                threshold=1.0, max_steps=200, optimizer="sgd", record_every=1)
    base.update(kw)
    return WindowConfig(**base)


class PlainResidualNet:
    """The network written out on plain tensors (zero init): the second computation the
    nn.Module version (engram.models.residual) is checked against."""

    def __init__(self, cfg: WindowConfig) -> None:
        d, n, m = cfg.depth, cfg.width, cfg.y_dim
        self.w, self.b = torch.zeros(d, n, n), torch.zeros(d, n)
        self.w_out, self.b_out = torch.zeros(m, n), torch.zeros(m)
        for p in self.parameters():
            p.requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.w, self.b, self.w_out, self.b_out]

    def point_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x
        for i in range(self.w.shape[0]):
            h = h + torch.atan(h @ self.w[i].T + self.b[i])
        return (h @ self.w_out.T + self.b_out - y).pow(2).sum(1)

    def weight_norm(self) -> float:
        return math.sqrt(sum(float(p.detach().pow(2).sum()) for p in self.parameters()))


def test_config_checks():
    with pytest.raises(ConfigError, match="width"):
        WindowConfig(width=30)
    with pytest.raises(ConfigError, match="window"):
        WindowConfig(window=600)
    with pytest.raises(ConfigError, match="out of range"):
        WindowConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="activation"):
        WindowConfig(activation="gelu")


def test_zero_init_outputs_zeros():
    cfg = WindowConfig()
    x, _ = window_data(cfg)
    net = cfg.network()
    assert torch.equal(net(x), torch.zeros(cfg.n_points, cfg.y_dim))
    assert weight_norm(net) == 0.0


def test_residual_block_by_hand():
    cfg = WindowConfig(n_points=2, x_dim=2, y_dim=1, width=2, depth=1, window=1)
    net = cfg.network()
    with torch.no_grad():
        net.blocks[0].linear.weight[:] = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
        net.blocks[0].linear.bias[:] = torch.tensor([0.5, 0.0])
        net.head.weight[0] = torch.tensor([1.0, 1.0])
        net.head.bias[0] = 2.0
    x = torch.tensor([[1.0, 1.0]])
    # z = W x + b = (3.5, -1); h = x + atan(z); out = h0 + h1 + 2
    h = [1.0 + math.atan(3.5), 1.0 + math.atan(-1.0)]
    assert net(x).item() == pytest.approx(h[0] + h[1] + 2.0, rel=1e-6)
    y = torch.tensor([[1.0]])
    assert squared_norm_loss(net(x), y).item() == pytest.approx((h[0] + h[1] + 1.0) ** 2,
                                                                rel=1e-6)


def test_zero_init_blocks_learn():
    """Zero init: the blocks' gradient is zero at step 0 (zero W_out), but W_out learns first
    and from then on every block's weights move."""
    cfg = small(max_steps=3, threshold=0.0)
    rec = run_window(cfg)
    assert rec.weight_norm[0] == 0.0 and rec.weight_norm[1] > 0
    # replay the run's steps by hand to look at the weights
    x, y = window_data(cfg)
    net = PlainResidualNet(cfg)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr)
    idx = window_indices(0, cfg.window, cfg.n_points)
    for step in range(3):
        opt.zero_grad()
        net.point_loss(x[idx], y[idx]).mean().backward()
        if step == 0:
            assert torch.count_nonzero(net.w.grad) == 0 and torch.count_nonzero(net.w_out.grad)
        opt.step()
    for i in range(cfg.depth):
        assert torch.count_nonzero(net.w[i]) > 0 and torch.count_nonzero(net.b[i]) > 0
    assert net.weight_norm() == pytest.approx(rec.weight_norm[-1], rel=1e-5)


def test_window_wraps():
    assert window_indices(28, 5, 30).tolist() == [28, 29, 0, 1, 2]
    # threshold above any loss: the window shifts at every step and wraps around
    rec = run_window(small(threshold=1e9, shift=4, max_steps=20))
    assert rec.shift_steps == list(range(20))
    assert rec.window_start.tolist() == [(4 * t) % 30 for t in range(21)]
    assert rec.relearn_steps == [0] + [1] * 19


def test_threshold_zero_never_shifts():
    rec = run_window(small(threshold=0.0, max_steps=50))
    assert rec.shift_steps == [] and set(rec.window_start.tolist()) == {0}


def test_shift_exactly_when_window_mean_below_threshold():
    cfg = small(max_steps=300, threshold=2.0)
    rec = run_window(cfg)
    assert len(rec.shift_steps) > 3
    means = rec.window_mean_loss()  # row t: the loss the step-t check sees
    shifted = set(rec.shift_steps)
    checked = 0
    for t in range(cfg.max_steps):
        if abs(means[t] - cfg.threshold) < 1e-4:  # too close to call in float32
            continue
        assert (t in shifted) == (means[t] < cfg.threshold), t
        checked += 1
        if t in shifted:
            assert rec.window_start[t + 1] == (rec.window_start[t] + cfg.shift) % cfg.n_points
        else:
            assert rec.window_start[t + 1] == rec.window_start[t]
    assert checked > cfg.max_steps - 5


def test_relearn_steps_consistent_with_shift_steps():
    rec = run_window(small(max_steps=400, threshold=2.0))
    assert len(rec.relearn_steps) == len(rec.shift_steps) > 3
    assert sum(rec.relearn_steps) == rec.shift_steps[-1]
    assert np.all(np.diff(rec.shift_steps) == rec.relearn_steps[1:])
    assert all(r >= 1 for r in rec.relearn_steps[1:])


def test_point_loss_row_equals_direct_computation():
    cfg = small(max_steps=40, threshold=2.0, record_every=7)
    rec = run_window(cfg)
    assert rec.steps.tolist() == [0, 7, 14, 21, 28, 35]
    # replay to step 21 with the recorded windows, then compute every point's loss directly
    x, y = window_data(cfg)
    net = PlainResidualNet(cfg)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr)
    full = run_window(small(max_steps=21, threshold=2.0))
    starts = full.window_start
    shifted = set(full.shift_steps)
    for s in range(21):
        start = starts[s + 1] if s in shifted else starts[s]
        idx = window_indices(int(start), cfg.window, cfg.n_points)
        opt.zero_grad()
        net.point_loss(x[idx], y[idx]).mean().backward()
        opt.step()
    with torch.no_grad():
        direct = net.point_loss(x, y).numpy()
    np.testing.assert_allclose(rec.point_loss[3], direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full.point_loss[-1], direct, rtol=1e-5, atol=1e-6)


def test_npz_round_trip_and_tidy_rows(tmp_path):
    rec = run_window(small(max_steps=100, threshold=2.0, record_every=10))
    path = tmp_path / "window.npz"
    rec.save_npz(path)
    back = WindowRecord.load_npz(path)
    for key in ("steps", "window_start", "weight_norm"):
        np.testing.assert_array_equal(getattr(back, key), getattr(rec, key))
        assert getattr(back, key).dtype == getattr(rec, key).dtype
    # point losses are stored as float16: equal to about 3 significant digits
    np.testing.assert_allclose(back.point_loss, rec.point_loss, rtol=1e-3, atol=1e-4)
    assert back.point_loss.dtype == np.float32
    assert back.shift_steps == rec.shift_steps and back.relearn_steps == rec.relearn_steps
    assert (back.window, back.seed) == (rec.window, rec.seed)
    rows = back.tidy_rows("plain")
    assert set(rows[0]) == {"variant", "seed", "step", "metric", "value"}
    relearn = [r for r in rows if r["metric"] == "relearn_steps"]
    assert [r["step"] for r in relearn] == rec.shift_steps
    assert [r["value"] for r in relearn] == [float(v) for v in rec.relearn_steps]
    norms = [r for r in rows if r["metric"] == "weight_norm"]
    assert [r["step"] for r in norms] == list(range(0, 101, 10))
    assert len([r for r in rows if r["metric"] == "window_mean_loss"]) == 11


def test_default_config_runs_and_weight_norm_grows():
    rec = run_window(WindowConfig(max_steps=300, record_every=1))
    assert rec.point_loss.shape == (301, 500) and rec.point_loss.dtype == np.float32
    assert rec.weight_norm[0] == 0.0
    assert rec.weight_norm[-1] > rec.weight_norm[1] > 0
    assert rec.window_mean_loss()[-1] < rec.window_mean_loss()[0]
