"""Continual backprop against hand computations on tiny hand-built networks."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from engram.config import ModelConfig, parse_method
from engram.errors import ConfigError
from engram.methods.base import Context
from engram.methods.continual_backprop import (UNIT_UTILITIES, ContinualBackprop, hidden_layers,
                                               init_bound, register_utility, reinitialise_units)
from engram.models import build_model


def _net(hidden, inputs=2, outputs=2, activation="relu"):
    torch.manual_seed(0)
    return build_model(ModelConfig(kind="mlp", hidden=hidden, activation=activation),
                       (inputs,), n_heads=1, head_dim=outputs)


def _ctx(model, seed=0):
    return Context(model=model, stream=None, train_cfg=None,
                   generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"))


def _cbp(model, ctx, **params):
    method = ContinualBackprop(ContinualBackprop.Params(**params))
    method.prepare_model(model, ctx)
    return method


def _step(method, model, ctx, x):
    """The runner's order without an optimizer: make_batch arms, forward, after_step."""
    method.make_batch(None, ctx)
    model(x)
    method.after_step(None, ctx)
    ctx.step += 1
    return method.last_replaced


def _set(linear, weight, bias):
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        linear.bias.copy_(torch.tensor(bias, dtype=torch.float32))


# ----------------------------------------------------------------------------- utility


W_IN, B_IN = [[1.0, 0.0], [0.0, -1.0], [1.0, 1.0]], [0.0, 0.5, -1.0]
W_OUT, B_OUT = [[1.0, -2.0, 0.5], [3.0, 1.0, -0.5]], [0.0, 0.0]
BATCHES = [[[1.0, 2.0], [-1.0, 1.0]], [[2.0, -1.0], [0.5, 0.5]]]


def _hand_h(x):
    """ReLU(W_IN x + B_IN) for each example, by loops: list of B lists of 3."""
    return [[max(0.0, sum(w * v for w, v in zip(row, ex)) + b) for row, b in zip(W_IN, B_IN)]
            for ex in x]


def _hand_run(utility, eta):
    """u, f after the two BATCHES, by hand (plain floats)."""
    u, f = [0.0] * 3, [0.0] * 3
    for age, x in enumerate(BATCHES, start=1):
        h = _hand_h(x)
        for i in range(3):
            f[i] = eta * f[i] + (1 - eta) * sum(ex[i] for ex in h) / len(h)
            f_hat = f[i] / (1 - eta ** age)
            out_col = [abs(W_OUT[k][i]) for k in range(2)]
            if utility == "contribution":
                y = sum(abs(ex[i]) for ex in h) / len(h) * sum(out_col)
            else:  # adaptable_contribution
                y = (sum(abs(ex[i] - f_hat) for ex in h) / len(h) * (sum(out_col) / 2)
                     / (sum(abs(w) for w in W_IN[i]) / 2))
            u[i] = eta * u[i] + (1 - eta) * y
    return u, f


@pytest.mark.parametrize("utility", ["contribution", "adaptable_contribution"])
def test_utility_and_running_mean_match_a_hand_computation(utility):
    model = _net([3])
    _set(model.body[1], W_IN, B_IN)
    _set(model.head, W_OUT, B_OUT)
    ctx = _ctx(model)
    eta = 0.9
    method = _cbp(model, ctx, decay=eta, maturity=1000, utility=utility)
    for x in BATCHES:
        _step(method, model, ctx, torch.tensor(x))
    u, f = _hand_run(utility, eta)
    stats = method.stats["body.1"]
    torch.testing.assert_close(stats["utility"], torch.tensor(u))
    torch.testing.assert_close(stats["mean"], torch.tensor(f))
    assert stats["age"].tolist() == [2, 2, 2]
    assert u[1] != u[2]  # the hand example tells units apart


