"""Streams on the bundled digits: task contents, scenario targets, splits, determinism, errors."""

from __future__ import annotations

import pytest
import torch

from engram.config import DataConfig, StreamConfig
from engram.data import STREAMS, build_stream
from engram.data.sources import load_digits
from engram.data.streams import TensorSet, rotate_images
from engram.errors import ConfigError

N_DIGITS = 1797


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def build(source, seed=0, **kw):
    data_keys = {"source", "path", "test_fraction", "val_fraction", "limit"}
    data = DataConfig(**{k: v for k, v in kw.items() if k in data_keys})
    stream = StreamConfig(**{k: v for k, v in kw.items() if k not in data_keys})
    return build_stream(source, data, stream, seed)


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.reshape(len(x), -1)}


def all_sets(stream):
    for task in stream.tasks:
        yield task.train
        yield task.test
        if task.val is not None:
            yield task.val


# ----------------------------------------------------------------------------- split

@pytest.fixture(scope="module")
def split_class(digits):
    return build(digits, kind="split", scenario="class", n_tasks=5, classes_per_task=2,
                 test_fraction=0.2, val_fraction=0.1)


def test_split_class_il_tasks_and_targets(split_class, digits):
    s = split_class
    assert len(s) == 5 and s.scenario == "class"
    assert s.n_heads == 1 and s.head_dim == 10
    assert s.input_shape == (1, 8, 8)
    assert s.class_names == digits.class_names
    for i, task in enumerate(s.tasks):
        assert task.index == i
        assert task.classes == [2 * i, 2 * i + 1]
        assert task.name == f"{2 * i}/{2 * i + 1}"
        for part in (task.train, task.val, task.test):
            assert isinstance(part, TensorSet)
            assert sorted(torch.unique(part.y).tolist()) == [2 * i, 2 * i + 1]
            assert torch.all(part.task == i)
            assert part.x.shape[1:] == (1, 8, 8) and part.x.dtype == torch.float32
            assert part.y.dtype == torch.long


def test_digits_images_are_distinct(digits):
    """The row comparisons below rely on no two digits images being byte-identical."""
    assert len(rows(digits.x_train)) == N_DIGITS


def test_split_class_il_targets_equal_the_digit(split_class, digits):
    # Look every image up in the source: its class-IL target must be its digit label.
    label_of = {r.numpy().tobytes(): int(y)
                for r, y in zip(digits.x_train.reshape(N_DIGITS, -1), digits.y_train)}
    checked = 0
    for part in all_sets(split_class):
        for x, y in zip(part.x.reshape(len(part), -1), part.y):
            assert int(y) == label_of[x.numpy().tobytes()]
            checked += 1
    assert checked == N_DIGITS


def test_split_sizes_add_up_and_respect_fractions(split_class):
    s = split_class
    n_train = sum(len(t.train) for t in s.tasks)
    n_val = sum(len(t.val) for t in s.tasks)
    n_test = sum(len(t.test) for t in s.tasks)
    assert n_train + n_val + n_test == N_DIGITS
    assert n_test == round(N_DIGITS * 0.2)
    assert n_val == round((N_DIGITS - n_test) * 0.1)
    assert n_train == N_DIGITS - n_test - n_val


def test_split_has_no_example_in_two_splits(split_class, digits):
    train = torch.cat([t.train.x for t in split_class.tasks])
    val = torch.cat([t.val.x for t in split_class.tasks])
    test = torch.cat([t.test.x for t in split_class.tasks])
    r_train, r_val, r_test = rows(train), rows(val), rows(test)
    assert len(r_train) == len(train) and len(r_val) == len(val) and len(r_test) == len(test)
    assert not (r_train & r_test) and not (r_train & r_val) and not (r_val & r_test)
    assert r_train | r_val | r_test == rows(digits.x_train)


def test_no_val_split_when_fraction_is_zero(digits):
    s = build(digits, kind="split", val_fraction=0.0)
    assert all(t.val is None for t in s.tasks)


def test_limit_caps_the_training_pool(digits):
    s = build(digits, kind="split", limit=300, val_fraction=0.1)
    n_train = sum(len(t.train) for t in s.tasks)
    n_val = sum(len(t.val) for t in s.tasks)
    assert n_train + n_val == 300 and n_val == 30
    assert sum(len(t.test) for t in s.tasks) == round(N_DIGITS * 0.2)  # test is not limited


