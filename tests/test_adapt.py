"""Bring your own network: engram.models.adapt and the structure needs methods declare.

Every registered method, with its default params, on two user networks adapted with `adapt`:
a Sequential CNN (split into body and head) and a residual MLP with its own forward (a black
box). Each method either trains two tiny tasks through engram's loop, or is refused before
training with a ConfigError naming the need the network lacks, exactly when it declares one.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from engram.config import parse_method
from engram.data import DATASETS, build_stream
from engram.errors import ConfigError
from engram.methods import METHODS, Context
from engram.methods.base import model_unusable_reason, refuse_unusable_model
from engram.models import BlackBoxNet, ContinualNet, adapt
from engram.models.protocol import NEEDS, structure_gap
from engram.training import evaluate, train_task
from tests.conftest import tiny_config

ALL_METHODS = METHODS.names()


class ResidualMLP(nn.Module):
    """x -> logits with a skip connection: its forward is not head(body(x)) of its children."""

    def __init__(self, inputs: int, width: int, outputs: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.inp = nn.Linear(inputs, width)
        self.block = nn.Linear(width, width)
        self.out = nn.Linear(width, outputs)  # a last Linear child, yet not a separable head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(self.flatten(x)))
        return self.out(h + torch.relu(self.block(h)))


def user_cnn(outputs: int) -> nn.Sequential:
    """Conv2d-ReLU-Flatten-Linear on the 1x8x8 digits."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, outputs))


def adapted_cnn(stream) -> ContinualNet:
    return adapt(user_cnn(stream.head_dim), n_heads=stream.n_heads, head_dim=stream.head_dim)


def adapted_residual(stream) -> ContinualNet:
    module = ResidualMLP(math.prod(stream.input_shape), 16, stream.n_heads * stream.head_dim)
    return adapt(module, n_heads=stream.n_heads, head_dim=stream.head_dim)


NETWORKS = {"sequential_cnn": adapted_cnn, "black_box_residual": adapted_residual}


def _stream(scenario: str):
    cfg = tiny_config(stream={"scenario": scenario})
    return cfg, build_stream(DATASETS.get("digits")(None), cfg.data, cfg.stream, 0)


def _lacks(name: str, model: nn.Module) -> set[str]:
    """The needs `name` declares (default params) that `model` does not meet."""
    method = METHODS.get(name)(parse_method(name, {}, "test").params)
    return {need for need in method.model_needs if structure_gap(model, need) is not None}


def run_two_tasks(name: str, network: str, scenario: str, check: bool = True):
    """As run_one does: build the network (seeded), refuse the method on it if it lacks a
    need (check=False skips that), prepare, train tasks 1 and 2, evaluate them."""
    cfg, stream = _stream(scenario)
    torch.manual_seed(0)
    model = NETWORKS[network](stream)
    spec = parse_method(name, {}, "test")
    if check:
        refuse_unusable_model(spec, model)
    method = METHODS.get(name)(spec.params)
    ctx = Context(model=model, stream=stream, train_cfg=cfg.train,
                  generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    ctx.model = method.prepare_model(model, ctx)
    before = [p.detach().clone() for p in ctx.model.parameters()]
    losses = []
    for task in stream.tasks[:2]:
        ctx.task = task
        ctx.seen_tasks.append(task)
        train_task(ctx, method, lambda epoch, loss: losses.append(loss))
    accuracies = [evaluate(method.eval_model(ctx), task.test)[0] for task in stream.tasks[:2]]
    return ctx, losses, before, accuracies


@pytest.mark.parametrize("name", ALL_METHODS)
@pytest.mark.parametrize("network", sorted(NETWORKS))
@pytest.mark.parametrize("scenario", ["task", "class"])
def test_every_method_trains_on_an_adapted_network_or_names_what_it_lacks(name, network, scenario):
    _, stream = _stream(scenario)
    torch.manual_seed(0)
    lacking = _lacks(name, NETWORKS[network](stream))
    if lacking:
        with pytest.raises(ConfigError) as refused:
            run_two_tasks(name, network, scenario)
        message = str(refused.value)
        assert message.startswith(f"method {name} cannot act on this network: it needs ")
        assert any(NEEDS[need] in message for need in lacking)
        # The declared need is real: run anyway, and the method breaks on the missing part
        # (its own structure check, or the attribute it would use): it is not over-declared.
        with pytest.raises((ConfigError, AttributeError)):
            run_two_tasks(name, network, scenario, check=False)
        return
    ctx, losses, before, accuracies = run_two_tasks(name, network, scenario)
    assert losses and all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(b, p) for b, p in zip(before, ctx.model.parameters()))
    assert all(0.0 <= a <= 1.0 for a in accuracies)