def test_a_registered_utility_is_called_with_the_layer_and_decides_who_goes():
    calls = []

    def last_unit_useless(h, w_in, w_out, mean_hat, generator):
        calls.append((h.shape, w_in.shape, w_out.shape, mean_hat.shape))
        return torch.arange(h.shape[1], 0, -1, dtype=h.dtype)  # (n,) the last unit lowest

    register_utility("test_last_unit_useless", last_unit_useless, "test only")
    try:
        model = _net([5])
        ctx = _ctx(model)
        method = _cbp(model, ctx, utility="test_last_unit_useless", maturity=0,
                      replacement_rate=0.2)
        replaced = _step(method, model, ctx, torch.randn(7, 2))
        assert replaced["body.1"].tolist() == [4]
        assert calls == [((7, 5), (5, 2), (2, 5), (5,))]
        with pytest.raises(ConfigError, match="test_last_unit_useless"):
            parse_method("continual_backprop", {"utility": "nope"}, "methods[0]")
    finally:
        UNIT_UTILITIES._entries.pop("test_last_unit_useless")


# ----------------------------------------------------------------------------- replacement


def _active_net(width_1=8, width_2=6, inputs=50):
    """Two hidden layers whose units are all active on inputs in [0, 1]."""
    model = _net([width_1, width_2], inputs=inputs, outputs=3)
    with torch.no_grad():
        for linear in (model.body[1], model.body[3]):
            linear.weight.uniform_(0.0, 0.1)
            linear.bias.fill_(1.0)
    return model


def test_replaced_units_get_fresh_input_weights_zero_bias_and_zero_outgoing_weights():
    model = _active_net()
    first, second, head = model.body[1], model.body[3], model.head
    with torch.no_grad():  # units 3 and 5 of layer 1 and unit 2 of layer 2 barely matter
        second.weight[:, [3, 5]] = 1e-4
        head.weight[:, 2] = 1e-4
    before = copy.deepcopy(model)
    ctx = _ctx(model)
    method = _cbp(model, ctx, maturity=0, replacement_rate=0.25)  # 8 * 0.25 = 2, 6 * 0.25 = 1.5
    replaced = _step(method, model, ctx, torch.rand(16, 50))
    assert sorted(replaced["body.1"].tolist()) == [3, 5]
    assert replaced["body.3"].tolist() == [2]
    # `second` is both layer 1's outgoing matrix (columns 3, 5 now 0) and layer 2's input
    # matrix (row 2 now fresh): compare each part only where the other layer left it alone
    for linear, old_linear, out, old_out, units, new_out_rows, zero_in_cols in (
            (first, before.body[1], second, before.body[3], [3, 5], [2], []),
            (second, before.body[3], head, before.head, [2], [], [3, 5])):
        others = [i for i in range(linear.out_features) if i not in units]
        kept_rows = [k for k in range(out.out_features) if k not in new_out_rows]
        kept_cols = [j for j in range(linear.in_features) if j not in zero_in_cols]
        bound = math.sqrt(1 / linear.in_features)  # nn.Linear's own init (default)
        new_rows = linear.weight[units][:, kept_cols]
        assert (new_rows != old_linear.weight[units][:, kept_cols]).all()
        assert new_rows.abs().max() <= bound and new_rows.abs().max() > 0.5 * bound
        assert (linear.bias[units] == 0).all()
        assert torch.equal(out.weight[:, units], torch.zeros(out.out_features, len(units)))
        kept = (others, kept_cols)
        assert torch.equal(linear.weight[kept[0]][:, kept[1]], old_linear.weight[kept[0]][:, kept[1]])
        assert torch.equal(out.weight[kept_rows][:, others], old_out.weight[kept_rows][:, others])
    stats = method.stats["body.1"]
    assert stats["age"][[3, 5]].tolist() == [0, 0] and (stats["age"][[0, 1, 2]] == 1).all()
    assert (stats["utility"][[3, 5]] == 0).all() and (stats["mean"][[3, 5]] == 0).all()
    assert method.replaced == {"body.1": 2, "body.3": 1}
    assert method.pending["body.3"] == 0.5


