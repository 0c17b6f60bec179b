"""Grouping, ranking, thresholding and stacked evaluation of the importance profiler.

Every grouping is checked on tiny hand-built layers whose right groups are written out by
hand (a unit is a *row* of a Linear weight (out, in) plus its bias, never a column); the
reducers against hand-computed numbers; the thresholds against a per-scope count of what
was actually replaced; evaluate_stacked against a plain loop that loads each parameter set
into a copy of the model.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engram.importance.aggregate as aggregate
from engram.importance.aggregate import (
    AGGREGATIONS,
    DIRECTIONS,
    SCOPES,
    Groups,
    evaluate_stacked,
    group_scores,
    make_groups,
    replacement_order,
    replacement_values,
    thresholded_parameters,
)
from engram.importance.measures import profiled_parameters
from engram.models import ContinualNet

THRESHOLDS = torch.linspace(0, 1, 21)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear_model() -> nn.Sequential:
    """Linear(3 -> 2), ReLU, Linear(2 -> 4): 8 + 12 + 2 + 4 parameters, two layers."""
    return nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 4))


def conv_model() -> nn.Sequential:
    """Conv2d(2 -> 3, 2x2) on 3x3 images, then Linear(3*2*2 -> 2)."""
    return nn.Sequential(nn.Conv2d(2, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float32 tensor, so equality means bit-identity (also for -0.0, NaN)."""
    return t.detach().contiguous().view(torch.int32)


# ----------------------------------------------------------------------------- groupings

def test_unit_groups_are_fan_in_rows_plus_bias():
    groups = make_groups(linear_model(), "unit")
    assert list(groups.index) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    # Layer 0: weight (2 out, 3 in): unit i is ROW i (its 3 fan-in weights) plus bias[i].
    assert groups.index["0.weight"].tolist() == [[0, 0, 0], [1, 1, 1]]
    assert groups.index["0.bias"].tolist() == [0, 1]
    # Layer 1: weight (4 out, 2 in); ids continue after layer 0's two units.
    assert groups.index["2.weight"].tolist() == [[2, 2], [3, 3], [4, 4], [5, 5]]
    assert groups.index["2.bias"].tolist() == [2, 3, 4, 5]
    assert groups.layer.tolist() == [0, 0, 1, 1, 1, 1]
    assert groups.size.tolist() == [4, 4, 3, 3, 3, 3]  # fan-in + bias
    # The HM bug grouped columns (an input unit's fan-out): column 0 here spans two groups.
    assert groups.index["0.weight"][:, 0].unique().numel() == 2


def test_unit_and_filter_of_a_conv_are_one_output_channels_kernel_plus_bias():
    model = conv_model()
    for aggregation in ("unit", "filter"):
        groups = make_groups(model, aggregation)
        w = groups.index["0.weight"]  # (3 out, 2 in, 2, 2)
        assert w.shape == (3, 2, 2, 2)
        for i in range(3):  # channel i's whole kernel (all input channels, all taps) is group i
            assert (w[i] == i).all()
        assert groups.index["0.bias"].tolist() == [0, 1, 2]
        assert groups.index["3.weight"].tolist() == [[3] * 12, [4] * 12]
        assert groups.index["3.bias"].tolist() == [3, 4]
        assert groups.layer.tolist() == [0, 0, 0, 1, 1]
        assert groups.size.tolist() == [2 * 2 * 2 + 1] * 3 + [13, 13]


def test_filter_equals_unit_on_linear_layers():
    unit, filt = make_groups(linear_model(), "unit"), make_groups(linear_model(), "filter")
    assert all(torch.equal(unit.index[n], filt.index[n]) for n in unit.index)
    assert torch.equal(unit.layer, filt.layer) and torch.equal(unit.size, filt.size)