@pytest.mark.parametrize("network, structural", [
    ("sequential_cnn", {"continual_backprop", "redo", "sleep"}),
    ("black_box_residual", {"continual_backprop", "redo", "sleep", "multihead", "packnet",
                            "progressive", "latent_replay"})])
def test_only_methods_that_need_a_missing_structure_are_refused(network, structural):
    """Not a blanket refusal: on the black box every method that needs nothing of the network
    (most of them) is accepted; the refused ones are those that declare a missing need."""
    _, stream = _stream("task")
    torch.manual_seed(0)
    model = NETWORKS[network](stream)
    refused = {name for name in ALL_METHODS if model_unusable_reason(
        METHODS.get(name)(parse_method(name, {}, "test").params), model) is not None}
    assert refused == {name for name in ALL_METHODS if _lacks(name, model)}
    assert structural <= refused  # the methods known to need a structure, at least
    accepted = set(ALL_METHODS) - refused
    assert {"naive", "ewc", "lwf", "replay", "generative_replay", "snapshots",
            "compose"} <= accepted


def test_herding_replay_needs_features_and_compose_collects_its_parts_needs():
    _, stream = _stream("class")
    torch.manual_seed(0)
    box = adapted_residual(stream)
    herding = parse_method("replay", {"policy": "herding"}, "test")
    with pytest.raises(ConfigError, match=r"method replay\(policy=herding\) cannot act on this "
                                          r"network: it needs body features.*black box.*"
                                          r"engram.models.adapt\(module, features=\.\.\., "
                                          r"head=\.\.\.\)"):
        refuse_unusable_model(herding, box)
    compose = parse_method("compose", {"methods": ["ewc", {"name": "replay", "policy": "herding"},
                                                   "sleep"]}, "test")
    assert METHODS.get("compose")(compose.params).model_needs == ("features", "relu_mlp")
    refuse_unusable_model(herding, adapted_cnn(stream))  # split: features exist


# ----------------------------------------------------------------------------- adapt itself


def test_sequential_is_split_with_outputs_identical_to_its_own_forward():
    torch.manual_seed(0)
    module = user_cnn(5)
    net = adapt(module)
    assert isinstance(net, ContinualNet) and not isinstance(net, BlackBoxNet)
    assert net.head is module[3] and list(net.body) == list(module)[:3]
    assert (net.n_heads, net.head_dim) == (1, 5)
    x = torch.randn(7, 1, 8, 8)
    assert torch.equal(net(x), module(x))
    assert torch.equal(net(x, torch.zeros(7, dtype=torch.long)), module(x))
    assert torch.equal(net.output(net.features(x)), module(x))


def test_parameters_are_shared_not_copied():
    torch.manual_seed(0)
    module = user_cnn(5)
    net = adapt(module)
    assert {id(p) for p in net.parameters()} == {id(p) for p in module.parameters()}
    before = module[0].weight.detach().clone()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    nn.functional.cross_entropy(net(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    assert not torch.equal(module[0].weight, before)  # training the adapted net trains the module


def test_named_sequential_keeps_its_layer_names():
    module = nn.Sequential(OrderedDict(flat=nn.Flatten(), hidden=nn.Linear(64, 8), act=nn.ReLU(),
                                       out=nn.Linear(8, 3)))
    net = adapt(module)
    assert [name for name, _ in net.named_parameters()] == [
        "body.hidden.weight", "body.hidden.bias", "head.weight", "head.bias"]


def test_explicit_features_and_head_replace_the_forward():
    class Encoded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Tanh())
            self.classifier = nn.Linear(10, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.encoder(x))

    torch.manual_seed(0)
    module = Encoded()
    net = adapt(module, features=module.encoder, head=module.classifier)
    assert net.body is module.encoder and net.head is module.classifier
    x = torch.randn(6, 1, 8, 8)
    assert torch.equal(net(x), module(x))
    assert structure_gap(net, "hidden_units") is None  # Linear + Tanh, then a Linear head
    assert isinstance(adapt(module), BlackBoxNet)  # without the split: its own forward


def test_a_module_that_is_not_sequential_stays_a_black_box_with_its_own_forward():
    torch.manual_seed(0)
    module = ResidualMLP(64, 8, 3)
    net = adapt(module)
    assert isinstance(net, BlackBoxNet) and net.module is module
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(net(x), module(x))  # the skip connection is kept
    assert {id(p) for p in net.parameters()} == {id(p) for p in module.parameters()}
    with pytest.raises(ConfigError, match="black box"):
        net.features(x)
    for need in set(NEEDS) - {"no_batch_norm"}:  # every need of a body/head split
        assert structure_gap(net, need) is not None
    assert structure_gap(net, "no_batch_norm") is None  # read off its modules: it has none
    assert not hasattr(net, "body") and not hasattr(net, "head")


def test_multi_head_widening_makes_a_seeded_default_initialised_head():
    torch.manual_seed(0)
    module = user_cnn(2)
    nets = []
    for _ in range(2):
        torch.manual_seed(7)
        nets.append(adapt(module, n_heads=3))
    net = nets[0]
    assert (net.n_heads, net.head_dim) == (3, 2)
    assert net.head is not module[3] and net.body[0] is module[0]  # the body is shared
    assert (net.head.in_features, net.head.out_features) == (256, 6)
    assert torch.equal(net.head.weight, nets[1].head.weight)  # the global RNG draws it
    bound = 1 / math.sqrt(256)  # nn.Linear's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert net.head.weight.abs().max() <= bound and net.head.bias.abs().max() <= bound
    assert net.head.weight.std() > bound / 3  # a real draw, not zeros
    x, task = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 2, 1, 0])
    every = net.all_logits(x).view(6, 3, 2)
    assert torch.equal(net(x, task), every[torch.arange(6), task])
    with pytest.raises(ValueError, match="task id"):
        net(x)


