"""The hooked (closed-form) per-example path of the Fisher estimators and MAS against a plain
per-example autograd loop (tests.test_fisher.oracle), on MLP and CNN layers, with bias,
multi-head task-IL, sequences, grouped / strided convolutions, and models mixing supported
layers with ones left to the torch.func fallback. Each test also checks which parameters
went which way, so a silent fallback for everything would fail. Float64 throughout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engram.importance.fisher as fisher_module
import engram.importance.mas as mas_module
import engram.importance.per_example as per_example_module
from engram.importance.fisher import fisher_diagonal
from engram.importance.mas import mas_importance
from engram.importance.per_example import hooked_layers
from engram.models import ContinualNet
from tests.test_fisher import assert_same, oracle, sampled_labels

N, HEAD_DIM = 12, 3


class LinearOnSequences(nn.Module):
    """(B, 16) -> (B, 4, 4): a Linear applied at 4 positions, summed: per-example gradient is a
    sum over positions, squared after summing."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 5)

    def forward(self, x):
        return torch.tanh(self.mix(x.reshape(len(x), 4, 4))).sum(1)  # (B, 5)


class Scaled(nn.Module):
    """A parameter no hook can see: elementwise scale, torch.func's job."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return x * self.scale


class TwiceApplied(nn.Module):
    """One Linear called twice in a forward: its per-example gradient sums both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(5, 5)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))