def test_weight_groups_are_single_elements():
    groups = make_groups(linear_model(), "weight")
    assert groups.index["0.weight"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert groups.index["0.bias"].tolist() == [6, 7]
    assert groups.index["2.weight"].tolist() == [[8, 9], [10, 11], [12, 13], [14, 15]]
    assert groups.index["2.bias"].tolist() == [16, 17, 18, 19]
    assert groups.layer.tolist() == [0] * 8 + [1] * 12
    assert (groups.size == 1).all()


def test_layer_groups_are_whole_modules():
    groups = make_groups(conv_model(), "layer")
    assert (groups.index["0.weight"] == 0).all() and (groups.index["0.bias"] == 0).all()
    assert (groups.index["3.weight"] == 1).all() and (groups.index["3.bias"] == 1).all()
    assert groups.layer.tolist() == [0, 1]
    assert groups.size.tolist() == [24 + 3, 24 + 2]


def test_names_match_named_parameters_and_other_modules_are_skipped():
    body = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False), nn.LayerNorm(3), nn.ReLU())
    model = ContinualNet(body, 3, 1, 2)
    groups = make_groups(model, "unit")
    assert list(groups.index) == ["body.1.weight", "head.weight", "head.bias"]
    named = dict(model.named_parameters())
    for name, ids in groups.index.items():
        assert ids.shape == named[name].shape and ids.dtype == torch.long
    assert groups.size.tolist() == [4, 4, 4, 4, 4]  # no bias in body.1; head units 3 + 1
    assert list(groups.index) == list(profiled_parameters(model))  # the measures' parameters


def test_unknown_choices_are_rejected():
    model = linear_model()
    with pytest.raises(ValueError, match="aggregation"):
        make_groups(model, "column")
    groups = make_groups(model, "unit")
    imp = {n: p.abs() for n, p in params_of(model).items()}
    with pytest.raises(ValueError, match="reducer"):
        group_scores(imp, groups, "median")
    scores = group_scores(imp, groups, "mean")
    with pytest.raises(ValueError, match="scope"):
        replacement_order(scores, groups, "global", "least_first", gen())
    with pytest.raises(ValueError, match="direction"):
        replacement_order(scores, groups, "model", "upwards", gen())
    with pytest.raises(ValueError, match="NaN"):
        group_scores({**imp, "0.bias": torch.tensor([float("nan"), 1.0])}, groups, "mean")


# ----------------------------------------------------------------------------- reducers

def hand_importance() -> dict[str, torch.Tensor]:
    """Importance of linear_model() chosen so that rows and columns reduce differently."""
    return {
        "0.weight": torch.tensor([[1.0, 2.0, 9.0], [4.0, 0.5, 3.0]]),
        "0.bias": torch.tensor([8.0, -1.0]),
        "2.weight": torch.tensor([[1.0, 1.0], [2.0, 6.0], [0.0, 0.0], [5.0, 7.0]]),
        "2.bias": torch.tensor([1.0, 4.0, 3.0, -2.0]),
    }


@pytest.mark.parametrize("reducer, expected", [
    # unit i = row i of the weight plus bias[i]
    ("mean", [(1 + 2 + 9 + 8) / 4, (4 + 0.5 + 3 - 1) / 4, 1.0, 4.0, 1.0, 10 / 3]),
    ("min", [1.0, -1.0, 1.0, 2.0, 0.0, -2.0]),
    ("max", [9.0, 4.0, 1.0, 6.0, 3.0, 7.0]),
])
def test_unit_reducers_by_hand(reducer, expected):
    scores = group_scores(hand_importance(), make_groups(linear_model(), "unit"), reducer)
    assert scores.dtype == torch.float64
    assert scores.tolist() == pytest.approx(expected)


@pytest.mark.parametrize("reducer, expected", [
    ("mean", [(19.5 + 7) / 8, (22 + 6) / 12]),  # (weight sum + bias sum) / count
    ("min", [-1.0, -2.0]),
    ("max", [9.0, 7.0]),
])
def test_layer_reducers_by_hand(reducer, expected):
    scores = group_scores(hand_importance(), make_groups(linear_model(), "layer"), reducer)
    assert scores.tolist() == pytest.approx(expected)


def test_weight_reducers_are_the_identity():
    imp = hand_importance()
    flat = torch.cat([imp[n].reshape(-1) for n in imp]).double()
    for reducer in ("mean", "min", "max"):
        assert torch.equal(group_scores(imp, make_groups(linear_model(), "weight"), reducer), flat)


# ----------------------------------------------------------------------------- ordering

