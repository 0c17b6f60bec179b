"""Importance measures against obviously-correct computations, and purity for every measure.

Oracles: plain autograd loops per example or per batch on tiny float64 models (nothing
shared with the torch.func code), literal numbers for a hand-simulated 3-step trajectory,
and explicit loops over examples, units and outgoing weights for the CBP utility.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engram.config import ModelConfig, TrainConfig
from engram.data.streams import Task, TensorSet
from engram.importance.measures import (MEASURES, SI_DAMPING, Trajectory,
                                        profiled_parameters)
from engram.experiments.profile import TrajectoryRecorder
from engram.methods.base import Context, Method
from engram.methods.si import SI
from engram.models import build_model
from engram.training import train_task

SPEC_NAMES = ["random", "magnitude", "inverse_magnitude", "fisher_exact", "fisher_sample",
              "fisher_empirical", "fisher_batch", "mas", "si", "taylor", "snip", "weight_change",
              "sign_flips", "direction_flips", "cbp_utility"]
TRAJECTORY_NAMES = {"si", "weight_change", "sign_flips", "direction_flips"}
N_CLASSES = 3


def make_net(kind: str, seed: int = 0, **cfg) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(kind=kind, **cfg), (1, 8, 8), n_heads=1, head_dim=N_CLASSES).double()


def make_batches(sizes=(5, 5, 3), seed: int = 1, shape=(1, 8, 8)) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g, dtype=torch.float64),
             torch.randint(N_CLASSES, (n,), generator=g)) for n in sizes]


def call(name, model, batches, trajectory=None, seed=0):
    return MEASURES.get(name)(model, batches, F.cross_entropy, trajectory=trajectory,
                              generator=torch.Generator().manual_seed(seed))


def record(model: nn.Module, batches, steps: int = 3, lr: float = 0.1) -> Trajectory:
    """A few SGD steps in the runner's hook order with a recorder; the model keeps the result."""
    recorder = TrajectoryRecorder()
    ctx = Context(model=model, stream=None, train_cfg=None, generator=torch.Generator(),
                  device=torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    recorder.before_task(ctx)
    for t in range(steps):
        x, y = batches[t % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        recorder.after_backward(ctx)
        optimizer.step()
        recorder.after_step(None, ctx)
    return recorder.trajectory()


# ----------------------------------------------------------------------------------------------
# The registry, shapes and purity of every measure


def test_registry_holds_exactly_the_specified_measures():
    assert sorted(MEASURES.names()) == sorted(SPEC_NAMES)
    for entry in MEASURES.entries():
        assert entry.obj.needs_trajectory is (entry.name in TRAJECTORY_NAMES)
        assert entry.obj.__doc__ and "=" in entry.obj.__doc__  # a formula in the docstring


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_every_measure_is_pure_and_scores_every_linear_and_conv_parameter(name, kind):
    cfg = dict(hidden=[6, 5], dropout=0.5) if kind == "mlp" else dict(channels=[2, 3])
    model = make_net(kind, **cfg)
    batches = make_batches()
    trajectory = record(model, batches)
    # a state to preserve: some .grad set, one None; mixed train/eval modes
    params = dict(model.named_parameters())
    for i, p in enumerate(params.values()):
        p.grad = None if i == 0 else torch.randn_like(p)
    model.train()
    model.head.eval()
    weights = {n: p.detach().clone() for n, p in params.items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}
    modes = {n: m.training for n, m in model.named_modules()}

    scores = call(name, model, batches, trajectory)

    expected = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                for n in (f"{n}.weight", f"{n}.bias")]
    assert list(scores) == expected == list(profiled_parameters(model))
    assert any(".weight" in n and params[n].dim() == 4 for n in expected) == (kind == "cnn")
    for n, score in scores.items():
        assert score.shape == params[n].shape and score.dtype == params[n].dtype
        assert torch.isfinite(score).all() and (score >= 0).all()
        assert score.data_ptr() != params[n].data_ptr()
    for n, p in params.items():
        assert torch.equal(p, weights[n]), n
        assert (p.grad is None) == (grads[n] is None) and (p.grad is None or torch.equal(p.grad, grads[n]))
    assert {n: m.training for n, m in model.named_modules()} == modes
    for m in model.modules():  # cbp_utility's hooks are gone
        assert not m._forward_hooks and not m._forward_pre_hooks


@pytest.mark.parametrize("name", sorted(TRAJECTORY_NAMES))
def test_trajectory_measures_need_a_trajectory(name):
    with pytest.raises(ValueError, match="TrajectoryRecorder"):
        call(name, make_net("mlp", hidden=[4]), make_batches())


# ----------------------------------------------------------------------------------------------
# Weight-only measures


def test_random_is_reproducible_from_the_generator_and_differs_across_seeds():
    model, batches = make_net("mlp", hidden=[6]), make_batches()
    a, b, c = call("random", model, batches, seed=3), call("random", model, batches, seed=3), \
        call("random", model, batches, seed=4)
    for n in a:
        assert torch.equal(a[n], b[n])
        assert not torch.equal(a[n], c[n])
        assert ((a[n] >= 0) & (a[n] < 1)).all()
    g = torch.Generator().manual_seed(3)
    first = MEASURES.get("random")(model, batches, F.cross_entropy, trajectory=None, generator=g)
    second = MEASURES.get("random")(model, batches, F.cross_entropy, trajectory=None, generator=g)
    assert all(torch.equal(first[n], a[n]) and not torch.equal(second[n], a[n]) for n in a)


def test_magnitude_is_abs_w_and_inverse_magnitude_orders_the_opposite_way():
    model, batches = make_net("cnn", channels=[2, 3]), make_batches()
    with torch.no_grad():
        model.head.bias[0] = 0.0  # inverse magnitude stays finite at w = 0
    mag, inv = call("magnitude", model, batches), call("inverse_magnitude", model, batches)
    for n, p in profiled_parameters(model).items():
        assert torch.equal(mag[n], p.detach().abs())
    mag_flat = torch.cat([mag[n].flatten() for n in mag])
    inv_flat = torch.cat([inv[n].flatten() for n in inv])
    assert torch.isfinite(inv_flat).all()
    order = torch.argsort(mag_flat)  # ascending magnitude
    rising, falling = torch.diff(mag_flat[order]), torch.diff(inv_flat[order])
    assert (falling[rising > 0] < 0).all() and (falling[rising == 0] == 0).all()
    assert (rising > 0).sum() > 100  # the check is not vacuous


# ----------------------------------------------------------------------------------------------
# Gradient measures against per-example / per-batch loops


def per_example_log_prob_grads(model, x):
    """[[d log p(c|x_i)/d theta for every parameter] for c in classes] per example, autograd."""
    params = list(model.parameters())
    out = []
    for i in range(len(x)):
        log_p = F.log_softmax(model(x[i:i + 1]), dim=-1)[0]
        out.append((log_p.detach().exp(),
                    [torch.autograd.grad(log_p[c], params, retain_graph=True) for c in range(len(log_p))]))
    return out


@pytest.fixture
def fisher_setup():
    model = make_net("mlp", hidden=[5, 4], activation="tanh", dropout=0.5)
    batches = make_batches(sizes=(4, 4, 4))
    oracle_model = copy.deepcopy(model).eval()
    x = torch.cat([xb for xb, _ in batches])
    y = torch.cat([yb for _, yb in batches])
    return model, batches, oracle_model, x, y


def test_fisher_exact_empirical_and_sample_match_a_per_example_loop(fisher_setup):
    model, batches, oracle_model, x, y = fisher_setup
    names = [n for n, _ in oracle_model.named_parameters()]
    per_example = per_example_log_prob_grads(oracle_model, x)
    # the labels fisher_sample draws: one multinomial over all (few) examples, from the generator
    probs = torch.stack([p for p, _ in per_example])
    sampled = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0)).squeeze(1)
    for estimator in ["exact", "empirical", "sample"]:
        expected = {n: torch.zeros_like(p) for n, p in oracle_model.named_parameters()}
        for i, (p_i, grads) in enumerate(per_example):
            if estimator == "exact":
                terms = [(float(p_i[c]), grads[c]) for c in range(N_CLASSES)]
            else:
                terms = [(1.0, grads[int(y[i] if estimator == "empirical" else sampled[i])])]
            for weight, g in terms:
                for k, n in enumerate(names):
                    expected[n] += weight * g[k].pow(2) / len(x)
        got = call(f"fisher_{estimator}", model, batches, seed=0)
        for n in names:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-12)