def test_new_input_weights_follow_the_chosen_init_bound():
    model = _net([4], inputs=12, activation="tanh")
    (layer,) = hidden_layers(model, "test")
    assert layer.outgoing is model.head
    assert init_bound(layer, "kaiming") == pytest.approx(5 / 3 * math.sqrt(3 / 12))
    assert init_bound(layer, "lecun") == pytest.approx(math.sqrt(3 / 12))
    assert init_bound(layer, "xavier") == pytest.approx(5 / 3 * math.sqrt(6 / 16))
    assert init_bound(layer, "default") == pytest.approx(math.sqrt(1 / 12))
    ctx = _ctx(model)
    method = _cbp(model, ctx, maturity=0, replacement_rate=1.0, init="lecun")
    _step(method, model, ctx, torch.rand(3, 12))
    assert model.body[1].weight.abs().max() <= math.sqrt(3 / 12)


def _constant_unit_net():
    """Hidden unit 1 outputs the constant 0.7 (zero input row, bias 0.7) and matters least."""
    model = _net([3])
    _set(model.body[1], [[1.0, 1.0], [0.0, 0.0], [1.0, -1.0]], [2.0, 0.7, 2.0])
    _set(model.head, [[1.0, 0.05, -1.0], [2.0, -0.02, 1.0]], [0.3, -0.1])
    return model


def _replace_at_step_four(model, ctx, **params):
    """Steps 1-3: no unit is mature (m = 3). Step 4: one replacement (3 * 0.5 = 1.5).
    Returns (outputs on a probe batch just before, just after the replacement, replaced)."""
    method = _cbp(model, ctx, maturity=3, replacement_rate=0.5, **params)
    data = torch.rand(4, 5, 2, generator=torch.Generator().manual_seed(1))
    probe = torch.rand(9, 2, generator=torch.Generator().manual_seed(2))
    for x in data[:3]:
        assert _step(method, model, ctx, x)["body.1"].numel() == 0
    method.make_batch(None, ctx)
    model(data[3])  # the training forward of step 4, recorded
    with torch.no_grad():
        before = model(probe)
    method.after_step(None, ctx)
    with torch.no_grad():
        after = model(probe)
    return before, after, method.last_replaced["body.1"].tolist()


def test_the_bias_correction_leaves_the_output_unchanged_at_replacement():
    model = _constant_unit_net()
    old_row = model.body[1].weight[1].clone()
    before, after, replaced = _replace_at_step_four(model, _ctx(model))
    assert replaced == [1]
    assert not torch.equal(model.body[1].weight[1], old_row)  # the unit is new ...
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)  # ... the output is not
    # the head's bias absorbed the removed mean output 0.7 * W_head[:, 1]
    torch.testing.assert_close(model.head.bias, torch.tensor([0.3 + 0.7 * 0.05, -0.1 - 0.7 * 0.02]))


