"""Shrink and perturb: the step noise's std (statistical, fixed seed) and the task formula."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from engram.config import ModelConfig, parse_method
from engram.methods.base import Context
from engram.methods.shrink_perturb import ShrinkPerturb, fresh_parameters
from engram.models import build_model


def _net(hidden=(64,), inputs=64):
    torch.manual_seed(0)
    return build_model(ModelConfig(kind="mlp", hidden=list(hidden)), (inputs,), 1, 10)


def _ctx(model, task_index=1, seed=0):
    return Context(model=model, stream=None, train_cfg=None,
                   generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"),
                   task=SimpleNamespace(index=task_index))


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_every_step_adds_gaussian_noise_of_the_configured_std():
    model = _net(hidden=(128,))
    ctx = _ctx(model)
    sigma = 0.01
    method = ShrinkPerturb(ShrinkPerturb.Params(every="step", perturb=sigma))
    assert method.params.resolved() == (1.0, sigma)  # the shrink is left to weight_decay
    before = _flat(model)
    method.after_step(None, ctx)
    noise = _flat(model) - before  # (P,), P = 64*128 + 128 + 128*10 + 10 = 9738
    n = noise.numel()
    # sample std of n N(0, sigma^2) draws: relative standard error 1/sqrt(2n) = 0.7%
    assert abs(noise.std().item() / sigma - 1) < 0.03
    assert abs(noise.mean().item()) < 4 * sigma / math.sqrt(n)
    # the fourth moment of a Gaussian: E[eps^4] = 3 sigma^4 (not uniform, not constant)
    assert abs((noise / sigma).pow(4).mean().item() - 3) < 0.4  # its sd here: 0.1
    method.after_step(None, ctx)
    assert not torch.equal(_flat(model) - before, 2 * noise)  # a new draw each step


def test_every_step_shrinks_by_the_factor():
    model = _net()
    ctx = _ctx(model)
    before = _flat(model)
    ShrinkPerturb(ShrinkPerturb.Params(every="step", shrink=0.5, perturb=0.0)).after_step(None, ctx)
    assert torch.equal(_flat(model), 0.5 * before)


def test_every_step_leaves_task_starts_alone_and_task_mode_leaves_steps_alone():
    model = _net()
    before = _flat(model)
    ShrinkPerturb(ShrinkPerturb.Params(every="step")).before_task(_ctx(model, 3))
    ShrinkPerturb(ShrinkPerturb.Params(every="task")).after_step(None, _ctx(model, 3))
    ShrinkPerturb(ShrinkPerturb.Params(every="task")).before_task(_ctx(model, 0))  # first task
    assert torch.equal(_flat(model), before)


def test_fresh_parameters_are_a_new_default_initialisation_from_the_generator():
    model = _net()
    rng = torch.get_rng_state()
    a = fresh_parameters(model, torch.Generator().manual_seed(5))
    b = fresh_parameters(model, torch.Generator().manual_seed(5))
    c = fresh_parameters(model, torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    for name, p in model.named_parameters():
        assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
        assert not torch.equal(a[name], p)
    for module_name in ("body.1", "head"):  # nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        weight = a[f"{module_name}.weight"]
        bound = 1 / math.sqrt(weight.shape[1])
        assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound


def test_every_task_applies_shrink_theta_plus_perturb_theta_fresh():
    model = _net()
    old = copy.deepcopy(model)
    ctx = _ctx(model, task_index=2, seed=11)
    method = ShrinkPerturb(parse_method("shrink_perturb", {}, "m").params)  # defaults 0.4 / 0.1
    assert method.params.resolved() == (0.4, 0.1)
    fresh = fresh_parameters(model, torch.Generator().manual_seed(11))  # the same draw
    method.before_task(ctx)
    for (name, p), q in zip(model.named_parameters(), old.parameters()):
        torch.testing.assert_close(p, 0.4 * q + 0.1 * fresh[name], rtol=0, atol=1e-7)


@pytest.mark.parametrize("shrink,perturb,expect", [(0.0, 1.0, "fresh"), (1.0, 0.0, "same")])
def test_the_two_limits_are_a_fresh_start_and_a_warm_start(shrink, perturb, expect):
    model = _net()
    old = copy.deepcopy(model)
    fresh = fresh_parameters(model, torch.Generator().manual_seed(0))
    ShrinkPerturb(ShrinkPerturb.Params(shrink=shrink, perturb=perturb)).before_task(_ctx(model))
    for (name, p), q in zip(model.named_parameters(), old.parameters()):
        assert torch.equal(p, fresh[name] if expect == "fresh" else q)
