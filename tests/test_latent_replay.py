"""Latent replay (REMIND-style): the product quantiser against hand-made codebooks and a
brute-force nearest-centroid loop, k-means on separated clusters, the frozen lower part G
staying bit-identical, the replay penalty against a by-hand cross-entropy on decoded
features, the memory bill against its arithmetic, and the state a checkpoint carries."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from engram.errors import ConfigError
from engram.methods.latent_replay import (LatentReplay, LatentReplayParams, block_cut,
                                          fit_codebooks, pq_decode, pq_encode)
from engram.training import train_task
from tests.conftest import tiny_config
from tests.test_methods import _context

# ----------------------------------------------------------------------------- quantiser


def hand_codebooks() -> torch.Tensor:
    """M = 2 subspaces, K = 3 centroids of s = 2 floats each: (2, 3, 2)."""
    return torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]],
                         [[2.0, 2.0], [-1.0, -1.0], [3.0, 0.5]]])


def test_vectors_made_of_codebook_entries_encode_to_their_codes_and_decode_exactly():
    codebooks = hand_codebooks()
    codes = torch.tensor([[0, 0], [1, 2], [2, 1], [2, 2], [1, 0]], dtype=torch.uint8)
    vectors = torch.stack([torch.cat([codebooks[0, a], codebooks[1, b]])
                           for a, b in codes.tolist()])
    assert vectors[1].tolist() == [1.0, 0.0, 3.0, 0.5]  # centroid 1 of m=0, centroid 2 of m=1
    encoded = pq_encode(vectors, codebooks)
    assert encoded.dtype == torch.uint8 and torch.equal(encoded, codes)
    assert torch.equal(pq_decode(codes, codebooks), vectors)


def test_each_code_is_the_nearest_centroid_of_its_subspace_by_brute_force():
    g = torch.Generator().manual_seed(0)
    m, k, s, n = 4, 7, 3, 50
    codebooks = torch.randn(m, k, s, generator=g)
    vectors = torch.randn(n, m * s, generator=g)
    codes = pq_encode(vectors, codebooks)
    for i in range(n):
        for sub in range(m):
            piece = vectors[i, sub * s:(sub + 1) * s]
            distances = [float(((piece - codebooks[sub, c]) ** 2).sum()) for c in range(k)]
            chosen = distances[int(codes[i, sub])]
            assert chosen == pytest.approx(min(distances), abs=1e-5)
            assert int(codes[i, sub]) == distances.index(min(distances))  # no near-ties here
    decoded = pq_decode(codes, codebooks)
    assert torch.equal(decoded[3, s:2 * s], codebooks[1, codes[3, 1].long()])


def test_kmeans_finds_separated_cluster_centres_in_every_subspace():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]],
                            [[-5.0, 5.0], [5.0, 5.0], [20.0, -3.0]]])  # (M=2, 3, 2)
    n = 300
    which = torch.randint(3, (n, 2), generator=g)
    vectors = torch.cat([centres[0, which[:, 0]], centres[1, which[:, 1]]], dim=1)
    vectors = vectors + 0.1 * torch.randn(n, 4, generator=g)
    codebooks = fit_codebooks(vectors, 2, 3, 20, torch.Generator().manual_seed(0))
    assert codebooks.shape == (2, 3, 2)
    for sub in range(2):
        found = sorted(codebooks[sub].tolist())
        truth = sorted(centres[sub].tolist())
        for a, b in zip(found, truth):
            assert a == pytest.approx(b, abs=0.05)
        # each centroid is the mean of the vectors it wins (a fixed point of Lloyd)
        codes = pq_encode(vectors, codebooks)[:, sub].long()
        for c in range(3):
            mine = vectors[codes == c, sub * 2:(sub + 1) * 2]
            torch.testing.assert_close(codebooks[sub, c], mine.mean(0))


def test_kmeans_with_fewer_vectors_than_centroids_keeps_every_vector_exact():
    vectors = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    codebooks = fit_codebooks(vectors, 3, 8, 5, torch.Generator().manual_seed(0))
    assert codebooks.shape == (3, 8, 2)
    torch.testing.assert_close(pq_decode(pq_encode(vectors, codebooks), codebooks), vectors)


# ----------------------------------------------------------------------------- the method


def trained(scenario="class", model=None, train=None, tasks=3, **params):
    """A method trained through `tasks` tasks of a tiny stream; G snapshots after each task."""
    cfg = tiny_config(stream={"scenario": scenario},
                      model=model or {"kind": "mlp", "hidden": [32, 16]},
                      train={"epochs": 2, "batch_size": 16, "optimizer": "adam", "lr": 0.01,
                             **(train or {})})
    ctx = _context(cfg)
    method = LatentReplay(LatentReplayParams(**{"memory": 300, "subvectors": 8,
                                                "codebook_size": 16, **params}))
    ctx.model = method.prepare_model(ctx.model, ctx)
    snapshots = []  # the whole model's weights after each task
    for task in ctx.stream.tasks[:tasks]:
        ctx.task = task
        ctx.seen_tasks.append(task)
        train_task(ctx, method, lambda epoch, loss: None)
        snapshots.append({k: v.clone() for k, v in ctx.model.state_dict().items()})
    return ctx, method, snapshots


@pytest.mark.parametrize("model, train", [
    ({"kind": "mlp", "hidden": [32, 16]}, {}),
    # SGD with momentum and weight decay: frozen weights must not decay either
    ({"kind": "cnn", "channels": [4, 4]},
     {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.01}),
])
def test_lower_part_is_bit_identical_after_the_base_task_and_upper_part_learns(model, train):
    ctx, method, snapshots = trained(model=model, train=train)
    lower = ["body." + name for name in method.lower(ctx.model).state_dict()]
    assert lower == (["body.0.weight", "body.0.bias"] if model["kind"] == "cnn"
                     else ["body.1.weight", "body.1.bias"])
    upper = [name for name in snapshots[0] if name not in lower]
    for before, after in zip(snapshots[:-1], snapshots[1:]):  # tasks 1 -> 2, 2 -> 3
        for name in lower:
            assert torch.equal(snapshots[0][name], after[name]), name
        assert all(not torch.equal(before[name], after[name]) for name in upper)
    assert method.store.n_filled == min(300, sum(len(t.train) for t in ctx.stream.tasks))


def test_cut_follows_frozen_layers_and_bad_settings_are_config_errors():
    ctx = _context(tiny_config(model={"kind": "mlp", "hidden": [32, 16]}))
    body = ctx.model.body  # Flatten, Linear, ReLU, Linear, ReLU
    assert [block_cut(body, k) for k in range(3)] == [1, 3, 5]
    with pytest.raises(ConfigError, match="frozen_layers=3"):
        block_cut(body, 3)
    with pytest.raises(ConfigError, match="subvectors=5 does not divide the 32"):
        LatentReplay(LatentReplayParams(subvectors=5)).prepare_model(ctx.model, ctx)
    LatentReplay(LatentReplayParams(frozen_layers=2, subvectors=16)).prepare_model(ctx.model, ctx)


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, F.multi_margin_loss])
@pytest.mark.parametrize("scenario", ["task", "class"])
def test_penalty_is_cross_entropy_of_the_upper_part_on_decoded_features(scenario, loss_fn):
    """...or whatever classification loss the problem trains with (ctx.loss_fn)."""
    ctx, method, _ = trained(scenario, tasks=2)
    ctx.loss_fn = loss_fn
    model = ctx.model
    state = ctx.generator.get_state()
    penalty = method.penalty(ctx)
    ctx.generator.set_state(state)
    pick = torch.randint(method.store.n_filled, (16,), generator=ctx.generator)  # batch_size
    codes, y, task = (part[pick] for part in method.store.buffer)
    # decode by hand: subspace m of example i is codebooks[m, codes[i, m]]
    z = torch.stack([torch.cat([method.codebooks[m, int(codes[i, m])] for m in range(8)])
                     for i in range(16)])  # (16, 32): G's features, the first Linear's width
    hidden = torch.relu(F.linear(z, model.body[3].weight, model.body[3].bias))  # F's Linear
    logits = F.linear(hidden, model.head.weight, model.head.bias)
    if scenario == "task":  # each replayed example uses the head of its own task
        logits = logits.view(16, model.n_heads, model.head_dim)[torch.arange(16), task.long()]
    expected = loss_fn(logits, y.long())
    torch.testing.assert_close(penalty, expected)
    assert torch.isin(y.long(), torch.cat([t.train.y for t in ctx.stream.tasks[:2]])).all()

    # the penalty's gradient reaches F; G is frozen (the optimizer skips it: no gradient)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(trainable) == ["body.3.bias", "body.3.weight", "head.bias", "head.weight"]
    grads = dict(zip(trainable, torch.autograd.grad(penalty, list(trainable.values()),
                                                    retain_graph=True)))
    assert grads["body.3.weight"].abs().sum() > 0 and grads["head.weight"].abs().sum() > 0
    # and it changes the gradient of the step's loss (the current batch alone vs with replay)
    batch = ctx.stream.tasks[1].train
    current = F.cross_entropy(model(batch.x[:16], batch.task[:16]), batch.y[:16])
    alone = torch.autograd.grad(current, [model.head.weight], retain_graph=True)[0]
    mixed = torch.autograd.grad(current + penalty, [model.head.weight])[0]
    torch.testing.assert_close(mixed - alone, grads["head.weight"])
    assert (mixed - alone).abs().max() > 1e-4


def test_no_penalty_before_the_base_task_ends():
    ctx = _context(tiny_config())
    method = LatentReplay(LatentReplayParams(subvectors=8))
    ctx.task = ctx.stream.tasks[0]
    state = ctx.generator.get_state()
    assert method.penalty(ctx) is None and method.extra_bytes() == 0
    assert torch.equal(ctx.generator.get_state(), state)


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_extra_bytes_is_codes_labels_and_codebooks(policy):
    ctx, method, _ = trained(tasks=3, memory=100, policy=policy)
    n, m, k, d = 100, 8, 16, 32  # memory full; G's output is the first hidden layer (32)
    assert method.store.n_filled == n
    assert method.extra_bytes() == n * m + n * 2 * 2 + m * k * (d // m) * 4
    if policy == "class_balanced":  # 6 classes seen, equal shares of the memory
        counts = torch.bincount(method.store.buffer.y.long())
        assert len(counts) == 6 and counts.min() >= 16 and counts.max() <= 18  # reservoir: ~8..28


def test_state_round_trip_continues_identically():
    ctx, method, _ = trained(tasks=2, memory=200)
    saved = io.BytesIO()
    torch.save(method.state_dict(), saved)
    saved.seek(0)
    copy = LatentReplay(method.params)
    copy.load_state_dict(torch.load(saved, weights_only=True))
    assert copy.store.n_filled == method.store.n_filled < 200  # the filled part only was saved
    ctx.task = ctx.stream.tasks[2]
    state = ctx.generator.get_state()
    method.after_task(ctx)
    ctx.generator.set_state(state)
    copy.after_task(ctx)
    for a, b in zip(method.store.buffer, copy.store.buffer):
        assert torch.equal(a, b)
    assert method.extra_bytes() == copy.extra_bytes()


@pytest.mark.parametrize("quantise_live", [True, False])
def test_live_forward_passes_quantise_g_output_only_after_the_base_task(quantise_live):
    cfg = tiny_config(model={"kind": "mlp", "hidden": [32, 16]})
    ctx = _context(cfg)
    method = LatentReplay(LatentReplayParams(codebook_size=4, quantise_live=quantise_live))
    ctx.model = method.prepare_model(ctx.model, ctx)
    model, x = ctx.model, ctx.stream.tasks[1].test.x[:20]
    task = torch.zeros(20, dtype=torch.long)
    with torch.no_grad():
        by_hand = F.linear(torch.relu(F.linear(torch.relu(
            F.linear(x.flatten(1), model.body[1].weight, model.body[1].bias)),
            model.body[3].weight, model.body[3].bias)), model.head.weight, model.head.bias)
        torch.testing.assert_close(model(x), by_hand)  # no quantiser yet: the plain network
        ctx.task = ctx.stream.tasks[0]
        method.after_task(ctx)  # fits the quantiser
        assert method.codebooks.shape == (8, 4, 4)  # default M: sub-vectors of 4 of d = 32
        features = method.lower_features(model, x).flatten(1)  # exact, the hook bypassed
        torch.testing.assert_close(features, torch.relu(F.linear(
            x.flatten(1), model.body[1].weight, model.body[1].bias)))
        quantised = pq_decode(pq_encode(features, method.codebooks), method.codebooks)
        assert not torch.allclose(quantised, features)  # 4 centroids cannot be exact
        through_f = method.upper_logits(model, quantised if quantise_live else features, task)
        torch.testing.assert_close(model(x), through_f)


def test_copying_the_model_does_not_copy_the_method():
    """LwF and snapshots deep-copy the model; the quantising hook must not drag the method's
    codes and codebooks along (an unbilled second copy)."""
    import copy
    import gc

    ctx, method, _ = trained()

    def alive() -> int:
        gc.collect()
        return sum(type(obj) is LatentReplay for obj in gc.get_objects())

    before = alive()
    clone = copy.deepcopy(ctx.model)
    assert alive() == before
    x = ctx.stream.tasks[0].test.x[:4]
    with torch.no_grad():  # the copy still quantises through the one method
        torch.testing.assert_close(clone.body(x), ctx.model.body(x))