def test_fisher_batch_squares_each_given_batch_mean_gradient(fisher_setup):
    model, batches, oracle_model, _, _ = fisher_setup
    expected = {n: torch.zeros_like(p) for n, p in oracle_model.named_parameters()}
    for xb, yb in batches:
        grads = torch.autograd.grad(F.cross_entropy(oracle_model(xb), yb), list(oracle_model.parameters()))
        for (n, _), g in zip(oracle_model.named_parameters(), grads):
            expected[n] += g.pow(2) / len(batches)
    got = call("fisher_batch", model, batches)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-12)


def test_mas_matches_a_per_example_loop(fisher_setup):
    model, batches, oracle_model, x, _ = fisher_setup
    expected = {n: torch.zeros_like(p) for n, p in oracle_model.named_parameters()}
    for i in range(len(x)):
        grads = torch.autograd.grad(oracle_model(x[i:i + 1]).pow(2).sum(), list(oracle_model.parameters()))
        for (n, _), g in zip(oracle_model.named_parameters(), grads):
            expected[n] += g.abs() / len(x)
    got = call("mas", model, batches)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-12)


def batch_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_taylor_is_the_mean_over_batches_of_squared_gradient_times_weight(fisher_setup):
    model, _, oracle_model, _, _ = fisher_setup
    batches = make_batches(sizes=(5, 2, 6))  # unequal batches: a mean over batches, not examples
    expected = {n: torch.zeros_like(p) for n, p in oracle_model.named_parameters()}
    for xb, yb in batches:
        g = batch_grads(oracle_model, xb, yb)
        for n, p in oracle_model.named_parameters():
            expected[n] += (g[n] * p.detach()).pow(2) / 3
    got = call("taylor", model, batches)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-14)