class ReadsWeightElsewhere(nn.Module):
    """A Linear whose weight is also read by F.linear outside its forward: the hooks' sum
    disagrees with autograd, so it must fall back."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(5, 5)

    def forward(self, x):
        return torch.tanh(self.layer(x)) + 0.3 * F.linear(x, self.layer.weight)


def mlp(n_heads: int, inplace: bool = False) -> ContinualNet:
    body = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(inplace=inplace),
                         nn.Linear(6, 5), nn.Tanh())
    return ContinualNet(body, 5, n_heads, HEAD_DIM)


def cnn(n_heads: int) -> ContinualNet:
    body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=2, padding=1, dilation=1, groups=2),
                         nn.Tanh(), nn.Conv2d(4, 3, 2, dilation=2, bias=False), nn.Flatten())
    return ContinualNet(body, 3 * 2 * 2, n_heads, HEAD_DIM)


def mixed(n_heads: int) -> ContinualNet:
    """Conv + BatchNorm (fallback) + Linear + an elementwise parameter (fallback)."""
    body = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(3 * 6 * 6, 5), Scaled(5), nn.Tanh())
    return ContinualNet(body, 5, n_heads, HEAD_DIM)


def sequences(n_heads: int) -> ContinualNet:
    return ContinualNet(nn.Sequential(nn.Flatten(), nn.Linear(16, 16), LinearOnSequences()),
                        5, n_heads, HEAD_DIM)


def twice(n_heads: int) -> ContinualNet:
    return ContinualNet(nn.Sequential(nn.Flatten(), nn.Linear(16, 5), TwiceApplied()),
                        5, n_heads, HEAD_DIM)


def shared_weight(n_heads: int) -> ContinualNet:
    return ContinualNet(nn.Sequential(nn.Flatten(), nn.Linear(16, 5), ReadsWeightElsewhere()),
                        5, n_heads, HEAD_DIM)


# model builder, input shape, parameters the hooks must leave to torch.func
MODELS = {
    "mlp": (mlp, (1, 4, 4), set()),
    "mlp_inplace_relu": (lambda h: mlp(h, inplace=True), (1, 4, 4), set()),
    "cnn": (cnn, (2, 8, 8), set()),
    "mixed": (mixed, (2, 6, 6), {"body.1.weight", "body.1.bias", "body.5.scale"}),
    "sequences": (sequences, (1, 4, 4), set()),
    "twice": (twice, (1, 4, 4), set()),
    "shared_weight": (shared_weight, (1, 4, 4), {"body.2.layer.weight", "body.2.layer.bias"}),
}


def build(kind: str, n_heads: int):
    make, shape, fallback = MODELS[kind]
    torch.manual_seed(0)
    model = make(n_heads).double()
    for module in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(HEAD_DIM, (N,), generator=g)
    task = torch.randint(n_heads, (N,), generator=g)
    return model, x, y, task, fallback


@pytest.fixture
def fallback_names(monkeypatch):
    """Names of the parameters every call hands to torch.func."""
    seen: set[str] = set()
    original = per_example_module.func_statistic

    def spy(model, params, names, *args, **kwargs):
        seen.update(names)
        return original(model, params, names, *args, **kwargs)

    monkeypatch.setattr(per_example_module, "func_statistic", spy)
    return seen


@pytest.mark.parametrize("n_heads", [1, 3])
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_hooked_fisher_matches_the_loop(kind, n_heads, estimator, fallback_names):
    model, x, y, task, fallback = build(kind, n_heads)
    expected = oracle(model, x, y, task, estimator)
    assert all(v.abs().sum() > 0 for v in expected.values())
    assert_same(fisher_diagonal(model, x, y, task, estimator, chunk_size=5), expected)
    assert fallback_names == fallback


@pytest.mark.parametrize("kind", ["cnn", "mixed"])
def test_hooked_sample_fisher_matches_the_loop_with_the_same_draws(kind, fallback_names):
    model, x, y, task, fallback = build(kind, 3)
    labels = sampled_labels(model, x, task, seed=4, chunk_size=5)
    got = fisher_diagonal(model, x, y, task, "sample", chunk_size=5,
                          generator=torch.Generator().manual_seed(4))
    assert_same(got, oracle(model, x, y, task, "sample", labels=labels))
    assert fallback_names == fallback


def mas_by_loop(model, x, task):
    """MAS's importance, mean |d ||f(x)||^2 / d theta| over the first N examples, one
    example at a time: the oracle."""
    model.eval()
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for i in range(N):
        grads = torch.autograd.grad(model(x[i:i + 1], task[i:i + 1]).pow(2).sum(),
                                    list(model.parameters()))
        for (name, _), g in zip(model.named_parameters(), grads):
            expected[name] += g.abs() / N
    return expected


@pytest.mark.parametrize("kind", ["mlp", "cnn", "mixed", "sequences"])
def test_hooked_mas_matches_the_loop(kind, fallback_names):
    model, x, _, task, fallback = build(kind, 3)
    expected = mas_by_loop(model, x, task)
    assert_same(mas_importance(model, x, task, chunk_size=5), expected)
    assert fallback_names == fallback


@pytest.mark.parametrize("kind", ["cnn", "mixed"])
def test_fast_and_func_paths_agree(kind):
    model, x, y, task, _ = build(kind, 3)
    for estimator in ("exact", "empirical"):
        assert_same(fisher_diagonal(model, x, y, task, estimator),
                    fisher_diagonal(model, x, y, task, estimator, fast=False))


def test_frozen_parameters_still_get_their_fisher_and_keep_no_grad():
    model, x, y, task, _ = build("mlp", 3)
    model.body[1].requires_grad_(False)  # the first layer: its output needs no grad in training
    got = fisher_diagonal(model, x, y, task, "exact")
    assert_same(got, oracle_with_grads_on(model, x, y, task))
    assert all(p.grad is None for p in model.parameters())
    assert not model.body[1].weight.requires_grad


def oracle_with_grads_on(model, x, y, task):
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        return oracle(model, x, y, task, "exact")
    finally:
        for p in frozen:
            p.requires_grad_(False)


def test_the_check_keeps_exactly_the_layers_used_only_through_their_forward():
    model, x, _, task, _ = build("shared_weight", 1)
    params = {name: p.detach() for name, p in model.named_parameters()}
    kept = hooked_layers(model, params, x, task)
    assert set(kept) == {"body.1", "head"}  # body.2.layer is read by F.linear too


class _Timewise(torch.nn.Module):
    """A Linear fed (B*T, D) rows from a reshape: its rows are not examples."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = torch.nn.Linear(4, 6), torch.nn.Linear(6 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin(x.reshape(len(x) * 3, 4)))  # (B*3, 6)
        return self.out(h.reshape(len(x), 18))


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_a_layer_whose_rows_are_not_examples_falls_back(estimator):
    """It passes the check of the summed gradient but not per example: left to torch.func
    (it crashed, or for a chunked layer gave wrong numbers, before)."""
    from engram.importance.fisher import fisher_diagonal
    from engram.importance.per_example import hooked_layers
    from engram.models import adapt

    torch.manual_seed(0)
    model = adapt(_Timewise(), n_heads=1, head_dim=3)
    x, y = torch.rand(10, 12), torch.randint(0, 3, (10,))
    task = torch.zeros(10, dtype=torch.long)
    params = dict(model.named_parameters())
    assert [name.split(".")[-1] for name in hooked_layers(model, params, x, task)] == ["out"]
    fast = fisher_diagonal(model, x, y, task, estimator)
    reference = fisher_diagonal(model, x, y, task, estimator, fast=False)
    for name, value in reference.items():
        torch.testing.assert_close(fast[name], value, rtol=1e-5, atol=1e-9)


# --- a budget smaller than one example's K gradients: the seeds are cut into groups ----------

CLASSES = 10


