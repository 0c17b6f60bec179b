"""Plasticity diagnostics on hand-made matrices and tiny hand-built networks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from engram.config import ModelConfig
from engram.metrics import (
    approximate_rank,
    dead_fraction,
    dormant_fraction,
    effective_rank,
    gradient_magnitude,
    hidden_activations,
    numerical_rank,
    numerical_stable_rank,
    plasticity_diagnostics,
    rank_measures,
    redo_scores,
    saturated_fraction,
    stable_rank,
    weight_magnitude,
)
from engram.models import build_model


def with_singular_values(sigma: list[float], rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A (rows, cols) float64 matrix U diag(sigma) V^T with random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(sigma), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(sigma), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v.T  # (rows, cols)


def mlp(hidden: list[int], activation: str = "relu", n_in: int = 2, n_out: int = 2,
        **cfg) -> nn.Module:
    return build_model(ModelConfig(kind="mlp", hidden=hidden, activation=activation, **cfg),
                       (n_in,), n_heads=1, head_dim=n_out)


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.body if isinstance(m, nn.Linear)]


# --------------------------------------------------------------------------- ranks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_two_product_has_numerical_rank_two(dtype):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 2, generator=g, dtype=dtype) @ torch.randn(2, 30, generator=g, dtype=dtype)
    assert numerical_rank(a) == 2
    assert 1.0 < effective_rank(a) <= 2.0 + 1e-9
    assert 1 <= stable_rank(a) <= 2 and 1 <= approximate_rank(a) <= 2
    assert 1.0 <= numerical_stable_rank(a) <= 2.0 + 1e-9
    # a full-rank matrix of the same shape is not mistaken for rank 2
    assert numerical_rank(torch.randn(40, 30, generator=g, dtype=dtype)) == 30


def test_identity_ranks_by_definition():
    eye = torch.eye(100)
    assert effective_rank(eye) == pytest.approx(100.0, rel=1e-12)
    assert numerical_rank(eye) == 100
    assert numerical_stable_rank(eye) == pytest.approx(100.0)
    # smallest k with k/100 >= 0.99 is 99, not 100 (LoP's stable rank is not the rank)
    assert stable_rank(eye) == 99 and approximate_rank(eye) == 99
    assert stable_rank(torch.eye(10)) == 10  # 9/10 < 0.99
    assert stable_rank(torch.eye(10), delta=0.1) == 9  # 9/10 >= 0.9


def test_ranks_from_known_singular_values():
    a = with_singular_values([4.0, 2.0, 1.0], rows=6, cols=5)
    p = [4 / 7, 2 / 7, 1 / 7]
    assert effective_rank(a) == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)))
    assert numerical_stable_rank(a) == pytest.approx(21 / 16)  # (16 + 4 + 1) / 4^2
    assert numerical_rank(a) == 3
    # unsquared cumulative shares 4/7=.571, 6/7=.857, 1 ; squared 16/21=.762, 20/21=.952, 1
    assert stable_rank(a) == 3  # 0.99
    assert stable_rank(a, delta=0.2) == 2  # 0.857 >= 0.8
    assert stable_rank(a, delta=0.25) == 2  # 0.571 < 0.75 <= 0.857
    assert approximate_rank(a, prop=0.75) == 1  # 0.762 >= 0.75: squaring favours the top
    assert approximate_rank(a, prop=0.8) == 2
    assert approximate_rank(a) == 3
    assert rank_measures(a) == pytest.approx({  # one SVD, same numbers
        "effective_rank": effective_rank(a), "stable_rank": 3, "approximate_rank": 3,
        "numerical_stable_rank": 21 / 16, "numerical_rank": 3})


def test_effective_rank_of_two_by_two_diagonal():
    p = [0.75, 0.25]  # sigma = (3, 1)
    expected = math.exp(-(p[0] * math.log(p[0]) + p[1] * math.log(p[1])))  # 1.7548
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(expected)
    assert effective_rank(torch.tensor([[2.0, 0.0], [0.0, 0.0]])) == pytest.approx(1.0)  # 0 ln 0


def test_ranks_of_zero_matrix_are_zero_not_nan():
    z = torch.zeros(5, 3)
    assert effective_rank(z) == 0.0 and numerical_stable_rank(z) == 0.0
    assert stable_rank(z) == 0 and approximate_rank(z) == 0 and numerical_rank(z) == 0


def test_ranks_reject_bad_input():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        effective_rank(torch.ones(4))
    with pytest.raises(ValueError, match="delta"):
        stable_rank(torch.eye(3), delta=1.0)


# --------------------------------------------------------------------------- units


def test_dead_fraction_counts_all_zero_columns():
    h = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0],
                      [2.0, 0.0, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0, -1e-30]])  # a tiny negative output is not dead
    assert dead_fraction(h) == pytest.approx(2 / 5)  # columns 1 and 3
    conv = torch.zeros(3, 4, 2, 2)  # (N, C, H, W): a channel is dead if zero everywhere
    conv[2, 1, 1, 0] = 0.5
    conv[:, 3] = 1.0
    assert dead_fraction(conv) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="units"):
        dead_fraction(torch.zeros(0, 3))


def test_redo_scores_and_dormant_fraction_by_hand():
    # per-unit mean |h| = (0, 1, 2, 5); layer mean 2 -> scores (0, 0.5, 1, 2.5)
    h = torch.tensor([[0.0, 1.0, -1.0, 5.0],
                      [0.0, -1.0, 3.0, 5.0],
                      [0.0, 1.0, 2.0, 5.0]])
    assert redo_scores(h).tolist() == pytest.approx([0.0, 0.5, 1.0, 2.5])
    assert dormant_fraction(h, 0.0) == pytest.approx(1 / 4) == dead_fraction(h)
    assert dormant_fraction(h, 0.1) == pytest.approx(1 / 4)
    assert dormant_fraction(h, 0.6) == pytest.approx(2 / 4)
    assert dormant_fraction(h, 1.5) == pytest.approx(3 / 4)
    assert dormant_fraction(torch.zeros(4, 3), 0.0) == 1.0  # no 0/0 thanks to the 1e-9
    with pytest.raises(ValueError, match="tau"):
        dormant_fraction(h, -0.1)


def test_saturation_on_hand_picked_values():
    # tanh, LoP's rule |tanh z| > 0.9 <=> |z| > 1.472
    assert saturated_fraction(torch.tensor([0.0, 0.5, 0.89, 0.91, -0.95, 1.0]), "tanh") == 0.5
    z = torch.tensor([0.0, 1.0, 1.4, 1.5, -1.5, 3.0, -10.0, 0.5])
    assert saturated_fraction(z, "tanh", pre_activation=True) == 0.5
    assert saturated_fraction(z, nn.Tanh(), pre_activation=True) == 0.5
    # sigmoid: below 0.05 or above 0.95 <=> |z| > 2.944
    assert saturated_fraction(torch.tensor([0.5, 0.04, 0.06, 0.94, 0.96, 1.0]), "sigmoid") == 0.5
    assert saturated_fraction(torch.tensor([0.0, 2.9, 3.0, -3.0, -2.9]), "sigmoid",
                              pre_activation=True) == pytest.approx(2 / 5)
    # atan, derivative rule |z| > 2.065 (the range rule |z| > 6.314 would count none of these)
    z = torch.tensor([0.0, 2.0, 2.1, -2.1, 6.0, 1.0])
    assert saturated_fraction(z, "atan", pre_activation=True) == 0.5
    assert saturated_fraction(torch.atan(z), "atan") == 0.5
    with pytest.raises(ValueError, match="bounded activations"):
        saturated_fraction(z, "relu")


@pytest.mark.parametrize("name, f", [("tanh", torch.tanh), ("sigmoid", torch.sigmoid),
                                     ("atan", torch.atan)])
def test_saturation_is_the_derivative_rule(name, f):
    """Oracle: saturated <=> f'(z) / f'(0) < 0.19, with f' from autograd."""
    z = torch.linspace(-8, 8, 1603, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(f(z).sum(), z)
    zero = torch.zeros((), dtype=torch.float64, requires_grad=True)
    (slope0,) = torch.autograd.grad(f(zero), zero)
    expected = (slope / slope0 < 0.19).double().mean().item()
    assert 0.3 < expected < 0.9  # both sides of the bound are sampled
    assert saturated_fraction(z.detach(), name, pre_activation=True) == pytest.approx(expected)
    assert saturated_fraction(f(z).detach(), name) == pytest.approx(expected)


# --------------------------------------------------------------------------- weights


def hand_weights(model: nn.Module) -> None:
    """layer1 (3x2) = -0.5, layer2 (2x3) = [[1,-2,3],[0,0,0]], head (2x2) = diag(4,-4);
    every bias 100 (biases must not count)."""
    l1, l2 = linears(model)
    with torch.no_grad():
        l1.weight.fill_(-0.5)
        l2.weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, 0.0]]))
        model.head.weight.copy_(torch.tensor([[4.0, 0.0], [0.0, -4.0]]))
        for layer in (l1, l2, model.head):
            layer.bias.fill_(100.0)


