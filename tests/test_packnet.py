"""PackNet: pruning picks the smallest weights, frozen weights never move, old tasks' outputs
are exactly what they were, and the owner maps partition the weights."""

from __future__ import annotations

import copy

import pytest
import torch

from engram.errors import ConfigError
from engram.methods.packnet import PackNet, PackNetEvalNet, prune_smallest
from engram.training import train_task
from tests.conftest import tiny_config
from tests.test_methods import _context

PRUNE = 0.75


def test_prune_frees_exactly_the_smallest_fraction_of_the_current_task():
    weight = torch.tensor([[0.50, -0.01, 0.30, -0.90],
                           [0.05, -0.20, 0.70, 0.02],
                           [-0.40, 0.60, -0.10, 0.80]])
    owner = torch.tensor([[2, 1, 2, 2],
                          [2, 2, 2, 1],
                          [2, 2, 2, 0]], dtype=torch.uint8)
    # Task 2 owns 9 weights; round(0.5 * 9) = 4 (Python rounds half to even) smallest |w|:
    # 0.05, 0.10, 0.20, 0.30. Task 1's tiny 0.01 and 0.02 and the free 0.80 are untouched.
    before = owner.clone()
    pruned = prune_smallest(weight, owner, task=2, fraction=0.5)
    assert torch.equal(owner, before)  # the input map is not modified
    expected = owner.clone()
    for row, col in [(1, 0), (2, 2), (1, 1), (0, 2)]:
        expected[row, col] = 0
    assert torch.equal(pruned, expected)
    # the same by sorting: the freed entries are the 4 smallest |w| of task 2's weights
    mine = (owner == 2).flatten()
    order = weight.flatten().abs()[mine].argsort()[:4]
    assert torch.equal(torch.nonzero(mine).flatten()[order].sort().values,
                       torch.nonzero((pruned != owner).flatten()).flatten())
    assert torch.equal(prune_smallest(weight, owner, 2, 0.05), owner)  # round(0.45) = 0: none


def test_prune_also_frees_ties_at_the_cutoff():
    weight = torch.tensor([0.1, -0.2, 0.2, 0.3, -0.2])
    owner = torch.ones(5, dtype=torch.uint8)
    # k = round(0.4 * 5) = 2: cutoff = 0.2, and all three weights with |w| = 0.2 go (`le`)
    expected = torch.tensor([0, 0, 0, 1, 0], dtype=torch.uint8)
    assert torch.equal(prune_smallest(weight, owner, 1, 0.4), expected)


@pytest.fixture(scope="module")
def task_incremental_run():
    """Three tasks of task-incremental split digits; snapshots after each task. Adam: its
    moments would move frozen or freed weights if PackNet got the gradients wrong."""
    ctx = _context(tiny_config(stream={"scenario": "task"},
                               train={"epochs": 3, "optimizer": "adam", "lr": 0.01}))
    method = PackNet(PackNet.Params(prune=PRUNE, retrain_fraction=0.5))
    prune_moments = []
    original_prune = method.prune

    def recording_prune(model):  # remember when the prune ran and what survived it
        original_prune(model)
        prune_moments.append((method.steps_done, method.prune_after,
                              copy.deepcopy(model.state_dict())))
    method.prune = recording_prune
    first_test = ctx.stream.tasks[0].test
    after = []
    for task in ctx.stream.tasks:
        ctx.task = task
        ctx.seen_tasks.append(task)
        train_task(ctx, method, lambda epoch, loss: None)
        with torch.no_grad():
            after.append({
                "params": {n: p.detach().clone() for n, p in ctx.model.named_parameters()},
                "owners": {n: o.clone() for n, o in method.owners.items()},
                "eval_logits": method.eval_model(ctx)(first_test.x, first_test.task),
                "live_logits": ctx.model(first_test.x, first_test.task),
            })
    return ctx, method, after, prune_moments


def test_weights_frozen_after_a_task_are_bit_identical_after_later_tasks(task_incremental_run):
    ctx, _, after, _ = task_incremental_run
    head_dim = ctx.model.head_dim
    for t in (0, 1):  # frozen at the end of task t + 1
        owners = after[t]["owners"]
        for later in after[t + 1:]:
            for name, owner in owners.items():
                frozen = (owner >= 1) & (owner <= t + 1)
                assert torch.equal(later["params"][name][frozen], after[t]["params"][name][frozen])
            rows = slice(0, (t + 1) * head_dim)  # heads of tasks 1..t+1
            for name in ("head.weight", "head.bias"):
                assert torch.equal(later["params"][name][rows], after[t]["params"][name][rows])
            for name in after[t]["params"]:
                if name.startswith("body.") and name not in owners:  # biases: frozen after task 1
                    assert torch.equal(later["params"][name], after[0]["params"][name])
    # ... while the weights task 2 owns did train during task 2 (the test can fail)
    for name, owner in after[1]["owners"].items():
        mine = owner == 2
        assert not torch.equal(after[1]["params"][name][mine], after[0]["params"][name][mine])