def test_without_the_bias_correction_the_output_would_change():
    """The negative control (LoP gnt.py's bug adds 0): the same replacement, mean_hat=None."""
    model = _constant_unit_net()
    (layer,) = hidden_layers(model, "test")
    probe = torch.rand(9, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(probe)
        reinitialise_units(layer, torch.tensor([1]), torch.ones(1, 2), mean_hat=None)
        after = model(probe)
    torch.testing.assert_close(after - before, -0.7 * torch.tensor([[0.05, -0.02]]).expand(9, 2))


def test_immature_units_are_never_replaced_even_when_least_useful():
    model = _net([4])
    with torch.no_grad():
        model.head.weight[:, [0, 1]] = 0.0  # units 0 and 1: utility 0, the lowest
    ctx = _ctx(model)
    method = _cbp(model, ctx, maturity=5, replacement_rate=1.0)
    state = method.state_dict()
    state["stats"]["body.1"]["age"] = torch.tensor([0, 4, 5, 9])  # after this step: 1, 5, 6, 10
    method.load_state_dict(state)
    replaced = _step(method, model, ctx, torch.randn(6, 2))
    assert sorted(replaced["body.1"].tolist()) == [2, 3]


def test_over_many_steps_every_replaced_unit_was_mature():
    model = _net([6, 5])
    ctx = _ctx(model)
    method = _cbp(model, ctx, maturity=4, replacement_rate=0.3)
    total = 0
    for _ in range(60):
        ages = {name: s["age"].clone() + 1 for name, s in method.stats.items()}
        replaced = _step(method, model, ctx, torch.randn(8, 2, generator=ctx.generator))
        for name, units in replaced.items():
            assert (ages[name][units] > 4).all()
            total += len(units)
    assert total > 20  # it did replace


def _oracle_counts(width, maturity, rate, steps):
    """Replacements per step from ages alone: which eligible units go does not change the
    count of eligible units later (they are all mature; the replaced ones restart at 0)."""
    ages, pending, counts = [0] * width, 0.0, []
    for _ in range(steps):
        ages = [a + 1 for a in ages]
        eligible = [i for i, a in enumerate(ages) if a > maturity]
        k = 0
        if eligible:
            pending += rate * len(eligible)
            k = int(pending)
            pending -= k
            for i in eligible[:k]:
                ages[i] = 0
        counts.append(k)
    return counts


@pytest.mark.parametrize("width,maturity,rate", [(8, 0, 1 / 32), (4, 3, 0.375), (10, 7, 0.05)])
def test_the_replacement_count_matches_rate_times_eligible(width, maturity, rate):
    model = _net([width])
    ctx = _ctx(model)
    method = _cbp(model, ctx, maturity=maturity, replacement_rate=rate, utility="random")
    steps = 100
    counts, mirrored = [], []
    for _ in range(steps):
        counts.append(len(_step(method, model, ctx, torch.randn(4, 2))["body.1"]))
        mirror = method.young["body.1"]
        eligible = int((method.stats["body.1"]["age"] > maturity).sum())
        mirrored.append(mirror.units - mirror.young == eligible)
    assert counts == _oracle_counts(width, maturity, rate, steps)
    assert all(mirrored)  # the host-side eligible count agrees with the ages
    if maturity == 0:  # all 8 always eligible: 8/32 = 1/4 per step, one unit every 4th step
        assert counts == [1 if t % 4 == 3 else 0 for t in range(steps)] and sum(counts) == 25


# ----------------------------------------------------------------------------- wiring


def test_only_the_training_forward_is_recorded_not_copies_or_later_passes():
    model = _net([3])
    ctx = _ctx(model)
    method = _cbp(model, ctx)
    twin = copy.deepcopy(model)  # e.g. LwF's previous model: it carries the hook along
    x, other = torch.randn(5, 2), torch.randn(7, 2)
    method.make_batch(None, ctx)
    twin(other)
    model(x)
    model(other)  # e.g. A-GEM's memory gradient after the training forward
    recorded = method.recorder.take("body.1")
    assert torch.equal(recorded, torch.relu(model.body[1](x)).detach())


def test_cnn_bodies_are_refused_with_a_config_error():
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="cnn", channels=[4]), (1, 8, 8), 1, 2)
    with pytest.raises(ConfigError, match="mlp"):
        ContinualBackprop().prepare_model(model, _ctx(model))


def test_decay_one_is_refused():
    with pytest.raises(ConfigError, match="below 1"):
        parse_method("continual_backprop", {"decay": 1.0}, "methods[0]")