def test_order_least_and_most_first_model_and_layer_scope():
    groups = make_groups(linear_model(), "unit")  # 2 units in layer 0, 4 in layer 1
    scores = torch.tensor([5.0, 1.0, 4.0, 0.0, 3.0, 2.0], dtype=torch.float64)
    order = lambda scope, direction: replacement_order(scores, groups, scope, direction, gen())
    assert order("model", "least_first").tolist() == [5, 1, 4, 0, 3, 2]
    assert order("model", "most_first").tolist() == [0, 4, 1, 5, 2, 3]
    # Layer scope: ranks restart in every layer.
    assert order("layer", "least_first").tolist() == [1, 0, 3, 0, 2, 1]
    assert order("layer", "most_first").tolist() == [0, 1, 0, 3, 1, 2]


def test_ties_are_broken_uniformly_at_random_and_reproducibly():
    groups = make_groups(nn.Sequential(nn.Linear(2, 4)), "unit")  # 4 units
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    first = torch.zeros(4)
    for seed in range(400):
        order = replacement_order(scores, groups, "layer", "most_first", gen(seed))
        assert order[3] == 3  # the one strictly smallest score is always replaced last
        first[order.argmin()] += 1
        again = replacement_order(scores, groups, "layer", "most_first", gen(seed))
        assert torch.equal(order, again)  # the generator alone decides
    # Each tied unit is replaced first about a third of the time (binomial sd ~ 9.4).
    assert first[3] == 0 and all(abs(c - 400 / 3) < 40 for c in first[:3].tolist())


# ----------------------------------------------------------------------------- replacement values

def test_normal_values_have_a_tenth_of_the_layer_weight_std():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 300), nn.Linear(300, 200))
    with torch.no_grad():
        model[0].weight.mul_(7.0)
        model[1].weight.mul_(0.3)
    params, groups = params_of(model), make_groups(model, "weight")
    values = replacement_values(params, groups, "normal", 0.1, gen(1))
    assert list(values) == list(groups.index)
    for layer in ("0", "1"):
        target = 0.1 * float(params[f"{layer}.weight"].std(correction=0))
        w = values[f"{layer}.weight"]
        assert w.shape == params[f"{layer}.weight"].shape and w.dtype == torch.float32
        assert float(w.std()) == pytest.approx(target, rel=0.02)
        assert abs(float(w.mean())) < 0.02 * target
        # Biases are drawn with their layer's weight std too (bias tensors are too short to
        # estimate a std of their own).
        assert float(values[f"{layer}.bias"].std()) == pytest.approx(target, rel=0.2)
    same = replacement_values(params, groups, "normal", 0.1, gen(1))
    assert all(torch.equal(values[n], same[n]) for n in values)
    from_model = replacement_values(params, model, "normal", 0.1, gen(1))  # model, not groups
    assert all(torch.equal(values[n], from_model[n]) for n in values)
    zeros = replacement_values(params, groups, "zero")
    assert all((z == 0).all() and z.shape == params[n].shape for n, z in zeros.items())


# ----------------------------------------------------------------------------- thresholding