def test_task_incremental_outputs_of_task_one_do_not_move(task_incremental_run):
    _, _, after, _ = task_incremental_run
    assert torch.equal(after[0]["eval_logits"], after[1]["eval_logits"])
    assert torch.equal(after[0]["eval_logits"], after[2]["eval_logits"])
    # The live model, which also uses tasks 2 and 3's weights, does change on task 1:
    assert not torch.equal(after[0]["live_logits"], after[2]["live_logits"])
    # After task 1, the live model is exactly task 1's network (the pruned weights are 0).
    assert torch.equal(after[0]["eval_logits"], after[0]["live_logits"])


def test_owner_maps_partition_the_weights(task_incremental_run):
    ctx, method, after, _ = task_incremental_run
    for t, snapshot in enumerate(after, start=1):
        for name, owner in snapshot["owners"].items():
            assert owner.dtype == torch.uint8 and int(owner.max()) <= t
            if t > 1:  # ownership is permanent: a weight kept by an earlier task stays its own
                earlier = after[t - 2]["owners"][name]
                assert torch.equal(owner[earlier > 0], earlier[earlier > 0])
            free = owner == 0
            assert torch.all(snapshot["params"][name][free] == 0)  # freed weights are zero
            if t < len(after):  # pruned tasks keep 1 - PRUNE of what they got, ties aside
                got = int((after[t - 2]["owners"][name] == 0).sum()) if t > 1 else owner.numel()
                assert int((owner == t).sum()) <= got - round(PRUNE * got)
            else:  # the last task is not pruned: it takes every weight still free
                assert not free.any()
        if t == 1:  # random weights: no ties, so exactly round(PRUNE * n) freed
            for owner in snapshot["owners"].values():
                assert int((owner == 0).sum()) == round(PRUNE * owner.numel())
    assert method.extra_bytes() == sum(o.numel() for o in method.owners.values())
    assert method.extra_bytes() == 64 * 32  # one 8x8 -> 32 Linear in the tiny body, 1 byte each


def test_prune_runs_at_its_step_and_the_survivors_retrain(task_incremental_run):
    ctx, method, after, prune_moments = task_incremental_run
    assert len(prune_moments) == 2  # tasks 1 and 2; never the last task
    for t, (step, planned, at_prune) in enumerate(prune_moments):
        assert step == planned
        name = "body.1.weight"
        survivors = after[t]["owners"][name] == t + 1
        assert not torch.equal(at_prune[name][survivors], after[t]["params"][name][survivors])


def test_eval_net_uses_only_earlier_weights_per_example(task_incremental_run):
    ctx, method, _, _ = task_incremental_run
    test = [task.test for task in ctx.stream.tasks]
    x = torch.cat([test[0].x[:5], test[1].x[:5], test[2].x[:3]])
    task = torch.cat([test[0].task[:5], test[1].task[:5], test[2].task[:3]])
    logits = PackNetEvalNet(ctx.model, method.owners)(x, task)
    for t in range(3):  # by hand: a copy of the model with the weights of later tasks zeroed
        copy_t = copy.deepcopy(ctx.model)
        with torch.no_grad():
            for name, p in copy_t.named_parameters():
                if name in method.owners:
                    owner = method.owners[name]
                    p[(owner == 0) | (owner > t + 1)] = 0
        rows = task == t
        torch.testing.assert_close(logits[rows], copy_t(x[rows], task[rows]))


def test_task_incremental_gradient_reaches_only_the_current_tasks_head_rows():
    ctx = _context(tiny_config(stream={"scenario": "task"}))
    method = PackNet()
    ctx.task = ctx.stream.tasks[1]
    method.before_task(ctx)
    for p in ctx.model.parameters():
        p.grad = torch.ones_like(p)
    method.after_backward(ctx)
    k = ctx.model.head_dim
    expected = torch.zeros(ctx.model.n_heads * k)
    expected[k:2 * k] = 1  # task 2's rows
    assert torch.equal(ctx.model.head.bias.grad, expected)
    weight_grad = ctx.model.head.weight.grad  # (H * K, F)
    assert torch.equal(weight_grad, expected[:, None].expand_as(weight_grad))
    assert torch.all(ctx.model.body[1].bias.grad == 0)  # biases: task 1 only


@pytest.mark.parametrize("scenario", ["domain", "class"])
def test_without_task_ids_the_live_model_is_evaluated_and_the_head_is_shared(scenario):
    ctx = _context(tiny_config(stream={"scenario": scenario}))
    method = PackNet()
    heads = []
    for task in ctx.stream.tasks[:2]:
        ctx.task = task
        ctx.seen_tasks.append(task)
        train_task(ctx, method, lambda epoch, loss: None)
        assert method.eval_model(ctx) is ctx.model
        heads.append(ctx.model.head.weight.detach().clone())
    assert not torch.equal(heads[0], heads[1])  # task 2 trains the shared head


def test_weight_decay_is_refused():
    ctx = _context(tiny_config(train={"weight_decay": 1e-4}))
    ctx.task = ctx.stream.tasks[0]
    with pytest.raises(ConfigError, match="weight_decay.*frozen"):
        PackNet().prepare_model(ctx.model, ctx)
    with pytest.raises(ConfigError, match="weight_decay"):
        PackNet().before_task(ctx)
