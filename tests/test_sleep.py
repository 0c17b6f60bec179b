"""Sleep Replay Consolidation: sig, one hand-checked time step, an oracle transcribed from the
authors' MATLAB loop, the input spike statistics, the window mask, the scale factors, and the
method's memory (running mean image) and refusals."""

from __future__ import annotations

import math

import pytest
import torch

from engram.config import ModelConfig
from engram.errors import ConfigError
from engram.methods.sleep import (
    Sleep, SleepParams, hebbian_update_, input_spike_probability, input_spikes, layer_values,
    masked_inputs, scale_factors, sig, sleep, sleep_step)
from engram.models import build_model
from tests.conftest import tiny_config
from tests.test_methods import _context

INC, DEC = 0.03, 0.004


def test_sig_on_hand_made_numbers():
    w = torch.tensor([0.0, 0.001, -0.001, 0.002, 1.0, -1.0, 100.0])
    expected = torch.tensor([1.0, 2 / (1 + math.e), 2 / (1 + 1 / math.e), 2 / (1 + math.e ** 2),
                             0.0, 2.0, 0.0])
    torch.testing.assert_close(sig(w), expected)
    # the code's form 2 (1 - 1 / (1 + exp(-w / 0.001))) is the same function
    code_form = 2 * (1 - 1 / (1 + torch.exp(-w[:4] / 0.001)))
    torch.testing.assert_close(sig(w[:4]), code_form)
    assert torch.isfinite(sig(torch.tensor([1e4, -1e4]))).all()  # overflow gives 0 and 2, no NaN
    torch.testing.assert_close(sig(torch.tensor([0.01]), width=0.01),
                               torch.tensor([2 / (1 + math.e)]))


def test_hebbian_update_by_hand():
    weight = torch.tensor([[0.0, -0.001, 0.5],
                           [0.0, 0.0, 0.0]])
    before = weight.clone()
    hebbian_update_(weight, pre=torch.tensor([True, False, True]), post=torch.tensor([True, False]),
                    inc=INC, dec=DEC)
    s = 2 / (1 + 1 / math.e)  # sig(-0.001)
    expected_row = torch.tensor([0.0 + INC * 1.0,        # both spiked, sig(0) = 1: up by inc
                                 -0.001 - DEC * s,       # pre silent: down by dec sig(w)
                                 0.5])                   # both spiked but sig(0.5) = 0: unchanged
    torch.testing.assert_close(weight[0], expected_row)
    assert torch.equal(weight[1], before[1])  # post silent: row untouched


def _hand_network():
    # 3 inputs -> 2 hidden -> 2 outputs
    w1 = torch.tensor([[0.0, -0.001, 1.1],     # hidden 0: input 0.0 + 1.1 = 1.1 >= 1: fires
                       [0.001, 0.0, 0.2]])     # hidden 1: 0.001 + 0.2 + decayed 0.4 < 1: silent
    w2 = torch.tensor([[2.0, -0.002],          # output 0: 2.0 from hidden 0 >= 1.5: fires
                       [0.5, 3.0]])            # output 1: 0.5 < 1.5 (hidden 1 silent): silent
    return [w1, w2]


