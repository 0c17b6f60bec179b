"""The reduced ResNet-18 (engram.models.resnet) and every method on its slim variant."""

from __future__ import annotations

import math

import pytest
import torch

from engram.config import ModelConfig, parse_method
from engram.data import DATASETS, build_stream
from engram.errors import ConfigError
from engram.methods import METHODS, Context
from engram.methods.base import refuse_unusable_model
from engram.models import MODELS, build_model
from engram.models.protocol import NEEDS, batch_norm_statistics_frozen, structure_gap
from engram.training import evaluate, train_task
from tests.conftest import tiny_config


def resnet18_parameters(in_channels: int, nf: int, classes: int) -> int:
    """The count by hand: 3x3 convs without bias, BatchNorm weight + bias (2 per channel),
    1x1 conv + BN shortcuts where the width changes, a Linear head with bias."""
    def block(inp: int, out: int) -> int:
        shortcut = inp * out + 2 * out if inp != out else 0
        return 9 * inp * out + 2 * out + 9 * out * out + 2 * out + shortcut

    total = 9 * in_channels * nf + 2 * nf  # stem
    inp = nf
    for width in (nf, 2 * nf, 4 * nf, 8 * nf):
        total += block(inp, width) + block(width, width)
        inp = width
    return total + 8 * nf * classes + classes


def test_the_literature_resnet18_has_mammoths_parameter_count():
    model = build_model(ModelConfig(kind="resnet18"), (3, 32, 32), 1, 10)
    count = sum(p.numel() for p in model.parameters())
    assert count == resnet18_parameters(3, 64, 10) == 11_173_962
    slim = build_model(ModelConfig(kind="resnet18_slim"), (3, 32, 32), 1, 10)
    assert sum(p.numel() for p in slim.parameters()) == resnet18_parameters(3, 20, 10)


def test_the_body_keeps_every_image_size_and_feeds_the_head():
    model = build_model(ModelConfig(kind="resnet18_slim"), (1, 8, 8), 1, 4)
    x = torch.rand(3, 1, 8, 8)
    features = model.features(x)
    assert features.shape == (3, 160)
    assert torch.equal(model.output(features), model(x))
    assert model.head.in_features == 160
    assert set(MODELS.names()) >= {"resnet18", "resnet18_slim"}


def test_frozen_batch_norm_statistics_stay_while_the_batch_is_normalised():
    model = build_model(ModelConfig(kind="resnet18_slim"), (1, 8, 8), 1, 4).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x = torch.rand(4, 1, 8, 8)
    with batch_norm_statistics_frozen(model):
        frozen_out = model(x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.allclose(frozen_out, model(x))  # training-mode output unchanged
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _stream(scenario: str):
    cfg = tiny_config(data={"source": "digits", "limit": 48},
                      stream={"scenario": scenario, "n_tasks": 2},
                      train={"epochs": 1, "batch_size": 16})
    return cfg, build_stream(DATASETS.get("digits")(None), cfg.data, cfg.stream, 0)


@pytest.mark.parametrize("name", METHODS.names())
@pytest.mark.parametrize("scenario", ["task", "class"])
def test_every_method_trains_on_the_slim_resnet_or_is_refused_with_the_reason(name, scenario):
    cfg, stream = _stream(scenario)
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="resnet18_slim"), stream.input_shape, stream.n_heads,
                        stream.head_dim)
    spec = parse_method(name, {}, "test")
    method = METHODS.get(name)(spec.params)
    lacking = [need for need in method.model_needs if structure_gap(model, need) is not None]
    if lacking:
        with pytest.raises(ConfigError) as refused:
            refuse_unusable_model(spec, model)
        assert str(refused.value).startswith(f"method {name} cannot act on this network: it needs ")
        assert any(NEEDS[need] in str(refused.value) for need in lacking)
        return
    ctx = Context(model=model, stream=stream, train_cfg=cfg.train,
                  generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    ctx.model = method.prepare_model(model, ctx)
    before = [p.detach().clone() for p in ctx.model.parameters()]
    losses = []
    for task in stream.tasks:
        ctx.task = task
        ctx.seen_tasks.append(task)
        train_task(ctx, method, lambda epoch, loss: losses.append(loss))
    assert losses and all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(b, p) for b, p in zip(before, ctx.model.parameters()))
    assert all(0.0 <= evaluate(method.eval_model(ctx), t.test)[0] <= 1.0 for t in stream.tasks)


@pytest.mark.parametrize("name", ["packnet", "ogd", "mcsgd"])
def test_methods_that_cannot_keep_batch_norm_statistics_refuse_it(name):
    _, stream = _stream("task")
    model = build_model(ModelConfig(kind="resnet18_slim"), stream.input_shape, stream.n_heads,
                        stream.head_dim)
    with pytest.raises(ConfigError, match="without BatchNorm layers.*BatchNorm2d"):
        refuse_unusable_model(parse_method(name, {}, "test"), model)