def test_split_task_il(digits):
    s = build(digits, kind="split", scenario="task", n_tasks=5)
    assert s.n_heads == 5 and s.head_dim == 2
    for i, task in enumerate(s.tasks):
        for part in (task.train, task.test):
            assert sorted(torch.unique(part.y).tolist()) == [0, 1]
            assert torch.all(part.task == i)


def test_split_domain_il(digits):
    s = build(digits, kind="split", scenario="domain", n_tasks=5)
    assert s.n_heads == 1 and s.head_dim == 2
    for i, task in enumerate(s.tasks):
        assert sorted(torch.unique(task.train.y).tolist()) == [0, 1]
        assert torch.all(task.train.task == i)


def test_scenarios_share_the_same_images(digits):
    """The scenario changes only targets: images and their order are the same."""
    a = build(digits, kind="split", scenario="class")
    b = build(digits, kind="split", scenario="task")
    for ta, tb in zip(a.tasks, b.tasks):
        assert torch.equal(ta.train.x, tb.train.x)
        assert torch.equal(ta.train.y - 2 * ta.index, tb.train.y)  # digit -> position in pair


def test_split_three_classes_per_task(digits):
    s = build(digits, kind="split", scenario="class", n_tasks=3, classes_per_task=3)
    assert [t.classes for t in s.tasks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert s.head_dim == 9
    assert not any(torch.any(t.test.y == 9) for t in s.tasks)


# ----------------------------------------------------------------------------- determinism

def test_same_seed_gives_identical_tensors(digits):
    a = build(digits, seed=3, kind="permuted", n_tasks=3, val_fraction=0.1)
    b = build(digits, seed=3, kind="permuted", n_tasks=3, val_fraction=0.1)
    for ta, tb in zip(a.tasks, b.tasks):
        for pa, pb in ((ta.train, tb.train), (ta.val, tb.val), (ta.test, tb.test)):
            assert all(torch.equal(u, v) for u, v in zip(pa, pb))


def test_different_seed_gives_a_different_split(digits):
    a = build(digits, seed=0, kind="split")
    b = build(digits, seed=1, kind="split")
    test_a = torch.cat([t.test.x for t in a.tasks])
    test_b = torch.cat([t.test.x for t in b.tasks])
    assert len(test_a) == len(test_b)
    assert rows(test_a) != rows(test_b)


# ----------------------------------------------------------------------------- permuted

@pytest.fixture(scope="module")
def permuted(digits):
    return build(digits, kind="permuted", scenario="class", n_tasks=5)


@pytest.fixture(scope="module")
def plain(digits):
    return build(digits, kind="split", scenario="class", n_tasks=1, classes_per_task=10)


def test_permuted_first_task_is_unpermuted(permuted, plain):
    assert torch.equal(permuted.tasks[0].train.x, plain.tasks[0].train.x)
    assert torch.equal(permuted.tasks[0].test.x, plain.tasks[0].test.x)


def test_permuted_tasks_permute_the_same_pixels(permuted):
    first = permuted.tasks[0].train.x.reshape(-1, 64)
    for task in permuted.tasks[1:]:
        x = task.train.x.reshape(-1, 64)
        assert not torch.equal(x, first)
        assert torch.equal(x.sort(dim=1).values, first.sort(dim=1).values)


def test_permuted_uses_one_permutation_per_task(permuted):
    # Recover each task's pixel permutation column by column and check that this one
    # permutation maps every image (some border pixels are always 0, so any match will do).
    first = permuted.tasks[0].train.x.reshape(-1, 64)
    perms = []
    for task in permuted.tasks[1:]:
        x = task.train.x.reshape(-1, 64)
        # column j of task t equals column perm[j] of task 1 for every image
        match = (x.T[:, None, :] == first.T[None, :, :]).all(dim=2)  # (64, 64)
        perm = [int(torch.nonzero(match[j])[0]) for j in range(64)]
        assert torch.equal(x, first[:, perm])
        perms.append(tuple(perm))
    assert len(set(perms)) == len(perms)  # permutations differ across tasks
    assert tuple(range(64)) not in perms


def test_permuted_class_il_targets(permuted, plain):
    assert permuted.head_dim == 50 and permuted.n_heads == 1
    digits_y = plain.tasks[0].train.y
    for t, task in enumerate(permuted.tasks):
        assert task.classes == list(range(10))
        assert task.name == f"perm {t + 1}"
        assert torch.equal(task.train.y, 10 * t + digits_y)


def test_permuted_task_and_domain_heads(digits):
    s = build(digits, kind="permuted", scenario="task", n_tasks=3)
    assert (s.n_heads, s.head_dim) == (3, 10)
    d = build(digits, kind="permuted", scenario="domain", n_tasks=3)
    assert (d.n_heads, d.head_dim) == (1, 10)
    assert torch.equal(d.tasks[2].train.y, d.tasks[0].train.y)


# ----------------------------------------------------------------------------- rotated

def test_rotate_by_zero_and_full_turns_is_identity():
    x = torch.rand(4, 2, 5, 7)
    for degrees in (0, 360, -720):
        out = rotate_images(x, degrees)
        assert torch.equal(out, x) and out is not x


def test_rotate_90_is_counterclockwise_like_rot90():
    """Positive degrees rotate counter-clockwise as displayed (row 0 at the top)."""
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    x[0, 0, 0, 0] = 100.0  # make it asymmetric under every rotation
    out = rotate_images(x, 90)
    assert torch.allclose(out, torch.rot90(x, 1, dims=(2, 3)), atol=1e-4)
    assert not torch.allclose(out, torch.rot90(x, -1, dims=(2, 3)), atol=1e-4)
    # the top-left corner moves to the bottom-left
    assert out[0, 0, 3, 0] == pytest.approx(100.0, abs=1e-4)
    assert torch.allclose(rotate_images(x, -90), torch.rot90(x, -1, dims=(2, 3)), atol=1e-4)
    assert torch.allclose(rotate_images(x, 180), torch.rot90(x, 2, dims=(2, 3)), atol=1e-4)


def test_rotate_90_multi_channel_batch():
    x = torch.rand(3, 2, 8, 8)
    assert torch.allclose(rotate_images(x, 90), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5)


def test_rotated_stream(digits, plain):
    s = build(digits, kind="rotated", scenario="domain", n_tasks=3, rotation_step=90)
    assert [t.name for t in s.tasks] == ["rot 0", "rot 90", "rot 180"]
    assert s.head_dim == 10 and s.n_heads == 1
    base = plain.tasks[0].train.x
    assert torch.equal(s.tasks[0].train.x, base)
    assert torch.allclose(s.tasks[1].train.x, torch.rot90(base, 1, dims=(2, 3)), atol=1e-5)
    assert torch.allclose(s.tasks[2].train.x, torch.rot90(base, 2, dims=(2, 3)), atol=1e-5)
    assert torch.equal(s.tasks[1].train.y, plain.tasks[0].train.y)


# ----------------------------------------------------------------------------- ab

def test_ab_two_halves(digits):
    s = build(digits, kind="ab", scenario="class")
    assert len(s) == 2 and s.head_dim == 10
    assert [t.classes for t in s.tasks] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert sorted(torch.unique(s.tasks[0].train.y).tolist()) == [0, 1, 2, 3, 4]
    assert sorted(torch.unique(s.tasks[1].train.y).tolist()) == [5, 6, 7, 8, 9]
    t = build(digits, kind="ab", scenario="task")
    assert (t.n_heads, t.head_dim) == (2, 5)
    assert sorted(torch.unique(t.tasks[1].test.y).tolist()) == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- errors

def test_split_needs_enough_classes(digits):
    with pytest.raises(ConfigError, match=r"stream\.n_tasks=6 x stream\.classes_per_task=2 "
                                          r"needs 12 classes but the dataset has 10"):
        build(digits, kind="split", n_tasks=6, classes_per_task=2)


def test_split_with_tiny_limit_names_the_empty_task(digits):
    # The groups come from the dataset's classes, not from the few kept training examples,
    # so a tiny limit leaves some task empty (and says which) instead of miscounting classes.
    with pytest.raises(ConfigError, match=r"^task \d \(\d/\d\) has no training examples; "
                                          r"raise data\.limit or lower stream\.n_tasks$"):
        build(digits, kind="split", limit=3)


def test_task_without_training_examples(digits):
    # one training example: "ab" still splits the ten digits 0-4 / 5-9, so one task is empty
    with pytest.raises(ConfigError, match=r"task [12] \((0/1/2/3/4|5/6/7/8/9)\) has no training "
                                          r"examples; raise data\.limit or lower stream\.n_tasks"):
        build(digits, kind="ab", limit=1)


@pytest.mark.parametrize("kind", STREAMS.names())
def test_empty_training_pool_is_a_config_error(digits, kind):
    # limit 1 with val_fraction 0.9: the single kept example goes to validation
    with pytest.raises(ConfigError, match=r"^task 1 \(.*\) has no training examples"):
        build(digits, kind=kind, limit=1, val_fraction=0.9, n_tasks=2)


def test_rotate_empty_batch():
    x = torch.zeros(0, 1, 8, 8)
    assert rotate_images(x, 30).shape == (0, 1, 8, 8)


# A limit of 20 with seed 0 keeps no training example of digit 2 (checked in the tests).
MISSING = {"limit": 20, "seed": 0}


def _train_digits(stream):
    return set(torch.cat([t.train.y for t in stream.tasks]).remainder(10).tolist())


@pytest.mark.parametrize("kind", ["permuted", "rotated"])
def test_limit_missing_a_class_keeps_every_target_valid(digits, kind, plain):
    """Regression: classes came from the limited training pool only, so the whole val/test
    pools of permuted/rotated held digits without a target (-1, which in class-IL became the
    previous task's last class, or an IndexError)."""
    s = build(digits, kind=kind, scenario="class", n_tasks=3, val_fraction=0.2, **MISSING)
    assert 2 not in _train_digits(s)  # the situation this test is about
    assert s.head_dim == 30
    test_digits = plain.tasks[0].test.y  # same seed, same test pool, unpermuted
    for t, task in enumerate(s.tasks):
        assert task.classes == list(range(10))
        assert torch.equal(task.test.y, 10 * t + test_digits)
        for part in (task.train, task.val, task.test):
            assert part.y.min() >= 10 * t and part.y.max() < 10 * (t + 1)
    d = build(digits, kind=kind, scenario="domain", n_tasks=2, **MISSING)
    assert d.head_dim == 10 and torch.equal(d.tasks[1].test.y, test_digits)


def test_limit_missing_a_class_keeps_the_split_groups(digits, split_class):
    """Regression: with digit 2 absent from the limited training pool the groups used to be
    recounted (an error: "needs 10 classes but the dataset has 9")."""
    s = build(digits, kind="split", scenario="class", n_tasks=5, **MISSING)
    assert 2 not in _train_digits(s)
    assert [t.classes for t in s.tasks] == [[2 * i, 2 * i + 1] for i in range(5)]
    assert s.head_dim == 10
    # the test pool is not limited: task 2 (2/3) is still tested on both digits
    assert sorted(torch.unique(s.tasks[1].test.y).tolist()) == [2, 3]
    assert sum(len(t.test) for t in s.tasks) == round(N_DIGITS * 0.2)


# ----------------------------------------------------------------------------- every stream

@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
@pytest.mark.parametrize("kind", STREAMS.names())
def test_every_stream_builds_under_every_scenario(digits, kind, scenario):
    s = build(digits, kind=kind, scenario=scenario, n_tasks=2, classes_per_task=2,
              limit=400, val_fraction=0.1)
    assert len(s) >= 2 and s.scenario == scenario
    assert s.n_heads == (len(s) if scenario == "task" else 1)
    assert s.head_dim >= 2
    for i, task in enumerate(s.tasks):
        assert task.index == i
        assert len(task.train) > 0 and len(task.test) > 0
        for part in (task.train, task.val, task.test):
            assert part.x.shape[1:] == s.input_shape
            assert len(part.x) == len(part.y) == len(part.task)
            assert part.y.min() >= 0 and part.y.max() < s.head_dim
            assert torch.all(part.task == i)
