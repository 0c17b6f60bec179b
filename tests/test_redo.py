"""ReDo resets exactly the tau-dormant units of a hand-built network, every F steps."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from engram.config import ModelConfig
from engram.methods.base import Context
from engram.methods.redo import ReDo, dormancy_scores
from engram.models import build_model

X = torch.tensor([[1.0, 2.0], [0.5, 0.5], [2.0, 1.0], [1.0, 0.0]])  # (B=4, 2), all >= 0
W_IN = [[-1.0, -1.0],    # unit 0: never fires on X (dead)
        [0.01, 0.01],    # unit 1: fires a little
        [1.0, 0.5],      # unit 2
        [0.5, 1.0]]      # unit 3
B_IN = [-0.1, 0.0, 0.0, 0.2]


def _net():
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mlp", hidden=[4]), (2,), 1, 3)
    with torch.no_grad():
        model.body[1].weight.copy_(torch.tensor(W_IN))
        model.body[1].bias.copy_(torch.tensor(B_IN))
    return model


def _hand_scores():
    """mean_B |h_i| / (mean_k mean_B |h_k| + 1e-9), by loops."""
    activity = []
    for row, b in zip(W_IN, B_IN):
        h = [max(0.0, row[0] * x0 + row[1] * x1 + b) for x0, x1 in X.tolist()]
        activity.append(sum(h) / len(h))
    layer_mean = sum(activity) / len(activity)
    return [a / (layer_mean + 1e-9) for a in activity]


def _ctx(model, step):
    return Context(model=model, stream=None, train_cfg=None,
                   generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                   step=step)


def test_dormancy_scores_match_the_hand_formula():
    h = torch.relu(_net().body[1](X)).detach()
    scores = _hand_scores()
    torch.testing.assert_close(dormancy_scores(h), torch.tensor(scores))
    assert scores[0] == 0.0 and 0 < scores[1] < 0.1 < scores[2]


@pytest.mark.parametrize("tau,dormant", [(0.1, [0, 1]), (0.0, [0])])
def test_redo_resets_exactly_the_dormant_units(tau, dormant):
    model = _net()
    old = copy.deepcopy(model)
    ctx = _ctx(model, step=9)
    method = ReDo(ReDo.Params(tau=tau, every=10))
    method.prepare_model(model, ctx)
    method.make_batch(None, ctx)
    model(X)
    method.after_step(None, ctx)
    assert method.last_recycled["body.1"].tolist() == dormant
    assert [i for i, s in enumerate(_hand_scores()) if s <= tau] == dormant
    alive = [i for i in range(4) if i not in dormant]
    linear, head = model.body[1], model.head
    bound = math.sqrt(1 / 2)  # nn.Linear's own init, fan_in 2
    assert (linear.weight[dormant] != old.body[1].weight[dormant]).all()
    assert linear.weight[dormant].abs().max() <= bound
    assert (linear.bias[dormant] == 0).all()
    assert torch.equal(head.weight[:, dormant], torch.zeros(3, len(dormant)))
    assert torch.equal(linear.weight[alive], old.body[1].weight[alive])
    assert torch.equal(linear.bias[alive], old.body[1].bias[alive])
    assert torch.equal(head.weight[:, alive], old.head.weight[:, alive])
    assert torch.equal(head.bias, old.head.bias)  # ReDo makes no bias correction
    assert method.recycled == {"body.1": len(dormant)}


def test_redo_acts_only_every_f_steps():
    model = _net()
    old = copy.deepcopy(model)
    method = ReDo(ReDo.Params(tau=0.1, every=3))
    method.prepare_model(model, _ctx(model, 0))
    for step in range(5):  # steps 1..5 of the run: only the 3rd looks
        ctx = _ctx(model, step)
        method.make_batch(None, ctx)
        model(X)
        method.after_step(None, ctx)
        changed = not torch.equal(model.body[1].weight, old.body[1].weight)
        assert changed == (step >= 2)
        if step == 2:
            assert method.last_recycled["body.1"].tolist() == [0, 1]
    assert method.recycled == {"body.1": 2}  # only the 3rd step looked


def test_a_window_scores_the_examples_of_the_last_steps():
    """every=4, window=3: steps 2-4 are summed, step 1 is not. Unit 1 fires only on the
    step-2 batch, so with the window it is not dormant; on step 4's batch alone it is. The
    step-1 batch is the only one on which the dead unit 0 fires: it must stay out."""
    wakes_unit_0 = torch.tensor([[-5.0, -5.0]])  # h = (9.9, 0, 0, 0)
    loud = torch.tensor([[0.0, 10.0]])           # h = (0, 10, 5, 10.2)
    quiet = torch.tensor([[1.0, 0.0]])           # h = (0, 0, 1, 0.7)
    batches = [wakes_unit_0, loud, quiet, quiet]  # steps 1..4
    results = {}
    for window in (1, 3):
        model = _net()
        with torch.no_grad():
            model.body[1].weight[1] = torch.tensor([0.0, 1.0])
        method = ReDo(ReDo.Params(tau=0.1, every=4, window=window))
        method.prepare_model(model, _ctx(model, 0))
        for step, x in enumerate(batches):
            ctx = _ctx(model, step)
            method.make_batch(None, ctx)
            model(x)
            method.after_step(None, ctx)
            if step == 2 and window == 3:  # mid-window: the state holds the sums so far
                assert method.examples == 2
                torch.testing.assert_close(method.activity["body.1"],
                                           torch.tensor([0.0, 10.0, 6.0, 10.9]))
        results[window] = method.last_recycled["body.1"].tolist()
        assert method.examples == 0 and method.activity == {}  # a new window starts
    # window 3: mean |h| = (0, 10, 7, 11.6) / 3, s_1 = 10 / 7.15 = 1.4; window 1: s_1 = 0
    assert results == {1: [0, 1], 3: [0]}


def test_a_window_longer_than_the_period_is_refused():
    from engram.config import parse_method
    from engram.errors import ConfigError

    with pytest.raises(ConfigError, match="window"):
        parse_method("redo", {"every": 10, "window": 11}, "methods[0]")


def test_by_default_recycled_rows_are_drawn_like_a_fresh_layer():
    """Recycled input rows follow nn.Linear's own initialisation (what the network started
    from), not kaiming's relu-gain distribution: over 10,000 draws the spread of a freshly
    constructed layer, bias 0."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mlp", hidden=[200]), (50,), 1, 3)
    ctx = _ctx(model, step=0)
    method = ReDo(ReDo.Params(tau=1e9, every=1))  # every unit counts as dormant
    method.prepare_model(model, ctx)
    method.make_batch(None, ctx)
    model(torch.rand(8, 50))
    method.after_step(None, ctx)
    assert len(method.last_recycled["body.1"]) == 200
    fresh = torch.nn.Linear(50, 200).weight.detach()
    recycled = model.body[1].weight.detach()
    assert recycled.std().item() == pytest.approx(fresh.std().item(), rel=0.03)
    assert recycled.abs().max() <= 1 / math.sqrt(50)
    assert (model.body[1].bias == 0).all()
