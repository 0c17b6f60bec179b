"""ER-ACE (Caccia et al. 2022): the incoming batch's loss is a hand-computed cross-entropy
over the classes it may compete with (seen-but-absent ones masked), the full cross-entropy in
task/domain-IL, the memory batch a separate full cross-entropy, the state survives a
weights-only checkpoint, the runner trains on the masked loss, and compose refuses two
methods that each replace the loss."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engram.config import TrainConfig, parse_method
from engram.data.streams import TensorSet
from engram.errors import ConfigError
from engram.methods.base import Context
from engram.methods.compose import Compose, ComposeParams
from engram.methods.er_ace import ERACE
from engram.methods.replay import ReplayParams
from engram.models.nets import ContinualNet


def make_ctx(scenario: str = "class", model=None, seed: int = 0, transform=None,
             task_index: int = 1) -> Context:
    """A Context in the second task (ER-ACE masks and replays from the second task on)."""
    return Context(model=model, stream=SimpleNamespace(scenario=scenario),
                   train_cfg=TrainConfig(batch_size=4), transform=transform,
                   generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"),
                   task=SimpleNamespace(index=task_index))


def test_the_first_task_neither_masks_nor_replays():
    """As the authors' and Mammoth's code: masking and the memory loss start with task 2."""
    ace, ctx = ERACE(ReplayParams(memory=20)), make_ctx(model=small_net(), task_index=0)
    ace.after_step(labelled([0, 1, 0, 1]), ctx)
    batch, outputs = labelled([1, 1]), torch.randn(2, 6)
    assert torch.equal(ace.batch_loss(outputs, batch, ctx), F.cross_entropy(outputs, batch.y))
    assert ace.penalty(ctx) is None
    ctx.task = SimpleNamespace(index=1)
    assert not torch.equal(ace.batch_loss(outputs, batch, ctx), F.cross_entropy(outputs, batch.y))
    assert ace.penalty(ctx) is not None


def test_the_largest_seen_class_is_never_masked():
    ace, ctx = ERACE(ReplayParams(memory=20)), make_ctx()
    ace.after_step(labelled([0, 1, 2, 3]), ctx)
    assert ace.absent_classes(labelled([2, 2])).tolist() == [0, 1]  # 3 is the largest seen
    assert ace.absent_classes(labelled([3])).tolist() == [0, 1, 2]


def labelled(labels: list[int]) -> TensorSet:
    n = len(labels)
    return TensorSet(torch.randn(n, 1, 2, 2), torch.tensor(labels), torch.zeros(n, dtype=torch.long))


def hand_ce(outputs: torch.Tensor, labels: torch.Tensor, allowed: list[int]) -> float:
    """Mean over rows of -z_y + log sum_{c in allowed} exp z_c, one example at a time."""
    total = 0.0
    for z, y in zip(outputs.tolist(), labels.tolist()):
        total += -z[y] + math.log(sum(math.exp(z[c]) for c in allowed))
    return total / len(labels)


def test_incoming_loss_masks_the_seen_classes_absent_from_the_batch():
    ace, ctx = ERACE(ReplayParams(memory=20)), make_ctx()
    ace.after_step(labelled([0, 1, 2, 3, 0, 1]), ctx)  # task 1 and 2 classes seen: 0..3
    batch = labelled([2, 3, 3, 2])
    outputs = torch.randn(4, 6)
    outputs[:, :2] += 8.0  # old classes 0 and 1 dominate the softmax
    loss = ace.batch_loss(outputs, batch, ctx)
    # 2, 3 present; 4, 5 never seen, so they stay in the softmax (the authors' code)
    assert abs(float(loss) - hand_ce(outputs, batch.y, [2, 3, 4, 5])) < 1e-5
    full = F.cross_entropy(outputs, batch.y)
    assert float(full) > float(loss) + 5  # the full CE would push classes 0 and 1 down
    # the masked columns get no gradient
    outputs.requires_grad_(True)
    ace.batch_loss(outputs, batch, ctx).backward()
    assert torch.equal(outputs.grad[:, :2], torch.zeros(4, 2))
    assert outputs.grad[:, 4:].abs().sum() > 0


def test_task_and_domain_incremental_train_on_the_full_cross_entropy():
    for scenario in ("task", "domain"):
        ace, ctx = ERACE(ReplayParams(memory=20)), make_ctx(scenario)
        ace.after_step(labelled([0, 1, 2]), ctx)
        batch, outputs = labelled([2, 2]), torch.randn(2, 3)
        assert torch.equal(ace.batch_loss(outputs, batch, ctx), F.cross_entropy(outputs, batch.y))


def small_net() -> ContinualNet:
    torch.manual_seed(0)
    return ContinualNet(nn.Flatten(), 4, 1, 6)


def test_memory_batch_is_a_separate_full_cross_entropy_on_augmented_inputs():
    model = small_net()
    shift = lambda x, generator: x * 2.0  # noqa: E731
    ace, ctx = ERACE(ReplayParams(memory=8)), make_ctx(model=model, seed=4, transform=shift)
    assert ace.penalty(ctx) is None  # nothing remembered yet
    batch = labelled([0, 1, 2, 3, 4, 5])
    assert ace.make_batch(batch, ctx) is batch  # nothing mixed into the step's batch
    ace.after_step(batch, ctx)
    state = ctx.generator.get_state()
    value = ace.penalty(ctx)
    ctx.generator.set_state(state)
    pick = torch.randint(6, (4,), generator=ctx.generator)
    x, y, task = (part[pick] for part in ace.buffer)
    with torch.no_grad():
        hand = hand_ce(model(x * 2.0, task), y, list(range(6)))  # every class: no mask
    assert abs(float(value.detach()) - hand) < 1e-5


def test_state_round_trips_through_a_weights_only_checkpoint():
    ace, ctx = ERACE(ReplayParams(memory=5)), make_ctx()
    ace.after_step(labelled([0, 1, 1, 4, 0, 1, 4]), ctx)
    saved = io.BytesIO()
    torch.save(ace.state_dict(), saved)
    saved.seek(0)
    restored = ERACE(ReplayParams(memory=5))
    restored.load_state_dict(torch.load(saved, weights_only=True))
    assert restored.seen_classes.tolist() == [0, 1, 4] and restored.n_seen == 7
    assert all(torch.equal(a, b) for a, b in zip(ace.buffer, restored.buffer))
    outputs, batch = torch.randn(3, 6), labelled([1, 1, 2])
    assert torch.equal(ace.batch_loss(outputs, batch, ctx), restored.batch_loss(outputs, batch, ctx))


def test_the_runner_trains_on_the_masked_loss_and_records_the_full_one():
    from engram.training import train_task

    model = small_net()
    ace = ERACE(ReplayParams(memory=4))
    ace.seen_classes = torch.tensor([0, 1])  # an earlier task's classes; nothing in memory
    data = labelled([2, 3, 2, 3])
    ctx = make_ctx(model=model)
    ctx.task = SimpleNamespace(train=data, index=1, name="2/3")
    ctx.train_cfg = TrainConfig(batch_size=4, epochs=1, lr=1.0, optimizer="sgd")
    with torch.no_grad():
        full = float(F.cross_entropy(model(data.x), data.y))
    bias = model.head.bias.detach().clone()
    recorded = []
    train_task(ctx, ace, lambda epoch, loss: recorded.append(loss))
    assert abs(recorded[0] - full) < 1e-5  # the recorded loss is the problem's
    moved = model.head.bias.detach() - bias
    assert torch.equal(moved[:2], torch.zeros(2))  # masked classes 0, 1: no gradient
    assert (moved[2:4] > 0).all() and (moved[4:] < 0).all()  # present up, unseen down


def test_compose_refuses_two_methods_that_each_replace_the_loss():
    specs = [parse_method("er_ace", {}, "test"), parse_method("er_ace", {"memory": 10}, "test")]
    with pytest.raises(ConfigError, match="replace the training loss"):
        Compose(ComposeParams(methods=specs))
    one = Compose(ComposeParams(methods=[specs[0], parse_method("ewc", {}, "test")]))
    assert one.replaces_loss
    ctx = make_ctx()
    one.parts[0].after_step(labelled([0, 1]), ctx)
    outputs, batch = torch.randn(2, 4), labelled([2, 2])
    assert torch.equal(one.batch_loss(outputs, batch, ctx), one.parts[0].batch_loss(outputs, batch, ctx))
