"""Deep generative replay: the VAE's ELBO by hand, replayed samples labelled exactly by the
frozen previous solver (all three scenarios), the real/replay mix, the generator trained on
that mix and learning, no stored inputs, the memory bill and an exact resume."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

from engram.methods.base import _tensors
from engram.methods.generative_replay import VAE, GenerativeReplay, negative_elbo
from engram.training import train_task
from tests.conftest import tiny_config
from tests.test_methods import _context, _train_two_tasks


def _at_task(scenario: str, number: int, **params):
    """Context and method at the start of task `number` (1-based); no training before it."""
    ctx = _context(tiny_config(stream={"scenario": scenario}))
    method = GenerativeReplay(GenerativeReplay.Params(**params))
    for task in ctx.stream.tasks[:number]:
        ctx.task = task
        ctx.seen_tasks.append(task)
        method.before_task(ctx)
    return ctx, method


def _n_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_negative_elbo_matches_a_hand_computation():
    vae = VAE(n_inputs=2, hidden=1, latent=1)
    with torch.no_grad():
        vae.encoder[0].weight.copy_(torch.tensor([[1.0, -1.0]]))
        vae.encoder[0].bias.fill_(0.5)
        vae.to_mean.weight.fill_(2.0)
        vae.to_mean.bias.fill_(-0.3)
        vae.to_logvar.weight.fill_(-1.0)
        vae.to_logvar.bias.fill_(0.2)
        vae.decoder[0].weight.fill_(1.5)
        vae.decoder[0].bias.fill_(0.1)
        vae.decoder[2].weight.copy_(torch.tensor([[2.0], [-1.0]]))
        vae.decoder[2].bias.copy_(torch.tensor([0.0, 0.4]))
    rows = [(0.9, 0.2), (0.0, 1.0)]
    eps = [0.7, -1.2]

    def by_hand(x, e):
        h = max(0.0, x[0] - x[1] + 0.5)
        mu, logvar = 2.0 * h - 0.3, -h + 0.2
        z = mu + math.exp(logvar / 2) * e
        g = max(0.0, 1.5 * z + 0.1)
        p = [1 / (1 + math.exp(-(2.0 * g))), 1 / (1 + math.exp(-(-g + 0.4)))]
        recon = -sum(xi * math.log(pi) + (1 - xi) * math.log(1 - pi) for xi, pi in zip(x, p))
        kl = 0.5 * (mu**2 + math.exp(logvar) - 1 - logvar)
        return recon + kl

    expected = sum(by_hand(x, e) for x, e in zip(rows, eps)) / 2
    got = negative_elbo(vae, torch.tensor(rows).view(2, 1, 1, 2), torch.tensor(eps).view(2, 1))
    assert float(got.detach()) == pytest.approx(expected, rel=1e-5)


def test_the_vae_is_seeded_from_the_run_generator_not_the_global_one():
    vaes = []
    for global_seed in (1, 2):
        ctx = _context(tiny_config())
        ctx.task = ctx.stream.tasks[0]
        ctx.seen_tasks.append(ctx.task)
        method = GenerativeReplay()
        torch.manual_seed(global_seed)  # a different global state changes nothing
        global_state = torch.get_rng_state()
        method.before_task(ctx)
        assert torch.equal(torch.get_rng_state(), global_state)  # and is left untouched
        vaes.append(method.vae)
    for a, b in zip(vaes[0].parameters(), vaes[1].parameters()):
        assert torch.equal(a, b)


def _earlier_classes(ctx) -> list[int]:
    return sorted({int(c) for t in ctx.seen_tasks[:-1] for c in t.train.y})


def _at_third_task_with_varied_samples(scenario: str, **params):
    """At task 3 (two earlier tasks), the live model moved away from the frozen solver."""
    ctx, method = _at_task(scenario, 3, **params)
    frozen = copy.deepcopy(ctx.model)  # the solver at task 3's start
    with torch.no_grad():
        # An untrained VAE's samples all look alike; sharper, varied ones (and so varied
        # labels) make a labelling mistake visible.
        for p in method.old_vae.decoder.parameters():
            p.mul_(10.0)
        # The live model moves on; labels must still come from the frozen one.
        for p in ctx.model.parameters():
            p.add_(torch.randn_like(p))
    return ctx, method, frozen


def _replay_by_hand(ctx, method, frozen, state, n):
    """The same draws as the method (z, then task ids outside class-IL): x', task, the
    frozen solver's logits of the outputs that count (n, K) and the live model's (n, K)."""
    g = torch.Generator().set_state(state)
    z = torch.randn(n, method.params.latent_dim, generator=g)
    x = torch.sigmoid(method.old_vae.decode(z)).view(n, *ctx.stream.input_shape).detach()
    if ctx.stream.scenario == "class":
        with torch.no_grad():
            old = frozen(x)
        allowed = _earlier_classes(ctx)
        y = [max(allowed, key=lambda c: float(old[i, c])) for i in range(n)]
        owner = {int(c): t.index for t in ctx.seen_tasks[:-1] for c in t.train.y}
        return x, [owner[c] for c in y], old, ctx.model(x), y
    task = torch.randint(2, (n,), generator=g).tolist()
    if ctx.stream.scenario == "task":  # each sample's own earlier head, from all heads

        def pick(model):
            heads = model.head(model.features(x)).view(n, model.n_heads, model.head_dim)
            return torch.stack([heads[i, task[i]] for i in range(n)])
        with torch.no_grad():
            old = pick(frozen)
        return x, task, old, pick(ctx.model), old.argmax(dim=1).tolist()
    with torch.no_grad():
        old = frozen(x)
    return x, task, old, ctx.model(x), old.argmax(dim=1).tolist()


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, F.multi_margin_loss])
@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
def test_replayed_samples_are_labelled_by_the_frozen_previous_solver(scenario, loss_fn):
    """The replay loss is the problem's own classification loss (ctx.loss_fn) against the
    frozen solver's labels."""
    ctx, method, frozen = _at_third_task_with_varied_samples(scenario, replay_batch_size=20)
    ctx.loss_fn = loss_fn
    state = ctx.generator.get_state()
    penalty = method.penalty(ctx)
    x, task, _, new, y = _replay_by_hand(ctx, method, frozen, state, 20)
    torch.testing.assert_close(method._replay_x, x)  # the generator trains on these next
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert len(set(y)) > 1  # varied labels, so a wrong labeller would show
    assert set(task) <= {0, 1}
    if scenario == "class":  # only classes of earlier tasks, though the head has more
        assert set(y) <= set(_earlier_classes(ctx))
    # r = 1/t = 1/3 at task 3: weight (1 - r) / r = 2, on the CE over the whole head
    expected = 2.0 * loss_fn(new, torch.tensor(y))
    torch.testing.assert_close(penalty, expected)
    ctx.generator.set_state(state)
    method.generate(20, ctx)  # previous_outputs draws after z, as in penalty
    old_logits, tags = method.previous_outputs(x, ctx)
    assert old_logits.argmax(dim=1).tolist() == y
    assert tags.tolist() == task


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_soft_targets_distil_the_frozen_solver_with_zeros_on_unlearnt_classes(scenario):
    ctx, method, frozen = _at_third_task_with_varied_samples(
        scenario, replay_batch_size=12, soft=True, temperature=3.0, real_fraction=0.25)
    state = ctx.generator.get_state()
    penalty = method.penalty(ctx)
    _, _, old, new, _ = _replay_by_hand(ctx, method, frozen, state, 12)
    if scenario == "class":  # softmax over earlier classes only, zero-padded to every column
        allowed = _earlier_classes(ctx)
        targets = torch.zeros_like(old)
        targets[:, allowed] = F.softmax(old[:, allowed] / 3.0, dim=1)
    else:
        targets = F.softmax(old / 3.0, dim=1)
    expected = 3.0 * -(targets * F.log_softmax(new / 3.0, dim=1)).sum(1).mean()  # (1-r)/r = 3
    torch.testing.assert_close(penalty, expected)