def test_state_resumes_a_run_exactly_through_the_runner():
    """Two tasks in one go == task 1, checkpoint (weights-only), fresh objects, task 2."""
    import io

    from engram.data import DATASETS, build_stream
    from engram.training import train_task
    from tests.conftest import tiny_config

    cfg = tiny_config(model={"kind": "mlp", "hidden": [16, 16]})
    source = DATASETS.get(cfg.data.source)(None)
    stream = build_stream(source, cfg.data, cfg.stream, 0)
    params = ContinualBackprop.Params(maturity=2, replacement_rate=0.05)

    def fresh():
        torch.manual_seed(0)
        model = build_model(cfg.model, stream.input_shape, stream.n_heads, stream.head_dim)
        ctx = Context(model=model, stream=stream, train_cfg=cfg.train,
                      generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
        method = ContinualBackprop(params)
        ctx.model = method.prepare_model(model, ctx)
        return ctx, method

    def task(ctx, method, index):
        ctx.task = stream.tasks[index]
        ctx.seen_tasks.append(ctx.task)
        train_task(ctx, method, lambda epoch, loss: None)

    ctx, method = fresh()
    task(ctx, method, 0)
    buffer = io.BytesIO()
    torch.save({"model": ctx.model.state_dict(), "method": method.state_dict(),
                "generator": ctx.generator.get_state(), "step": ctx.step}, buffer)
    task(ctx, method, 1)
    assert sum(method.replaced.values()) > 0

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    ctx2, method2 = fresh()
    ctx2.model.load_state_dict(saved["model"])
    method2.load_state_dict(saved["method"])
    ctx2.generator.set_state(saved["generator"])
    ctx2.step = saved["step"]
    ctx2.seen_tasks = [stream.tasks[0]]
    task(ctx2, method2, 1)
    for a, b in zip(ctx.model.parameters(), ctx2.model.parameters()):
        assert torch.equal(a, b)
    assert method.replaced == method2.replaced


def test_residual_blocks_are_hidden_layers_whose_skip_is_the_outgoing_identity():
    """On the sliding-window network a unit is a block's activation output; its outgoing
    'weights' are the identity skip, so contribution utility is mean |h|, and a replacement
    resets only the unit's input row and bias (init: zeros gives a zero row)."""
    from engram.models.residual import ResidualNet

    torch.manual_seed(0)
    model = ResidualNet(width=4, out_dim=2, depth=2, activation="atan", init="default")
    layers = hidden_layers(model, "continual_backprop")
    assert [layer.name for layer in layers] == ["blocks.0.linear", "blocks.1.linear"]
    assert all(layer.outgoing is None for layer in layers)
    assert torch.equal(layers[0].outgoing_weight(), torch.eye(4))
    ctx = _ctx(model)
    method = _cbp(model, ctx, replacement_rate=0.0, maturity=0, decay=0.5)
    x = torch.randn(3, 4)
    with torch.no_grad():
        h0 = torch.atan(model.blocks[0].linear(x))  # (3, 4): block 0's units
    _step(method, model, ctx, x)
    # u = (1 - eta) * mean_B |h| * sum_k |I[k, i]| = 0.5 * mean_B |h|
    torch.testing.assert_close(method.stats["blocks.0.linear"]["utility"],
                               0.5 * h0.abs().mean(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reinitialise_units(layers[1], torch.tensor([2]), torch.zeros(1, 4),
                       method.stats["blocks.1.linear"]["mean"])
    after = model.state_dict()
    assert torch.equal(after["blocks.1.linear.weight"][2], torch.zeros(4))
    assert after["blocks.1.linear.bias"][2] == 0
    for key in before:  # nothing else moved: no outgoing weights, no next bias
        if key.startswith("blocks.1.linear"):
            keep = torch.ones_like(before[key], dtype=torch.bool)
            keep[2] = False
            assert torch.equal(after[key][keep], before[key][keep])
        else:
            assert torch.equal(after[key], before[key]), key


def test_zeros_init_draws_zero_rows():
    from engram.methods.continual_backprop import draw_input_rows

    layer = hidden_layers(_net([3]), "continual_backprop")[0]
    rows = draw_input_rows(layer, 2, "zeros", torch.Generator())
    assert torch.equal(rows, torch.zeros(2, 2))


def test_by_default_reset_rows_are_drawn_like_a_fresh_layer():
    """The default `init` redraws a unit's input row from the network's own initial
    distribution, nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)), not kaiming's relu-gain one
    (2.45x wider): over 10,000 draws the spread matches a freshly constructed layer's."""
    model = _net([200], inputs=50)
    ctx = _ctx(model)
    method = _cbp(model, ctx, maturity=0, replacement_rate=1.0)  # every unit, first step
    replaced = _step(method, model, ctx, torch.rand(8, 50))
    assert len(replaced["body.1"]) == 200
    fresh = torch.nn.Linear(50, 200).weight.detach()
    reset = model.body[1].weight.detach()
    assert reset.std().item() == pytest.approx(fresh.std().item(), rel=0.03)
    assert reset.abs().max() <= 1 / math.sqrt(50)
    assert (model.body[1].bias == 0).all()  # new biases are 0, as LoP and ReDo's code