def test_one_time_step_of_a_two_layer_net_by_hand():
    weights = _hand_network()
    w1, w2 = (w.clone() for w in weights)
    potentials = [torch.tensor([0.0, 0.8]), torch.tensor([0.2, 0.0])]
    fired = sleep_step(weights, potentials, torch.tensor([True, False, True]), alphas=[1.0, 1.0],
                       thresholds=[1.0, 1.5], decay=0.5, inc=INC, dec=DEC)
    assert [f.tolist() for f in fired] == [[0], [0]]
    # hidden 0 fired with inputs 0 and 2 on: w 0.0 -> +inc, w -0.001 (silent) -> -dec sig, 1.1 stays
    torch.testing.assert_close(weights[0][0], torch.tensor(
        [INC * 1.0, -0.001 - DEC * 2 / (1 + 1 / math.e), 1.1]))
    assert torch.equal(weights[0][1], w1[1])  # hidden 1 silent: unchanged, bit for bit
    # output 0 fired with hidden 0 on (same step) and hidden 1 off: 2.0 stays, -0.002 goes down
    torch.testing.assert_close(weights[1][0],
                               torch.tensor([2.0, -0.002 - DEC * 2 / (1 + math.e ** -2)]))
    assert torch.equal(weights[1][1], w2[1])
    # potentials: fired -> 0; silent -> decay v + alpha W s
    torch.testing.assert_close(potentials[0], torch.tensor([0.0, 0.5 * 0.8 + 0.001 + 0.2]))
    torch.testing.assert_close(potentials[1], torch.tensor([0.0, 0.5]))  # 0.5 * 0 + 0.5 * 1


def test_a_layer_without_input_only_decays():
    weights = _hand_network()
    before = [w.clone() for w in weights]
    potentials = [torch.tensor([0.3, 0.8]), torch.tensor([0.2, 1.4])]
    fired = sleep_step(weights, potentials, torch.zeros(3, dtype=torch.bool), [1.0, 1.0],
                       [1.0, 1.5], decay=0.5, inc=INC, dec=DEC)
    assert all(len(f) == 0 for f in fired)
    assert all(torch.equal(a, b) for a, b in zip(weights, before))
    torch.testing.assert_close(potentials[0], torch.tensor([0.15, 0.4]))
    torch.testing.assert_close(potentials[1], torch.tensor([0.1, 0.7]))


def _matlab_loop_step(weights, potentials, spikes, alphas, thresholds, decay, inc, dec):
    """The authors' sleepnn_old.m inner loop, one neuron and one synapse at a time."""
    pre = spikes.tolist()
    for weight, v, alpha, theta in zip(weights, potentials, alphas, thresholds):
        n_out, n_in = weight.shape
        for i in range(n_out):
            v[i] = decay * v[i] + alpha * sum(float(weight[i, j]) for j in range(n_in) if pre[j])
        post = [bool(v[i] >= theta) for i in range(n_out)]
        for i in range(n_out):
            if post[i]:
                for j in range(n_in):
                    w = float(weight[i, j])
                    s = 2 * (1 - 1 / (1 + math.exp(min(-w / 0.001, 700))))
                    weight[i, j] = w + inc * s if pre[j] else w - dec * s
        for i in range(n_out):
            if post[i]:
                v[i] = 0.0
        pre = post