def test_no_replay_on_the_first_task_and_r_is_one_over_t_by_default():
    ctx, method = _at_task("class", 1)
    assert method.penalty(ctx) is None  # no previous generator yet
    ctx, method = _at_task("class", 3)
    assert method.real_fraction() == pytest.approx(1 / 3)
    ctx, method = _at_task("class", 3, real_fraction=0.5)
    assert method.real_fraction() == 0.5


def test_replay_changes_the_solver_gradient():
    ctx, method = _at_task("class", 2)
    real = type(ctx.task.train)(*(p[:16] for p in ctx.task.train))
    params = list(ctx.model.parameters())
    real_loss = F.cross_entropy(ctx.model(real.x), real.y)
    without = torch.autograd.grad(real_loss, params, retain_graph=True)
    with_replay = torch.autograd.grad(real_loss + method.penalty(ctx), params)
    flat = lambda grads: torch.cat([g.reshape(-1) for g in grads])  # noqa: E731
    assert not torch.allclose(flat(without), flat(with_replay))


def test_generator_step_is_on_the_weighted_mix_of_real_and_replayed_inputs():
    ctx, method = _at_task("domain", 2, replay_batch_size=6)
    real = type(ctx.task.train)(*(p[:10] for p in ctx.task.train))
    method.penalty(ctx)
    replayed = method._replay_x
    before = copy.deepcopy(method.vae)
    state = ctx.generator.get_state()
    method.after_step(real, ctx)
    eps = torch.randn(16, method.params.latent_dim, generator=torch.Generator().set_state(state))
    expected = (0.5 * negative_elbo(before, real.x, eps[:10])
                + 0.5 * negative_elbo(before, replayed, eps[10:]))
    torch.testing.assert_close(method.vae_loss, expected.detach())  # r = 1/2 at task 2
    assert not torch.equal(before.decoder[0].weight, method.vae.decoder[0].weight)  # it stepped
    assert method._replay_x is None
    assert not any(p.requires_grad for p in method.old_vae.parameters())  # frozen copy


