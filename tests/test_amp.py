"""train.amp and train.channels_last in the one training loop (engram.training)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engram import training
from engram.config import ModelConfig
from engram.data import DATASETS, build_stream
from engram.methods import METHODS, Context
from engram.methods.base import Method
from engram.models import build_model
from engram.training import MixedPrecision, train_task
from tests.conftest import tiny_config


def _train(train=None, model_kind="cnn", method: Method | None = None):
    cfg = tiny_config(data={"source": "digits", "limit": 64}, stream={"n_tasks": 1},
                      model={"kind": model_kind, "channels": [4]},
                      train={"epochs": 1, "batch_size": 16, **(train or {})})
    stream = build_stream(DATASETS.get("digits")(None), cfg.data, cfg.stream, 0)
    torch.manual_seed(0)
    model = build_model(cfg.model, stream.input_shape, stream.n_heads, stream.head_dim)
    ctx = Context(model=model, stream=stream, train_cfg=cfg.train,
                  generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    ctx.task = stream.tasks[0]
    losses = []
    train_task(ctx, method or METHODS.get("naive")(None), lambda e, loss: losses.append(loss))
    return ctx, losses


def test_with_the_options_off_training_is_a_plain_sgd_loop_bit_for_bit():
    ctx, _ = _train()
    data = ctx.task.train
    torch.manual_seed(0)
    cfg = ctx.train_cfg
    model = build_model(ModelConfig(kind="cnn", channels=[4]), ctx.stream.input_shape, 1,
                        ctx.stream.head_dim)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    for start in range(0, len(data), cfg.batch_size):
        index = order[start:start + cfg.batch_size]
        loss = F.cross_entropy(model(data.x[index]), data.y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for mine, theirs in zip(model.parameters(), ctx.model.parameters()):
        assert torch.equal(mine, theirs)


def test_amp_on_the_cpu_trains_in_bfloat16_autocast():
    plain, _ = _train()
    mixed, losses = _train({"amp": True})
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(plain.model.parameters(),
                                                     mixed.model.parameters()))
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())  # master weights


class GradientSpy(Method):
    """Naive training that records the gradient after_backward sees; optionally adds an inf
    penalty so that every gradient is inf."""


    def __init__(self, inf: bool = False) -> None:
        super().__init__()
        self.inf, self.grads = inf, []

    def before_task(self, ctx):
        self.initial = [p.detach().clone() for p in ctx.model.parameters()]

    def penalty(self, ctx):
        if self.inf:
            return sum(p.sum() for p in ctx.model.parameters()) * float("inf")
        return None

    def after_backward(self, ctx):
        self.grads.append([p.grad.clone() for p in ctx.model.parameters()])


def _with_scaler(monkeypatch):
    """train.amp on the CPU with a loss scaler and no autocast: the scaler's code path, on
    float32 numbers (a power-of-two scale and its unscaling are exact)."""
    monkeypatch.setattr(training, "mixed_precision", lambda amp, device, scaler=None: MixedPrecision(
        None, scaler or torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)))


def test_the_scaler_unscales_before_the_hooks_and_changes_nothing_else(monkeypatch):
    plain_spy, scaled_spy = GradientSpy(), GradientSpy()
    plain, _ = _train(method=plain_spy)
    _with_scaler(monkeypatch)
    scaled, _ = _train({"amp": True}, method=scaled_spy)
    for mine, theirs in zip(plain_spy.grads, scaled_spy.grads):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(),
                                                 scaled.model.parameters()))


def test_the_scaler_skips_the_step_and_its_hooks_when_a_gradient_is_inf(monkeypatch):
    _with_scaler(monkeypatch)
    spy = GradientSpy(inf=True)
    ctx, losses = _train({"amp": True}, method=spy)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert spy.grads == [] and ctx.step == 0  # no hook saw the inf gradient
    for before, after in zip(spy.initial, ctx.model.parameters()):
        assert torch.equal(before, after)  # and no step was taken


@pytest.mark.parametrize("name", ["si", "rwalk", "gem"])
def test_skipped_steps_leave_a_methods_state_finite(monkeypatch, name):
    """Every third step overflows: the scaler skips it, and the method never sees it (SI's
    path integral once multiplied its inf gradient by a zero update: NaN importances)."""
    base = METHODS.get(name)

    class SometimesInf(base):
        calls = 0

        def penalty(self, ctx):
            self.calls += 1
            penalty = super().penalty(ctx)
            if self.calls % 3 == 1:
                inf = sum(p.sum() for p in ctx.model.parameters()) * float("inf")
                return inf if penalty is None else penalty + inf
            return penalty

    _with_scaler(monkeypatch)
    cfg = tiny_config(data={"source": "digits", "limit": 120}, stream={"n_tasks": 2},
                      train={"epochs": 1, "batch_size": 16, "amp": True})
    stream = build_stream(DATASETS.get("digits")(None), cfg.data, cfg.stream, 0)
    torch.manual_seed(0)
    model = build_model(cfg.model, stream.input_shape, stream.n_heads, stream.head_dim)
    ctx = Context(model=model, stream=stream, train_cfg=cfg.train,
                  generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    method = SometimesInf(base.Params())
    steps = 0
    for task in stream.tasks:
        ctx.task = task
        ctx.seen_tasks.append(task)
        train_task(ctx, method, lambda e, loss: None)
        steps += -(-len(task.train) // 16)
    assert 0 < ctx.step < steps  # some steps were skipped, the others taken
    state = [t for t in torch.utils._pytree.tree_leaves(method.state_dict())
             if isinstance(t, torch.Tensor)]
    assert state and all(torch.isfinite(t.float()).all() for t in state)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_channels_last_keeps_conv_weights_in_nhwc_and_the_same_numbers():
    plain, _ = _train(model_kind="resnet18_slim")
    nhwc, _ = _train({"channels_last": True}, model_kind="resnet18_slim")
    conv = nhwc.model.body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(plain.model.parameters(), nhwc.model.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
