"""Network bodies and the multi-head wrapper: shapes, head selection, gradient routing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engram.config import ModelConfig
from engram.models import MODELS, ContinualNet, build_model
from engram.models.nets import cnn_body, mlp_body

SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar": (3, 32, 32)}
# (n_heads, head_dim) of split digits, 5 tasks, under each scenario
HEADS = {"task": (5, 2), "domain": (1, 2), "class": (1, 10)}
SMALL = ModelConfig(hidden=[16, 8], channels=[4, 6])


@pytest.mark.parametrize("scenario", list(HEADS))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("kind", MODELS.names())
def test_every_model_builds_and_gives_head_dim_outputs(kind, shape, scenario):
    torch.manual_seed(0)
    n_heads, head_dim = HEADS[scenario]
    model = build_model(ModelConfig(kind=kind, hidden=[16, 8], channels=[4, 6]), shape,
                        n_heads, head_dim)
    assert isinstance(model, ContinualNet)
    assert model.head.out_features == n_heads * head_dim
    x = torch.rand(5, *shape)
    task = torch.tensor([0, 1, 2, 3, 4]) % n_heads
    out = model(x, task)
    assert out.shape == (5, head_dim)
    assert torch.isfinite(out).all()
    assert model.features(x).shape == (5, model.head.in_features)


@pytest.mark.parametrize("kind", MODELS.names())
def test_default_model_config_builds_on_digits(kind):
    model = build_model(ModelConfig(kind=kind), (1, 8, 8), 1, 10)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_mlp_body_layers():
    body, features = mlp_body((1, 8, 8), ModelConfig(hidden=[16, 8], activation="tanh"))
    linears = [m for m in body if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 16), (16, 8)]
    assert sum(isinstance(m, nn.Tanh) for m in body) == 2
    assert features == 8


def test_mlp_without_hidden_layers_is_linear():
    body, features = mlp_body((3, 4, 4), ModelConfig(hidden=[]))
    assert features == 48
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(body(x), x.reshape(2, 48))


@pytest.mark.parametrize("shape, features", [
    ((1, 8, 8), 6 * 2 * 2),      # 8 -> 4 -> 2
    ((1, 28, 28), 6 * 7 * 7),    # 28 -> 14 -> 7
    ((3, 32, 32), 6 * 8 * 8),    # 32 -> 16 -> 8
])
def test_cnn_feature_count(shape, features):
    body, n = cnn_body(shape, SMALL)
    assert n == features
    assert body(torch.rand(2, *shape)).shape == (2, features)


def test_cnn_stops_pooling_at_one_pixel():
    # 8x8 with four blocks: 8 -> 4 -> 2 -> 1, then no more pooling
    body, n = cnn_body((1, 8, 8), ModelConfig(channels=[2, 3, 4, 5]))
    assert sum(isinstance(m, nn.MaxPool2d) for m in body) == 3
    assert n == 5
    assert body(torch.rand(2, 1, 8, 8)).shape == (2, 5)


# ----------------------------------------------------------------------------- multi-head

@pytest.fixture
def three_heads():
    torch.manual_seed(0)
    return build_model(SMALL, (1, 8, 8), n_heads=3, head_dim=4)


def test_multi_head_output_is_the_slice_of_its_task(three_heads):
    model = three_heads
    x = torch.rand(6, 1, 8, 8)
    task = torch.tensor([2, 0, 1, 1, 2, 0])
    out = model(x, task)
    full = model.head(model.body(x))  # (6, 3 * 4)
    assert full.shape == (6, 12)
    for i, t in enumerate(task.tolist()):
        assert torch.allclose(out[i], full[i, 4 * t: 4 * t + 4])
    # and not the slice of another head
    assert not torch.allclose(out[0], full[0, 0:4])


def test_multi_head_same_input_different_task_differs(three_heads):
    x = torch.rand(1, 1, 8, 8).expand(3, 1, 8, 8)
    out = three_heads(x, torch.tensor([0, 1, 2]))
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])


def test_multi_head_without_task_raises(three_heads):
    with pytest.raises(ValueError, match="a multi-head model needs the task id of every example"):
        three_heads(torch.rand(2, 1, 8, 8))


def test_single_head_ignores_task():
    torch.manual_seed(0)
    model = build_model(SMALL, (1, 8, 8), n_heads=1, head_dim=10)
    x = torch.rand(3, 1, 8, 8)
    full = model.head(model.body(x))
    assert torch.equal(model(x), full)
    assert torch.equal(model(x, torch.tensor([0, 3, 7])), full)


def test_gradients_reach_only_the_used_head(three_heads):
    model = three_heads
    x = torch.rand(8, 1, 8, 8)
    task = torch.full((8,), 1)
    loss = nn.functional.cross_entropy(model(x, task), torch.randint(0, 4, (8,)))
    loss.backward()
    w, b = model.head.weight.grad, model.head.bias.grad  # (12, F), (12,)
    used = slice(4, 8)
    assert w[used].abs().sum() > 0 and b[used].abs().sum() > 0
    for other in (slice(0, 4), slice(8, 12)):
        assert torch.count_nonzero(w[other]) == 0
        assert torch.count_nonzero(b[other]) == 0
    # the shared body learns from every task
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.body.parameters())


def test_one_sgd_step_moves_only_the_used_head(three_heads):
    model = three_heads
    before = model.head.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(8, 1, 8, 8)
    loss = model(x, torch.zeros(8, dtype=torch.long)).sum()
    loss.backward()
    opt.step()
    after = model.head.weight.detach()
    assert not torch.equal(after[0:4], before[0:4])
    assert torch.equal(after[4:12], before[4:12])


def test_dropout_option_adds_dropout_after_each_hidden_block_only_when_asked():
    from engram.config import ModelConfig
    from engram.models.nets import cnn_body, mlp_body

    plain, _ = mlp_body((1, 8, 8), ModelConfig(hidden=[16, 8]))
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain)
    body, _ = mlp_body((1, 8, 8), ModelConfig(hidden=[16, 8], dropout=0.3))
    drops = [m for m in body if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 2 and all(m.p == 0.3 for m in drops)
    assert isinstance(body[3], torch.nn.Dropout)  # Flatten, Linear, ReLU, Dropout, ...
    cnn, _ = cnn_body((1, 8, 8), ModelConfig(channels=[4, 4], dropout=0.5))
    assert sum(isinstance(m, torch.nn.Dropout) for m in cnn) == 2
    # dropout acts in training only: eval is deterministic
    body.eval()
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(body(x), body(x))