def test_many_steps_agree_with_the_code_transcribed_as_loops():
    g = torch.Generator().manual_seed(1)
    sizes = [12, 9, 7, 4]
    weights = [0.01 * torch.randn(b, a, generator=g, dtype=torch.float64)
               for a, b in zip(sizes, sizes[1:])]
    reference = [w.clone() for w in weights]
    potentials = [torch.zeros(n, dtype=torch.float64) for n in sizes[1:]]
    ref_potentials = [[0.0] * n for n in sizes[1:]]
    alphas, thresholds = [30.0, 20.0, 20.0], [0.2, 0.1, 0.1]
    total = 0
    for _ in range(60):
        spikes = torch.rand(sizes[0], generator=g) < 0.3
        fired = sleep_step(weights, potentials, spikes, alphas, thresholds, 0.9, 0.05, 0.01)
        _matlab_loop_step(reference, ref_potentials, spikes, alphas, thresholds, 0.9, 0.05, 0.01)
        total += sum(len(f) for f in fired)
    assert total > 50  # the network did fire, so the plasticity was exercised
    for w, r in zip(weights, reference):
        torch.testing.assert_close(w, r, rtol=1e-9, atol=1e-12)
        assert not torch.equal(w, 0 * w)
    for v, r in zip(potentials, ref_potentials):
        torch.testing.assert_close(v, torch.tensor(r, dtype=torch.float64), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("max_rate", [239.515363, 1000.0])
def test_input_spike_probability_matches_the_formula(max_rate):
    x = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    p = input_spike_probability(x, 0.001, max_rate)
    torch.testing.assert_close(p, torch.clamp(2 * 0.001 * max_rate * x, max=1.0))
    n = 20000
    spikes = input_spikes(x.expand(n, -1), 0.001, max_rate, torch.Generator().manual_seed(0))
    rate = spikes.float().mean(dim=0)
    bound = 4 * torch.sqrt(p * (1 - p) / n) + 1e-9  # 4 standard errors
    assert ((rate - p).abs() <= bound).all(), (rate, p)
    assert spikes[:, 0].sum() == 0  # a zero pixel never fires


@pytest.mark.parametrize("side,fraction,window", [(8, 11 / 28, 3), (28, 11 / 28, 11)])
def test_masked_inputs_keep_one_random_square_window(side, fraction, window):
    image = torch.rand(2, side, side) + 0.5  # two channels, no zero pixel
    masked = masked_inputs(image, 3000, fraction, torch.Generator().manual_seed(0))
    masked = masked.view(3000, 2, side, side)
    kept = masked != 0
    assert torch.equal(kept[:, 0], kept[:, 1])  # the same window on every channel
    assert (kept[:, 0].sum(dim=(1, 2)) == window * window).all()
    assert torch.equal(masked[kept], image.expand(3000, -1, -1, -1)[kept])  # values untouched
    rows = kept[:, 0].any(dim=2).float().argmax(dim=1)  # top row of each window
    cols = kept[:, 0].any(dim=1).float().argmax(dim=1)
    positions = side - window + 1  # every start position inside the image, uniformly
    assert set(rows.tolist()) == set(range(positions)) == set(cols.tolist())
    whole = masked_inputs(image, 2, 1.0, torch.Generator())
    assert torch.equal(whole, image.reshape(1, -1).expand(2, -1))


def test_scale_factors_follow_the_codes_recursion():
    w1, b1 = torch.tensor([[1.0, -2.0], [0.5, 0.5]]), torch.tensor([0.0, 1.0])
    w2, b2 = torch.tensor([[3.0, 0.0]]), torch.tensor([-1.0])
    w3, b3 = torch.tensor([[0.5]]), torch.tensor([0.0])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # a1 = relu(x w1^T + b1) = [[1, 1.5], [0, 1.5]], max 1.5; max w1 1 -> s1 = 1.5
    # a2 = relu(a1 w2^T + b2) = [[2], [0]], max 2; max w2 3 -> s2 = 3
    # a3 = relu(a2 w3^T + b3) = [[1], [0]], max 1; max w3 0.5 -> s3 = 1
    # lambda1 = 1.5, lambda2 = s2 / lambda1 = 2, lambda3 = s3 / lambda2 = 0.5 (the code divides
    # by the previous lambda, not by s2, which would give 1/3); alpha = 10 / lambda
    alphas = scale_factors([(w1, b1), (w2, b2), (w3, b3)], x, alpha_scale=10.0)
    assert alphas == pytest.approx([10 / 1.5, 10 / 2, 10 / 0.5])


def test_betas_map_onto_any_depth():
    betas = [1.0, 2.0, 3.0]
    assert layer_values(betas, 3) == betas
    assert layer_values(betas, 2) == [1.0, 3.0]
    assert layer_values(betas, 4) == [1.0, 2.0, 2.0, 3.0]
    assert layer_values(betas, 1) == [3.0]
    assert layer_values([5.0], 3) == [5.0, 5.0, 5.0]


def _firing_weights():
    g = torch.Generator().manual_seed(0)
    return [0.02 * torch.randn(16, 64, generator=g), 0.02 * torch.randn(5, 16, generator=g)]


def test_sleep_without_plasticity_leaves_weights_bit_identical():
    weights = _firing_weights()
    before = [w.clone() for w in weights]
    params = SleepParams(inc=0.0, dec=0.0)
    counts = sleep(weights, torch.rand(1, 8, 8), 500, [30.0, 30.0], [0.5, 0.5], params,
                   torch.Generator().manual_seed(0))
    assert counts[0] > 0 and counts[1] > 0  # neurons fired: the update ran with zero steps
    assert all(torch.equal(a, b) for a, b in zip(weights, before))


def test_sleep_changes_weights_and_is_reproducible():
    results = []
    for _ in range(2):
        weights = _firing_weights()
        counts = sleep(weights, torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(3)),
                       500, [30.0, 30.0], [0.5, 0.5], SleepParams(),
                       torch.Generator().manual_seed(0))
        results.append((weights, counts))
    (first, counts), (second, _) = results
    assert counts[0] > 0 and counts[1] > 0
    assert all(not torch.equal(a, b) for a, b in zip(first, _firing_weights()))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def _after_tasks(n_tasks, **params):
    ctx = _context(tiny_config())
    method = Sleep(SleepParams(sleep_steps=300, sleep_steps_growth=100, **params))
    method.prepare_model(ctx.model, ctx)
    for task in ctx.stream.tasks[:n_tasks]:
        ctx.task = task
        ctx.seen_tasks.append(task)
        method.before_task(ctx)
        method.after_task(ctx)
    return ctx, method