def test_weight_magnitude_by_hand():
    model = mlp([3, 2])
    hand_weights(model)
    assert weight_magnitude(model) == pytest.approx(
        {"layer1": 0.5, "layer2": 1.0, "head": 2.0, "all": (3 + 6 + 8) / (6 + 6 + 4)})


def test_gradient_magnitude_by_hand_and_missing_grads():
    model = mlp([3, 2])
    assert gradient_magnitude(model) == {}
    l1, l2 = linears(model)
    l1.weight.grad = torch.full((3, 2), -0.25)
    model.head.weight.grad = torch.tensor([[1.0, -1.0], [3.0, 0.0]])
    model.head.bias.grad = torch.full((2,), 50.0)  # biases do not count
    assert gradient_magnitude(model) == pytest.approx(
        {"layer1": 0.25, "head": 1.25, "all": (1.5 + 5.0) / (6 + 4)})  # layer2: no grad


def test_weight_magnitude_names_layers_of_a_plain_module():
    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Conv2d(1, 1, 1))
    assert set(weight_magnitude(seq)) == {"0", "2", "all"}


# --------------------------------------------------------------------------- networks


def hand_relu_net() -> nn.Module:
    """2 -> 3 -> 2 ReLU net; on inputs in [0, 1]^2:
    layer1: u0 = relu(x0 + x1) fires, u1 = relu(-x0 - x1 - 1) and u2 = relu(x0 - 10) never do;
    layer2: v0 = relu(u0) fires, v1 = relu(u1 + u2 - 0.5) = relu(-0.5) never does."""
    model = mlp([3, 2])
    l1, l2 = linears(model)
    with torch.no_grad():
        l1.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 0.0]]))
        l1.bias.copy_(torch.tensor([0.0, -1.0, -10.0]))
        l2.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
        l2.bias.copy_(torch.tensor([0.0, -0.5]))
    return model


