"""Plasticity problems (engram.data.problems): the target network, the flips, the
permutations, the class stream, and what every registered problem must promise."""

from __future__ import annotations

import pytest
import torch

from engram.config import DataConfig
from engram.data.problems import (LTUTarget, ProblemConfig, bit_flipping_tasks,
                                  class_stream_tasks, permuted_digits_tasks)
from engram.registry import PROBLEMS


def test_ltu_target_by_hand():
    w_in = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    b_in = torch.tensor([1.0, -1.0])
    target = LTUTarget(w_in, b_in, torch.tensor([1.0, -1.0]), torch.tensor(1.0),
                       threshold=torch.tensor([0.5, 1.5]))
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    # unit 1: 1 + x0 - x1 > 0.5; unit 2: x0 + x1 - 1 > 1.5 (never with bits)
    assert target(x).tolist() == [2.0, 2.0, 2.0]
    drawn = LTUTarget.draw(4, 3, 0.7, torch.Generator().manual_seed(0))
    assert set(drawn.w_in.unique().tolist()) <= {-1.0, 1.0}
    s = (4 - drawn.w_in.sum(1) + drawn.b_in) / 2  # LoP's S_i
    torch.testing.assert_close(drawn.threshold, 0.7 * 5 - s)


@pytest.mark.parametrize("flip_one", [False, True])
def test_flipping_bits_hold_within_a_task_and_change_between(flip_one):
    cfg = ProblemConfig(n_tasks=6, flip_every=50, n_inputs=8, n_flipping=5, flip_one=flip_one)
    tasks = list(bit_flipping_tasks(cfg, seed=0))
    assert len(tasks) == 6 and all(len(t.train) == 50 for t in tasks)
    flips = [t.train.x[:, :5] for t in tasks]
    assert all(torch.equal(f, f[:1].expand_as(f)) for f in flips)  # constant within a task
    assert any(tasks[0].train.x[:, 5:].std(0) > 0)  # the free bits vary
    changed = [int((a[0] != b[0]).sum()) for a, b in zip(flips, flips[1:])]
    if flip_one:
        assert changed == [1] * 5
    else:
        assert sum(changed) > 5  # all redrawn: usually several bits change
    again = list(bit_flipping_tasks(cfg, seed=0))
    assert all(torch.equal(a.train.y, b.train.y) for a, b in zip(tasks, again))


def test_permuted_tasks_permute_pixels_and_keep_labels():
    images = torch.rand(30, 12)
    labels = torch.arange(30) % 10
    cfg = ProblemConfig(kind="permuted_digits", n_tasks=3, examples_per_task=20)
    tasks = list(permuted_digits_tasks(cfg, images, labels, seed=0))
    for task in tasks:
        assert len(task.train) == 20
        for x, y in zip(task.train.x, task.train.y):  # each row is some image, permuted
            match = [i for i in range(30) if torch.equal(images[i].sort().values, x.sort().values)]
            assert match and labels[match[0]] == y
    assert not torch.equal(tasks[0].train.x[:, :3], tasks[1].train.x[:, :3])


def test_class_stream_cycles_class_groups():
    images, labels = torch.rand(60, 4), torch.arange(60) % 6
    cfg = ProblemConfig(kind="class_stream", n_tasks=7, classes_per_task=2)
    tasks = list(class_stream_tasks(cfg, images, labels, seed=0))
    groups = [tuple(sorted(t.classes)) for t in tasks]
    assert len(set(groups[:3])) == 3 and groups[3:6] == groups[:3] and groups[6] == groups[0]
    for task in tasks:
        assert set(task.train.y.tolist()) == set(task.classes) and len(task.train) == 20


def test_an_unknown_problem_is_named_in_the_error():
    from engram.errors import ConfigError
    from engram.schema import parse_dataclass

    with pytest.raises(ConfigError, match="problem.kind: unknown plasticity problem 'flipping'; "
                                          "choose one of: bit_flipping"):
        parse_dataclass(ProblemConfig, {"kind": "flipping"}, "problem")


# ----------------------------------------------------------------------------- every problem

def tiny_problem(name: str) -> ProblemConfig:
    """A small instance of problem `name`: few, short tasks."""
    return ProblemConfig(kind=name, n_tasks=3, flip_every=40, n_inputs=6, n_flipping=3,
                         target_hidden=8, examples_per_task=40, classes_per_task=2)


def draw(name: str, seed: int) -> tuple:
    """(problem, its tasks as a list) of the tiny problem `name` for one seed."""
    problem = PROBLEMS.get(name)(tiny_problem(name), DataConfig(), seed)
    return problem, list(problem.tasks)


@pytest.mark.parametrize("name", PROBLEMS.names())
def test_same_seed_gives_identical_tasks_and_another_seed_others(name):
    _, first = draw(name, 0)
    _, again = draw(name, 0)
    _, other = draw(name, 1)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
        assert torch.equal(a.test.x, b.test.x) and a.classes == b.classes
    assert any(not torch.equal(a.train.x, b.train.x) or not torch.equal(a.train.y, b.train.y)
               for a, b in zip(first, other))


@pytest.mark.parametrize("name", PROBLEMS.names())
def test_tasks_match_what_the_problem_says(name):
    cfg = tiny_problem(name)
    problem, tasks = draw(name, 0)
    assert len(tasks) == cfg.n_tasks
    assert [t.index for t in tasks] == list(range(cfg.n_tasks))
    assert problem.outputs >= 1
    for task in tasks:
        x, y = task.train.x, task.train.y
        assert len(x) > 0 and tuple(x.shape[1:]) == tuple(problem.input_shape)
        assert y.shape == (len(x),)  # one target (or label) per example
        assert torch.isfinite(x).all()
        if problem.regression:
            assert problem.outputs == 1 and y.is_floating_point() and torch.isfinite(y).all()
        else:
            assert not y.is_floating_point() and not y.is_complex()
            assert 0 <= int(y.min()) and int(y.max()) < problem.outputs
            assert set(y.tolist()) <= set(task.classes)