class WideConvThenPositions(nn.Module):
    """A conv with many parameters on a 2x2 image (P = 16*8*9 + 16 = 1168, activations
    8*4 in, 16*4 out), then a Linear at each of its 4 pixels (P = 102) and an elementwise
    scale (torch.func): one example's 10 gradients of the conv (11,680 floats) dwarf its
    activations (200 floats with the head), so a budget can hold these but not those."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.mix = nn.Linear(16, 6)
        self.scale = Scaled(6)

    def forward(self, x):  # (B, 8, 2, 2) -> (B, 6)
        h = torch.relu(self.conv(x)).flatten(2).transpose(1, 2)  # (B, 4 pixels, 16)
        return self.scale(torch.tanh(self.mix(h)).sum(1))


def wide():
    torch.manual_seed(0)
    model = ContinualNet(WideConvThenPositions(), 6, 1, CLASSES).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 8, 2, 2, generator=g, dtype=torch.float64)
    y = torch.randint(CLASSES, (N,), generator=g)
    return model, x, y, torch.zeros(N, dtype=torch.long)


@pytest.fixture
def materialised(monkeypatch):
    """Floats held at once by each piece: per-example gradients, {name: (seeds, examples,
    *shape)} summed (hooked and torch.func paths, as they reach _weighted_sums; the hooked
    ones as _per_example makes them, hooked_layers' check included), and the gradients at
    the layers' outputs of each batched backward."""
    sizes: dict[str, list[int]] = {"gradients": [], "backward": [], "hooked": []}
    weighted_sums, batched_backward, hooked = (per_example_module._weighted_sums,
                                               per_example_module._batched_backward,
                                               per_example_module._per_example)

    def spy_sums(per_example, *args, **kwargs):
        sizes["gradients"].append(sum(v.numel() for v in per_example.values()))
        return weighted_sums(per_example, *args, **kwargs)

    def spy_hooked(*args, **kwargs):  # also the check of hooked_layers
        per_example = hooked(*args, **kwargs)
        sizes["hooked"].append(sum(v.numel() for v in per_example.values()))
        return per_example

    def spy_backward(*args, **kwargs):
        grads = batched_backward(*args, **kwargs)
        sizes["backward"].append(sum(g.numel() for g in grads if g is not None))
        return grads

    monkeypatch.setattr(per_example_module, "_weighted_sums", spy_sums)
    monkeypatch.setattr(per_example_module, "_batched_backward", spy_backward)
    monkeypatch.setattr(per_example_module, "_per_example", spy_hooked)
    return sizes


# 1300: backward in groups of 5 seeds, the conv's gradients one seed at a time; 3000 with 3
# examples per forward: groups of 4 seeds, cut in 2 for the conv, and examples one at a time
@pytest.mark.parametrize("budget, chunk_size", [(1300, None), (1300, 3), (3000, 3), (3000, None)])
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_a_budget_below_one_examples_gradients_changes_nothing(monkeypatch, budget, chunk_size,
                                                               fast, estimator):
    model, x, y, task = wide()
    whole = fisher_diagonal(model, x, y, task, estimator, chunk_size=chunk_size, fast=fast)
    monkeypatch.setattr(fisher_module, "CHUNK_BUDGET_FLOATS", budget)
    cut = fisher_diagonal(model, x, y, task, estimator, chunk_size=chunk_size, fast=fast)
    assert_same(cut, whole)
    assert_same(cut, oracle(model, x, y, task, estimator))


@pytest.mark.parametrize("budget", [1300, 3000])
@pytest.mark.parametrize("fast", [True, False])
def test_mas_with_a_small_budget_changes_nothing(monkeypatch, budget, fast):
    model, x, _, task = wide()
    whole = mas_importance(model, x, task, fast=fast)
    monkeypatch.setattr(mas_module, "CHUNK_BUDGET_FLOATS", budget)
    cut = mas_importance(model, x, task, chunk_size=5, fast=fast)
    assert_same(cut, whole)
    expected = mas_by_loop(model, x, task)
    assert_same(cut, expected)


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_model_with_a_tiny_budget_matches_the_loop(monkeypatch, kind):
    """Budget 100 floats: one seed per backward and gradients an example (or a few) at a
    time, on grouped / strided convs, sequences, a layer called twice, and the fallbacks."""
    model, x, y, task, _ = build(kind, 3)
    monkeypatch.setattr(fisher_module, "CHUNK_BUDGET_FLOATS", 100)
    assert_same(fisher_diagonal(model, x, y, task, "exact", chunk_size=5),
                oracle(model, x, y, task, "exact"))


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("fast", [True, False])
def test_what_is_materialised_at_once_stays_within_the_budget(monkeypatch, materialised,
                                                              chunk_size, fast):
    """Exact Fisher, 10 classes, budget 3000 floats: one example's 10 gradients of the conv
    alone are 11,680 floats, so the seeds must be cut into groups (the torch.func path too,
    all 1,346 parameters at once); with 3 examples per forward the backward is cut too."""
    budget = 3000
    model, x, y, task = wide()
    monkeypatch.setattr(fisher_module, "CHUNK_BUDGET_FLOATS", budget)
    fisher_diagonal(model, x, y, task, "exact", chunk_size=chunk_size, fast=fast)
    assert materialised["gradients"] and max(materialised["gradients"]) <= budget
    if fast:
        assert materialised["backward"] and max(materialised["backward"]) <= budget
        assert materialised["hooked"] and max(materialised["hooked"]) <= budget
    if fast and chunk_size:
        # 3 examples' activations, 600 floats, and (group + 1) x 600 within the budget: the
        # backward runs the seeds in groups of 4, more passes than forward chunks
        assert len(materialised["backward"]) == -(-CLASSES // 4) * -(-N // chunk_size)