PROBE = torch.rand(50, 2, generator=torch.Generator().manual_seed(0)) + 0.01  # (50, 2) > 0


def test_hidden_activations_of_hand_built_net():
    model = hand_relu_net()
    h1, h2 = hidden_activations(model, PROBE)
    l1, l2 = linears(model)
    assert h1.shape == (50, 3) and h2.shape == (50, 2)
    torch.testing.assert_close(h1, torch.relu(PROBE @ l1.weight.T + l1.bias))
    torch.testing.assert_close(h2, torch.relu(h1 @ l2.weight.T + l2.bias))
    assert (h1[:, 1:] == 0).all() and (h1[:, 0] > 0).all()
    assert dead_fraction(h1) == pytest.approx(2 / 3) and dead_fraction(h2) == pytest.approx(1 / 2)


def test_plasticity_diagnostics_of_hand_built_net():
    model = hand_relu_net()
    d = plasticity_diagnostics(model, PROBE, tau=0.1)
    per_layer = ["dead_units", "dormant_units", "effective_rank", "stable_rank",
                 "approximate_rank", "numerical_stable_rank", "numerical_rank"]
    expected_keys = ({f"{k}/layer{l}" for k in per_layer for l in (1, 2)} | set(per_layer)
                     | {"weight_magnitude", "weight_magnitude/layer1", "weight_magnitude/layer2",
                        "weight_magnitude/head"})
    assert set(d) == expected_keys  # relu: no saturation; no .grad: no gradient_magnitude
    assert d["dead_units/layer1"] == pytest.approx(2 / 3)
    assert d["dead_units/layer2"] == pytest.approx(1 / 2)
    assert d["dead_units"] == pytest.approx(3 / 5)  # pooled over the 5 hidden units
    assert d["dormant_units"] == pytest.approx(3 / 5)
    # one live unit per layer: rank-1 features
    for key in ("effective_rank", "stable_rank", "approximate_rank", "numerical_rank"):
        assert d[f"{key}/layer1"] == pytest.approx(1.0) and d[key] == pytest.approx(1.0)
    assert d["weight_magnitude/layer1"] == pytest.approx(5 / 6)
    assert d["weight_magnitude"] == pytest.approx(weight_magnitude(model)["all"])
    assert all(isinstance(v, float) for v in d.values())