def test_method_sleeps_on_weights_only_and_keeps_the_mean_image_of_all_seen_tasks():
    ctx = _context(tiny_config())
    method = Sleep(SleepParams(sleep_steps=300, sleep_steps_growth=100, alpha_scale=500.0))
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    for task in ctx.stream.tasks[:2]:
        ctx.task = task
        ctx.seen_tasks.append(task)
        method.after_task(ctx)
    after = ctx.model.state_dict()
    assert sum(method.last_spike_counts) > 0
    for name in before:
        assert torch.equal(before[name], after[name]) == name.endswith("bias"), name
    seen = torch.cat([t.train.x for t in ctx.stream.tasks[:2]])
    torch.testing.assert_close(method.mean_image, seen.mean(dim=0))
    assert int(method.count) == len(seen)
    d_in = seen[0].numel()
    assert method.extra_bytes() == 4 * d_in + 8
    assert method.sleep_length(0) == 300 and method.sleep_length(2) == 500


def test_state_round_trip_gives_the_same_next_sleep():
    ctx, method = _after_tasks(1)
    restored = Sleep(method.params)
    restored.load_state_dict(method.state_dict())
    task = ctx.stream.tasks[1]
    ctx.task = task
    model_state = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    rng = ctx.generator.get_state()
    method.after_task(ctx)
    first = [p.clone() for p in ctx.model.parameters()]
    ctx.model.load_state_dict(model_state)
    ctx.generator.set_state(rng)
    restored.after_task(ctx)
    assert all(torch.equal(a, b) for a, b in zip(first, ctx.model.parameters()))


@pytest.mark.parametrize("model", [{"kind": "cnn", "channels": [4]},
                                   {"kind": "mlp", "hidden": [8], "activation": "tanh"}])
def test_refuses_models_that_are_not_relu_mlps(model):
    ctx = _context(tiny_config())
    net = build_model(ModelConfig(**model), ctx.stream.input_shape, 1, 6)
    with pytest.raises(ConfigError, match="mlp"):
        Sleep().prepare_model(net, ctx)
    ctx.model = net
    with pytest.raises(ConfigError, match="relu"):
        Sleep().before_task(ctx)


def test_thresholds_must_be_positive():
    import pytest

    from engram.errors import ConfigError
    from engram.methods.sleep import Sleep, SleepParams, layer_values
    from tests.conftest import tiny_config
    from tests.test_methods import _context

    with pytest.raises(ConfigError, match="every beta must be > 0"):
        layer_values([1.0, 0.0, 2.0], 3)
    ctx = _context(tiny_config())
    with pytest.raises(ConfigError, match="threshold must be > 0"):
        Sleep(SleepParams(threshold=0.0)).prepare_model(ctx.model, ctx)