def test_a_head_that_already_holds_every_task_is_kept():
    module = user_cnn(6)
    net = adapt(module, n_heads=3, head_dim=2)
    assert net.head is module[3] and (net.n_heads, net.head_dim) == (3, 2)


def test_black_box_heads_are_read_from_the_modules_own_outputs():
    torch.manual_seed(0)
    module = ResidualMLP(64, 8, 6)
    net = adapt(module, n_heads=3, head_dim=2)
    x, task = torch.randn(4, 1, 8, 8), torch.tensor([2, 0, 1, 2])
    assert torch.equal(net(x, task), module(x).view(4, 3, 2)[torch.arange(4), task])
    narrow = adapt(ResidualMLP(64, 8, 5), n_heads=3, head_dim=2)
    with pytest.raises(ConfigError, match=r"shape \(4, 5\).*\(B, 6\)"):
        narrow(x, task)


@pytest.mark.parametrize("kwargs, message", [
    ({"features": nn.Flatten()}, "both features= and head="),
    ({"features": nn.Flatten(), "head": nn.Conv2d(1, 1, 1)}, "head must be an nn.Linear"),
    ({"n_heads": 0}, "n_heads"),
    ({"head_dim": 3}, "head has 5 outputs"),
    ({"n_heads": 2, "head_dim": 3}, r"5 outputs.*3 \(one head, widened\) or 6"),
])
def test_inconsistent_arguments_are_one_line_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        adapt(user_cnn(5), **kwargs)


def test_black_box_with_several_heads_needs_head_dim():
    with pytest.raises(ConfigError, match="needs head_dim"):
        adapt(ResidualMLP(64, 8, 6), n_heads=3)
    with pytest.raises(ConfigError, match="nn.Module"):
        adapt(lambda x: x)


# ----------------------------------------------------------------------------- entry points


def test_the_runner_refuses_a_method_on_a_network_it_cannot_act_on(tmp_path):
    from engram.experiments.continual import run_experiment
    from engram.results import read_rows

    cfg = tiny_config(model={"kind": "cnn", "channels": [4]}, methods=["sleep"])
    with pytest.raises(ConfigError, match="method sleep cannot act on this network: it needs a "
                                          "ReLU mlp.*Conv2d"):
        run_experiment(cfg, tmp_path, show_progress=False)
    assert read_rows(tmp_path / "results.csv") == []  # not even the untrained baseline


def test_the_window_experiment_refuses_before_any_run(tmp_path):
    from engram.experiments.window import parse_window_experiment, run_window_experiment

    experiment = parse_window_experiment({
        "run": {"max_steps": 10},
        "variants": [{"name": "plain"}, {"name": "frozen", "method": "multihead"}]})
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="method multihead cannot act on this network: it "
                                          "needs a body module.*ResidualNet"):
        run_window_experiment(experiment, out, show_progress=False)
    assert not out.exists()