def test_snip_uses_one_batch_and_is_normalised_over_the_whole_model(fisher_setup):
    model, batches, oracle_model, _, _ = fisher_setup
    g = batch_grads(oracle_model, *batches[0])
    saliency = {n: (g[n] * p.detach()).abs() for n, p in oracle_model.named_parameters()}
    total = sum(s.sum() for s in saliency.values())
    got = call("snip", model, batches)
    for n in saliency:
        torch.testing.assert_close(got[n], saliency[n] / total, rtol=1e-9, atol=1e-14)
    assert math.isclose(float(sum(s.sum() for s in got.values())), 1.0, rel_tol=1e-12)
    other = call("snip", model, [batches[0]] + make_batches(seed=9))  # later batches unused
    assert all(torch.equal(other[n], got[n]) for n in got)


# ----------------------------------------------------------------------------------------------
# The trajectory recorder and the trajectory measures on a hand-simulated 3-step sequence

THETA = [[1.0, -0.5, 0.2], [0.5, 0.5, -0.1], [-0.5, 1.0, 0.1], [-1.0, 0.5, 0.1]]  # theta_0..theta_3
GRADS = [[1.0, -2.0, 0.5], [2.0, -1.0, 1.0], [1.0, 1.0, 0.0]]                    # g_1..g_3
# deltas d_t = theta_t - theta_{t-1}: [-.5, 1, -.3], [-1, .5, .2], [-.5, -.5, 0]
SI_PATH = [3.0, 3.0, -0.05]        # -sum_t g_t d_t: -(-.5-2-.5), -(-2-.5-.5), -(-.15+.2+0)
PATH_LENGTH = [2.0, 2.0, 0.5]      # sum_t |d_t|
SIGN_FLIPS = [1.0, 1.0, 2.0]       # .5*-.5; -.5*.5; .2*-.1 and -.1*.1
DIRECTION_FLIPS = [0.0, 1.0, 1.0]  # d3*d2 = -.25 (unit 1); d2*d1 = -.06 (unit 2); 0 is no flip


def hand_steps(recorder, ctx, layer, steps):
    for t in steps:
        layer.weight.grad = torch.tensor([GRADS[t - 1]], dtype=torch.float64)
        recorder.after_backward(ctx)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([THETA[t]], dtype=torch.float64))
        recorder.after_step(None, ctx)


