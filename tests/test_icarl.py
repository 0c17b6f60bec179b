"""iCaRL: the nearest-mean-of-exemplars classifier against a hand computation, the exemplar
budget per class, and the sigmoid distillation's gradient in closed form."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from engram.data.streams import TensorSet
from engram.errors import ConfigError
from engram.methods.base import ProblemInfo
from engram.methods.icarl import NO_MEAN_SCORE, ICaRL, NearestMeanOfExemplars
from engram.methods.replay import class_keys
from engram.models.nets import ContinualNet
from tests.conftest import tiny_config
from tests.test_methods import _context


def identity_net(width: int, n_features: int = 2, n_heads: int = 1) -> ContinualNet:
    """features(x) = x flattened: the exemplars' features are the hand-made points."""
    return ContinualNet(nn.Flatten(), n_features, n_heads, width)


def hand_nearest_mean(points, exemplars_by_class):
    """Per point, the class (label) whose re-normalised mean of unit exemplars is nearest,
    and each class's squared distance: plain Python."""
    def unit(v):
        norm = math.sqrt(sum(c * c for c in v))
        return [c / norm for c in v]
    means = {}
    for label, rows in exemplars_by_class.items():
        units = [unit(r) for r in rows]
        means[label] = unit([sum(col) / len(units) for col in zip(*units)])
    predictions, distances = [], []
    for p in points:
        u = unit(p)
        d = {label: sum((a - b) ** 2 for a, b in zip(u, m)) for label, m in means.items()}
        distances.append(d)
        predictions.append(min(d, key=d.get))
    return predictions, distances


def test_nme_equals_a_hand_computed_nearest_mean():
    exemplars_by_class = {0: [[1.0, 0.1], [2.0, -0.3], [0.5, 0.0]],
                          2: [[0.1, 1.0], [-0.2, 3.0]],
                          3: [[-1.0, -1.0], [-2.0, -0.5], [-0.3, -0.9]]}
    x = torch.tensor([r for rows in exemplars_by_class.values() for r in rows])
    y = torch.tensor([label for label, rows in exemplars_by_class.items() for _ in rows])
    exemplars = TensorSet(x, y, torch.zeros_like(y))
    points = [[0.9, 0.8], [0.7, 0.5], [-0.1, 0.4], [-1.0, 0.2], [0.3, -1.0], [-0.6, -0.2]]
    nme = NearestMeanOfExemplars(identity_net(4), exemplars, width=4, per_task=False)
    scores = nme(torch.tensor(points), torch.zeros(len(points), dtype=torch.long))
    predictions, distances = hand_nearest_mean(points, exemplars_by_class)
    assert scores.argmax(1).tolist() == predictions
    assert len(set(predictions)) == 3  # the points exercise every class
    for row, d in zip(scores.tolist(), distances):
        for label in range(4):
            expected = -d[label] if label in d else NO_MEAN_SCORE  # class 1 has no exemplars
            assert row[label] == pytest.approx(expected, abs=1e-6)


def test_nme_in_task_il_searches_only_the_examples_own_task_and_in_domain_il_all_means():
    # two tasks, each with classes 0 and 1 (task-IL heads or domain-IL's shared labels)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    y = torch.tensor([0, 1, 0, 1])
    task = torch.tensor([0, 0, 1, 1])
    exemplars = TensorSet(x, y, task)
    point = torch.tensor([[0.9, 0.3]])  # nearest of all: task 0's class 0 at (1, 0)
    domain = NearestMeanOfExemplars(identity_net(2), exemplars, width=2, per_task=False)
    per_task = NearestMeanOfExemplars(identity_net(2), exemplars, width=2, per_task=True)
    assert domain(point, torch.tensor([1])).argmax(1).item() == 0
    # restricted to task 1, whose means are (-1, 0) for class 0 and (0, -1) for class 1:
    # class 1's is nearer to (0.9, 0.3) normalised
    u = torch.nn.functional.normalize(point, dim=1)[0]
    d0, d1 = ((u - torch.tensor([-1.0, 0.0])) ** 2).sum(), ((u - torch.tensor([0.0, -1.0])) ** 2).sum()
    assert d1 < d0
    scores = per_task(point, torch.tensor([1]))
    assert scores.argmax(1).item() == 1
    torch.testing.assert_close(scores[0], torch.stack([-d0, -d1]))


def test_nme_means_with_flips_average_the_flipped_images():
    # one class of two 1x1x2 images: the mean direction of the 4 unit vectors, flips included
    net = identity_net(2)
    images = [[3.0, 1.0], [1.0, -2.0]]
    exemplars = TensorSet(torch.tensor(images).view(2, 1, 1, 2), torch.tensor([0, 0]),
                          torch.tensor([0, 0]))
    nme = NearestMeanOfExemplars(net, exemplars, width=2, per_task=False, flip=True)
    units = [[a / math.hypot(a, b), b / math.hypot(a, b)] for a, b in images]
    units += [[b, a] for a, b in units]  # flipped left-right
    mean = [sum(col) / 4 for col in zip(*units)]
    expected = torch.tensor(mean) / math.hypot(*mean)
    torch.testing.assert_close(nme.means[0], expected)
    with pytest.raises(ConfigError, match="image inputs"):
        NearestMeanOfExemplars(net, TensorSet(torch.ones(1, 2), torch.tensor([0]),
                                              torch.tensor([0])), 2, per_task=False, flip=True)