def test_plasticity_diagnostics_bounded_activation_and_gradients():
    model = mlp([4, 3], activation="tanh")
    with torch.no_grad():
        linears(model)[0].weight.mul_(100.0)  # layer 1 pushed deep into saturation
    model(PROBE).sum().backward()
    d = plasticity_diagnostics(model, PROBE)
    h1, h2 = hidden_activations(model, PROBE)
    assert d["saturated_units/layer1"] == saturated_fraction(h1, "tanh") > 0.5
    assert d["saturated_units/layer2"] == saturated_fraction(h2, "tanh")
    assert d["saturated_units"] == pytest.approx((d["saturated_units/layer1"] * 200
                                                  + d["saturated_units/layer2"] * 150) / 350)
    grads = gradient_magnitude(model)
    assert d["gradient_magnitude"] == grads["all"] and d["gradient_magnitude/head"] == grads["head"]
    assert d["effective_rank"] == pytest.approx(
        (d["effective_rank/layer1"] + d["effective_rank/layer2"]) / 2)


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_probe_removes_hooks_and_leaves_model_unchanged():
    model = mlp([8, 8], dropout=0.5)  # dropout would make a train-mode probe random
    model.train()
    model.body[1].eval()  # a mixed mode must come back as it was
    modes = [m.training for m in model.modules()]
    params = {k: v.clone() for k, v in model.state_dict().items()}
    first = hidden_activations(model, PROBE)
    second = plasticity_diagnostics(model, PROBE)
    again = hidden_activations(model, PROBE)
    assert hooks(model) == 0
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and second
    with pytest.raises(RuntimeError):  # wrong input width: hooks still removed, modes restored
        hidden_activations(model, torch.zeros(3, 5))
    assert hooks(model) == 0 and [m.training for m in model.modules()] == modes


def test_cnn_and_multi_head_models():
    model = build_model(ModelConfig(kind="cnn", channels=[3, 4]), (1, 8, 8), n_heads=3, head_dim=2)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    h1, h2 = hidden_activations(model, x)
    assert h1.shape == (6, 3, 8, 8) and h2.shape == (6, 4, 4, 4)  # before each max-pool
    assert (h1 >= 0).all()
    d = plasticity_diagnostics(model, x)
    assert {"dead_units/layer2", "effective_rank/layer2", "weight_magnitude/head"} <= set(d)
    assert d["effective_rank/layer1"] <= 6.0  # at most N = 6 examples