def hand_recorded():
    layer = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([THETA[0]], dtype=torch.float64))
    ctx = Context(model=layer, stream=None, train_cfg=None, generator=torch.Generator(),
                  device=torch.device("cpu"))
    recorder = TrajectoryRecorder()
    recorder.before_task(ctx)
    return layer, ctx, recorder


def as_row(values):
    return torch.tensor([values], dtype=torch.float64)


def test_recorder_counts_a_hand_simulated_three_step_sequence():
    layer, ctx, recorder = hand_recorded()
    hand_steps(recorder, ctx, layer, [1, 2, 3])
    traj = recorder.trajectory()
    assert traj.steps == 3
    torch.testing.assert_close(traj.start["weight"], as_row(THETA[0]))  # a copy, not the live weight
    torch.testing.assert_close(traj.si_path["weight"], as_row(SI_PATH))
    torch.testing.assert_close(traj.path_length["weight"], as_row(PATH_LENGTH))
    torch.testing.assert_close(traj.sign_flips["weight"], as_row(SIGN_FLIPS))
    torch.testing.assert_close(traj.direction_flips["weight"], as_row(DIRECTION_FLIPS))

    omega = {name: call(name, layer, [], traj)["weight"] for name in sorted(TRAJECTORY_NAMES)}
    moved = [(THETA[3][i] - THETA[0][i]) ** 2 + SI_DAMPING for i in range(3)]
    torch.testing.assert_close(omega["si"], as_row([3.0 / moved[0], 3.0 / moved[1], 0.0]))  # relu
    torch.testing.assert_close(omega["weight_change"], as_row([1 / 3, 1 / 3, 2 / 3]))
    torch.testing.assert_close(omega["sign_flips"], as_row([1 / 2, 1 / 2, 1 / 3]))
    torch.testing.assert_close(omega["direction_flips"], as_row([1.0, 1 / 2, 1 / 2]))


def test_recorder_snapshots_are_copies_and_recording_accumulates_until_reset():
    layer, ctx, recorder = hand_recorded()
    hand_steps(recorder, ctx, layer, [1, 2])
    early = recorder.trajectory()
    recorder.before_task(ctx)  # a second train_task call continues the same trajectory
    hand_steps(recorder, ctx, layer, [3])
    assert early.steps == 2 and recorder.trajectory().steps == 3
    torch.testing.assert_close(early.path_length["weight"], as_row([1.5, 1.5, 0.5]))
    torch.testing.assert_close(recorder.trajectory().direction_flips["weight"], as_row(DIRECTION_FLIPS))
    recorder.reset(layer)
    fresh = recorder.trajectory()
    assert fresh.steps == 0 and torch.equal(fresh.start["weight"], as_row(THETA[3]))
    assert not fresh.path_length["weight"].any()
    with pytest.raises(ValueError, match="recorded nothing"):
        TrajectoryRecorder().trajectory()


def test_recorder_driven_by_train_task_matches_si_and_leaves_training_unchanged():
    g = torch.Generator().manual_seed(5)
    data = TensorSet(torch.randn(40, 1, 8, 8, generator=g, dtype=torch.float64),
                     torch.randint(N_CLASSES, (40,), generator=g), torch.zeros(40, dtype=torch.long))
    task = Task(index=0, name="t", classes=list(range(N_CLASSES)), train=data, val=None, test=data)
    train_cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1, momentum=0.5)
    finals = {}
    for method in [TrajectoryRecorder(), SI(), Method()]:
        model = make_net("mlp", hidden=[6])
        ctx = Context(model=model, stream=None, train_cfg=train_cfg,
                      generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), task=task)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        train_task(ctx, method, lambda epoch, loss: None)
        finals[type(method).__name__] = ({n: p.detach().clone() for n, p in model.named_parameters()}, method)
    (weights, recorder), (si_weights, si_method), (plain, _) = (
        finals["TrajectoryRecorder"], finals["SI"], finals["Method"])
    traj = recorder.trajectory()
    assert traj.steps == 2 * 3  # 2 epochs of ceil(40 / 16) batches
    for n in weights:
        assert torch.equal(weights[n], plain[n])  # recording does not change training
        torch.testing.assert_close(traj.start[n], start[n])
        torch.testing.assert_close(traj.si_path[n], si_method.path[n])
        assert (traj.path_length[n] >= (weights[n] - start[n]).abs() - 1e-12).all()  # triangle inequality
        assert (traj.direction_flips[n] <= traj.steps - 1).all() and (traj.sign_flips[n] <= traj.steps).all()
    assert sum(float(t.sum()) for t in traj.direction_flips.values()) > 0  # momentum overshoots somewhere