def marked_values(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replacement values that no trained parameter equals, so replaced elements are visible."""
    return {n: torch.full_like(p, -1000.0) for n, p in params.items()}


def replaced_groups(stacked, groups: Groups) -> torch.Tensor:
    """(T, G) which groups were replaced, read off the stacked parameters (all-or-nothing)."""
    T = next(iter(stacked.values())).shape[0]
    hits = torch.zeros(T, groups.n_groups)
    for name, ids in groups.index.items():
        marked = (stacked[name] == -1000.0).reshape(T, -1).float()
        hits.index_add_(1, ids.reshape(-1), marked)
    frac = hits / groups.size
    assert ((frac == 0) | (frac == 1)).all(), "a group was replaced only in part"
    return frac == 1


@pytest.mark.parametrize("aggregation", ["weight", "unit", "layer"])
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_fraction_replaced_per_scope_is_round_t_n_over_n_even_with_ties(aggregation, scope,
                                                                      direction):
    torch.manual_seed(0)
    model = conv_model()
    params, groups = params_of(model), make_groups(model, aggregation)
    # Count-valued importance: many exact ties, as sign-flip counts have.
    g = gen(3)
    imp = {n: torch.randint(0, 3, p.shape, generator=g).float() for n, p in params.items()}
    scores = group_scores(imp, groups, "mean")
    order = replacement_order(scores, groups, scope, direction, gen(4))
    stacked, fraction = thresholded_parameters(params, groups, order, scope, THRESHOLDS,
                                               marked_values(params))
    replaced = replaced_groups(stacked, groups)  # (T, G)
    scope_of = groups.layer if scope == "layer" else torch.zeros_like(groups.layer)
    for s in scope_of.unique().tolist():
        members = scope_of == s
        n = int(members.sum())
        for i, t in enumerate(THRESHOLDS.tolist()):
            chosen = replaced[i] & members
            assert int(chosen.sum()) == round(t * n)  # exactly the asked count, ties or not
            kept = members & ~replaced[i]
            if chosen.any() and kept.any():  # the chosen are the least (most) important
                if direction == "least_first":
                    assert scores[chosen].max() <= scores[kept].min()
                else:
                    assert scores[chosen].min() >= scores[kept].max()
    n_elements = sum(p.numel() for p in params.values())
    expected = (replaced.double() * groups.size).sum(1) / n_elements
    assert torch.allclose(fraction, expected.double())
    assert fraction[0] == 0 and fraction[-1] == 1
    assert (fraction.diff() >= 0).all()  # nested: a larger threshold replaces a superset
    assert (replaced[1:] >= replaced[:-1]).all()


def test_layer_scope_replaces_in_every_layer_model_scope_where_the_scores_are_lowest():
    model = linear_model()  # units: 2 in layer 0, 4 in layer 1
    params, groups = params_of(model), make_groups(model, "unit")
    scores = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0, 13.0], dtype=torch.float64)
    t = torch.tensor([0.5])
    by_scope = {}
    for scope in SCOPES:
        order = replacement_order(scores, groups, scope, "least_first", gen())
        stacked, _ = thresholded_parameters(params, groups, order, scope, t, marked_values(params))
        by_scope[scope] = replaced_groups(stacked, groups)[0].tolist()
    assert by_scope["model"] == [True, True, True, False, False, False]  # 3 lowest overall
    assert by_scope["layer"] == [True, False, True, True, False, False]  # 1 of 2, 2 of 4


def test_threshold_zero_is_bit_identical_one_is_all_values_and_the_model_is_never_changed():
    torch.manual_seed(0)
    model = conv_model()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = {n: p for n, p in model.named_parameters()}  # the live parameters themselves
    groups = make_groups(model, "unit")
    imp = {n: p.detach().abs() for n, p in params.items()}
    order = replacement_order(group_scores(imp, groups, "max"), groups, "layer", "least_first",
                              gen())
    values = replacement_values(params, groups, "normal", 0.1, gen(1))
    stacked, fraction = thresholded_parameters(params, groups, order, "layer",
                                               torch.tensor([0.0, 0.4, 1.0]), values)
    x = torch.randn(6, 2, 3, 3)
    evaluate_stacked(model, stacked, x, torch.randint(0, 2, (6,)))
    for name, p in model.named_parameters():
        assert torch.equal(bits(stacked[name][0]), bits(before[name]))  # t = 0: the original
        assert torch.equal(bits(stacked[name][2]), bits(values[name]))  # t = 1: all replaced
        assert not stacked[name].requires_grad
        assert torch.equal(bits(p), bits(before[name]))  # the model: untouched, bit for bit
        assert p.grad is None
    assert model.training  # mode restored
    stacked["0.weight"].add_(1.0)  # new memory, not a view of the model's weights
    assert torch.equal(bits(model[0].weight), bits(before["0.weight"]))
    assert fraction.tolist()[0] == 0.0 and fraction.tolist()[2] == 1.0


def test_bad_thresholds_and_mismatched_order_are_rejected():
    model = linear_model()
    params, groups = params_of(model), make_groups(model, "unit")
    scores = group_scores({n: p.abs() for n, p in params.items()}, groups, "mean")
    model_order = replacement_order(scores, groups, "model", "least_first", gen())
    with pytest.raises(ValueError, match="within-layer"):
        thresholded_parameters(params, groups, model_order, "layer", THRESHOLDS, params)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        thresholded_parameters(params, groups, model_order, "model", torch.tensor([1.5]), params)


# ----------------------------------------------------------------------------- evaluation

def plain_loop(model: nn.Module, stacked, x, y):
    """Load each parameter set into a copy of the model and evaluate it: the oracle."""
    losses, accuracies = [], []
    for i in range(next(iter(stacked.values())).shape[0]):
        copy_ = copy.deepcopy(model).eval()
        with torch.no_grad():
            for name, p in copy_.named_parameters():
                if name in stacked:
                    p.copy_(stacked[name][i])
            logits = copy_(x)
        losses.append(float(F.cross_entropy(logits, y)))
        accuracies.append(float((logits.argmax(1) == y).float().mean()))
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(accuracies, dtype=torch.float64)


def stacked_for(model, aggregation="unit", thresholds=THRESHOLDS):
    params, groups = params_of(model), make_groups(model, aggregation)
    imp = {n: p.abs() for n, p in params.items()}
    order = replacement_order(group_scores(imp, groups, "mean"), groups, "model", "most_first",
                              gen())
    values = replacement_values(params, groups, "normal", 1.0, gen(1))
    return thresholded_parameters(params, groups, order, "model", thresholds, values)[0]


@pytest.mark.parametrize("chunk", [None, 1, 4, 100])
def test_evaluate_stacked_equals_a_plain_loop_mlp(chunk):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(12, 8), nn.Tanh())
    model = ContinualNet(body, 8, 1, 5)
    model.train()  # evaluate_stacked must switch dropout off and restore the mode
    x, y = torch.randn(40, 1, 4, 4), torch.randint(0, 5, (40,))
    stacked = stacked_for(model)
    loss, acc = evaluate_stacked(model, stacked, x, y, chunk=chunk)
    want_loss, want_acc = plain_loop(model, stacked, x, y)
    assert loss.shape == acc.shape == (21,)
    assert torch.allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(acc, want_acc, atol=1e-9)
    assert model.training and model.body[3].training
    model.body[3].eval()  # mixed modes come back as they were
    evaluate_stacked(model, stacked, x, y, chunk=chunk)
    assert model.training and not model.body[3].training


def test_evaluate_stacked_equals_a_plain_loop_cnn_with_example_chunks(monkeypatch):
    torch.manual_seed(1)
    model = conv_model()
    x, y = torch.randn(30, 2, 3, 3), torch.randint(0, 2, (30,))
    stacked = stacked_for(model, "filter")
    want_loss, want_acc = plain_loop(model, stacked, x, y)
    # A tiny budget forces several passes over sets AND over examples.
    monkeypatch.setattr(aggregate, "CHUNK_BUDGET_FLOATS", 200)
    loss, acc = evaluate_stacked(model, stacked, x, y)
    assert torch.allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(acc, want_acc, atol=1e-9)


def test_repeated_sets_are_evaluated_once_with_the_same_results(monkeypatch):
    torch.manual_seed(3)
    model = conv_model()  # "layer" grouping, model scope: 2 groups, round(2t) in {0, 1, 2}
    x, y = torch.randn(12, 2, 3, 3), torch.randint(0, 2, (12,))
    stacked = stacked_for(model, "layer")
    seen = []
    evaluate_sets = aggregate._evaluate_sets

    def spy(model, stacked, *args):
        seen.append(next(iter(stacked.values())).shape[0])
        return evaluate_sets(model, stacked, *args)

    monkeypatch.setattr(aggregate, "_evaluate_sets", spy)
    loss, acc = evaluate_stacked(model, stacked, x, y)
    assert seen == [3]
    want_loss, want_acc = plain_loop(model, stacked, x, y)
    assert torch.allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(acc, want_acc, atol=1e-9)


def test_every_aggregation_runs_end_to_end():
    torch.manual_seed(2)
    model = conv_model()
    x, y = torch.randn(10, 2, 3, 3), torch.randint(0, 2, (10,))
    for aggregation in AGGREGATIONS:
        loss, acc = evaluate_stacked(model, stacked_for(model, aggregation), x, y)
        assert torch.isfinite(loss).all() and ((acc >= 0) & (acc <= 1)).all()
        original = float(F.cross_entropy(model(x), y).detach())
        assert math.isclose(float(loss[0]), original, rel_tol=1e-5)