def test_exemplars_per_class_are_the_budget_over_the_classes_seen():
    ctx = _context(tiny_config())  # class-IL, 3 tasks of 2 classes
    method = ICaRL(ICaRL.Params(memory=7))
    assert method.eval_model(ctx) is ctx.model  # no exemplars yet: the network's own outputs
    first_lists = {}
    for t, per_class in [(0, 7 // 2), (1, 7 // 4), (2, 7 // 6)]:
        ctx.task = ctx.stream.tasks[t]
        ctx.seen_tasks.append(ctx.task)
        method.after_task(ctx)
        keys = class_keys(method.memory)
        classes, counts = torch.unique(keys, return_counts=True)
        assert len(classes) == 2 * (t + 1)
        assert counts.tolist() == [per_class] * len(classes)
        for key in classes.tolist():  # earlier classes keep the first m of their lists
            ids = method.memory.x[keys == key].sum(dim=(1, 2, 3)) if method.memory.x.ndim == 4 \
                else method.memory.x[keys == key].sum(dim=1)
            if key in first_lists:
                torch.testing.assert_close(ids, first_lists[key][:per_class])
            first_lists[key] = ids
    assert isinstance(method.eval_model(ctx), NearestMeanOfExemplars)
    assert len(method.training_data(ctx.task.train, ctx)) == len(ctx.task.train) + 6


@pytest.mark.parametrize("scenario", ["class", "task"])
def test_distillation_gradient_is_sigmoid_difference_on_earlier_outputs(scenario):
    ctx = _context(tiny_config(stream={"scenario": scenario}))
    method = ICaRL(ICaRL.Params(memory=20, strength=0.7))
    ctx.task = ctx.stream.tasks[0]
    ctx.seen_tasks.append(ctx.task)
    method.before_task(ctx)
    ctx.batch = TensorSet(*(part[:8] for part in ctx.task.train))
    assert method.penalty(ctx) is None  # first task: nothing to distil
    ctx.task = ctx.stream.tasks[1]
    ctx.seen_tasks.append(ctx.task)
    method.before_task(ctx)
    with torch.no_grad():
        old_logits = ctx.model.all_logits(ctx.batch.x).clone()  # (B, H*K)
        for p in ctx.model.parameters():  # move away from the copy: else the gradient is 0
            p.add_(0.3 * torch.randn_like(p))
    penalty = method.penalty(ctx)
    ctx.model.zero_grad()
    penalty.backward()
    # d penalty / d head bias_c = strength / B * sum_b (sigmoid(z_bc) - sigmoid(z_old_bc)) on
    # earlier outputs, 0 on the others
    with torch.no_grad():
        logits = ctx.model.all_logits(ctx.batch.x)
    if scenario == "class":
        earlier = torch.unique(ctx.stream.tasks[0].train.y)
    else:  # task-IL: the first head's columns
        earlier = torch.arange(ctx.stream.head_dim)
    expected = torch.zeros(logits.shape[1])
    expected[earlier] = 0.7 * (torch.sigmoid(logits) - torch.sigmoid(old_logits))[:, earlier].mean(0)
    torch.testing.assert_close(ctx.model.head.bias.grad, expected)
    assert ctx.model.head.bias.grad.abs().sum() > 0  # the distillation term changes the gradient


def test_state_round_trips_and_regression_is_refused():
    ctx = _context(tiny_config())
    method = ICaRL(ICaRL.Params(memory=10))
    ctx.task = ctx.stream.tasks[0]
    ctx.seen_tasks.append(ctx.task)
    method.after_task(ctx)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = ICaRL(method.params)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for a, b in zip(method.memory, restored.memory):
        assert torch.equal(a, b)
    test = ctx.task.test
    torch.testing.assert_close(method.eval_model(ctx)(test.x, test.task),
                               restored.eval_model(ctx)(test.x, test.task))
    assert "regression" in method.unusable_reason(ProblemInfo("p", 3, classification=False))
    assert "1 output" in method.unusable_reason(ProblemInfo("p", 1, classification=True))
    assert method.unusable_reason(ProblemInfo("p", 3, classification=True)) is None


@pytest.mark.parametrize("method", ["naive", "icarl", "lwf", "sam"])
def test_batch_norm_counts_each_trained_batch_once(method):
    """Distillation (iCaRL, LwF) and SAM's second pass run over the batch the runner has
    already forwarded: BatchNorm's running statistics must not count it twice."""
    import engram
    from torch import nn

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(96, 1, 6, 6, generator=g), torch.arange(96) % 4
    stream = engram.stream_from((x, y), (x, y), classes_per_task=2)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(64, 4))
    steps = []

    class CountingSGD(torch.optim.SGD):
        def step(self, closure=None):
            steps.append(1)
            return super().step(closure)

    result = engram.fit(net, stream, method, epochs=2, batch_size=16, progress=False,
                        optimizer=lambda params: CountingSGD(params, lr=0.05))
    batch_norm = next(m for m in result.model.modules() if isinstance(m, nn.BatchNorm2d))
    # SAM steps its optimizer once per batch too (its first pass only perturbs the weights)
    assert int(batch_norm.num_batches_tracked) == len(steps) > 0