def test_generator_loss_goes_down_while_training_a_task():
    ctx = _context(tiny_config(train={"epochs": 6, "batch_size": 32, "lr": 0.05}))
    method = GenerativeReplay()
    ctx.task = ctx.stream.tasks[0]
    ctx.seen_tasks.append(ctx.task)
    method.before_task(ctx)
    x = ctx.task.train.x
    eps = torch.randn(len(x), method.params.latent_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = float(negative_elbo(method.vae, x, eps))
    train_task(ctx, method, lambda epoch, loss: None)
    with torch.no_grad():
        after = float(negative_elbo(method.vae, x, eps))
    assert after < 0.8 * before


def test_stores_no_training_inputs_and_bills_the_three_networks():
    ctx, method, _, _ = _train_two_tasks("generative_replay")
    state = method.state_dict()
    stored = list(_tensors(state))
    flat_inputs = torch.cat([t.train.x.flatten(1) for t in ctx.stream.tasks])  # (N, D)
    d = flat_inputs.shape[1]
    for t in stored:
        assert tuple(t.shape[1:]) != tuple(ctx.stream.input_shape)  # no image batches
        if t.dim() >= 1 and t.shape[-1] == d:  # e.g. the encoder's (hidden, D) weight
            rows = t.reshape(-1, d).float()
            assert torch.cdist(rows, flat_inputs).min() > 1e-6  # no row is a training input
    vae_bytes = _n_bytes(method.vae.parameters())
    model_bytes = _n_bytes(ctx.model.parameters())
    table_bytes = _n_bytes([method.old_columns, method.column_task])
    assert method.extra_bytes() == 2 * vae_bytes + model_bytes + table_bytes


def test_resume_from_the_state_dict_continues_identically():
    ctx, method, _, _ = _train_two_tasks("generative_replay", scenario="task")
    saved = io.BytesIO()
    torch.save({"model": ctx.model.state_dict(), "method": method.state_dict(),
                "generator": ctx.generator.get_state()}, saved)
    third = ctx.stream.tasks[2]

    def finish(ctx, method):
        ctx.task = third
        ctx.seen_tasks = list(ctx.stream.tasks[:3])
        train_task(ctx, method, lambda epoch, loss: None)
        trained = list(ctx.model.parameters()) + list(method.vae.parameters())
        return [p.detach().clone() for p in trained]

    uninterrupted = finish(ctx, method)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed_ctx = _context(tiny_config(stream={"scenario": "task"}))
    resumed_ctx.model.load_state_dict(state["model"])
    resumed_ctx.generator.set_state(state["generator"])
    resumed = GenerativeReplay(method.params)
    resumed.load_state_dict(state["method"])
    for a, b in zip(finish(resumed_ctx, resumed), uninterrupted, strict=True):
        assert torch.equal(a, b)