# ----------------------------------------------------------------------------------------------
# CBP contribution utility by hand


def test_cbp_utility_by_hand_on_a_tiny_mlp():
    """2 inputs -> 2 ReLU units -> 1 output, one example pair, numbers worked out below."""
    model = build_model(ModelConfig(kind="mlp", hidden=[2]), (1, 1, 2), 1, 1).double()
    hidden, head = model.body[1], model.head
    with torch.no_grad():
        hidden.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 1.0]]))
        hidden.bias.copy_(torch.tensor([0.0, -1.0]))
        head.weight.copy_(torch.tensor([[3.0, -0.5]]))
        head.bias.copy_(torch.tensor([1.0]))
    x = torch.tensor([[[[1.0, 1.0]]], [[[2.0, -1.0]]]], dtype=torch.float64)
    # example 1: pre = [3, -1] -> h = [3, 0], out = 9 + 1 = 10
    # example 2: pre = [0, -4] -> h = [0, 0], out = 1
    # unit 0: mean|h| = 1.5, outgoing |3| -> 4.5; unit 1: 0 * 0.5 = 0; output: mean|out| = 5.5
    u = call("cbp_utility", model, [(x, torch.zeros(2, dtype=torch.long))])
    expected_hidden = torch.tensor([[4.5, 4.5], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(u["body.1.weight"], expected_hidden)
    torch.testing.assert_close(u["body.1.bias"], torch.tensor([4.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(u["head.weight"], torch.tensor([[5.5, 5.5]], dtype=torch.float64))
    torch.testing.assert_close(u["head.bias"], torch.tensor([5.5], dtype=torch.float64))


def test_cbp_utility_on_a_cnn_matches_loops_over_units_positions_and_outgoing_weights():
    model = make_net("cnn", channels=[2, 3])  # conv(1->2) relu pool conv(2->3) relu pool flatten head
    batches = make_batches(sizes=(3, 2))
    conv1, conv2, head = model.body[0], model.body[3], model.head
    x = torch.cat([xb for xb, _ in batches])
    conv2_w, head_w = conv2.weight.detach(), head.weight.detach()
    with torch.no_grad():
        a1 = model.body[:3](x)          # (N, 2, 4, 4): what conv2 reads
        f = model.body(x)               # (N, 3 * 2 * 2): what the head reads
        out = model.head(f)             # (N, 3)
    n = len(x)
    u1 = torch.zeros(2, dtype=torch.float64)
    for i in range(2):
        out_sum = sum(abs(float(w)) for w in conv2_w[:, i].flatten())
        for e in range(n):
            u1[i] += sum(abs(float(v)) for v in a1[e, i].flatten()) * out_sum / n
    u2 = torch.zeros(3, dtype=torch.float64)
    for i in range(3):
        for j in range(4 * i, 4 * i + 4):  # channel i's 2x2 positions, flattened channel-major
            out_sum = sum(abs(float(w)) for w in head_w[:, j])
            for e in range(n):
                u2[i] += abs(float(f[e, j])) * out_sum / n
    u3 = out.abs().mean(dim=0)
    u = call("cbp_utility", model, batches)
    torch.testing.assert_close(u["body.0.bias"], u1)
    torch.testing.assert_close(u["body.0.weight"], u1.view(2, 1, 1, 1).expand(2, 1, 3, 3))
    torch.testing.assert_close(u["body.3.bias"], u2)
    torch.testing.assert_close(u["body.3.weight"], u2.view(3, 1, 1, 1).expand(3, 2, 3, 3))
    torch.testing.assert_close(u["head.bias"], u3)
    torch.testing.assert_close(u["head.weight"], u3.view(3, 1).expand(3, 12))
    assert conv1.weight.shape == (2, 1, 3, 3) and (u1 > 0).all() and (u2 > 0).all()
