"""DER and DER++ (Buzzega et al. 2020): the stored logits are the network's at storing time,
the memory is replay's reservoir, the logit term's gradient is the hand-derived MSE gradient,
the beta term is a hand-computed cross-entropy on each example's own head, augmentation reaches
the memory batch, and the state survives a weights-only checkpoint."""

from __future__ import annotations

import io

import torch
from torch import nn

from engram.config import TrainConfig
from engram.data.streams import TensorSet
from engram.methods.base import Context
from engram.methods.der import DER, DERParams, DERpp, DERppParams
from engram.methods.replay import Replay, ReplayParams
from engram.models.nets import ContinualNet


def make_net(n_heads: int = 1, head_dim: int = 3, seed: int = 0) -> ContinualNet:
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.5))
    return ContinualNet(body, 5, n_heads, head_dim)


def make_ctx(model, seed: int = 0, batch_size: int = 4, transform=None) -> Context:
    return Context(model=model, stream=None, train_cfg=TrainConfig(batch_size=batch_size),
                   generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"),
                   transform=transform)


def examples(n: int, n_tasks: int = 1, head_dim: int = 3, seed: int = 1) -> TensorSet:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 2, 2, generator=g)
    return TensorSet(x, torch.randint(head_dim, (n,), generator=g),
                     torch.randint(n_tasks, (n,), generator=g))


def eval_logits(model, x):
    model.eval()
    with torch.no_grad():
        out = model.all_logits(x)
    model.train()
    return out


def test_stored_logits_are_the_networks_logits_when_stored_and_stay_put():
    model = make_net(n_heads=2)
    ctx = make_ctx(model)
    der = DER(DERParams(memory=10))
    first, second = examples(6, n_tasks=2), examples(4, n_tasks=2, seed=2)
    der.after_step(first, ctx)
    assert model.training  # restored after the eval-mode pass
    expected_first = eval_logits(model, first.x)  # (6, 2 heads * 3): every head's logits
    assert der.logits.shape == (10, 6)
    assert torch.allclose(der.logits[:6], expected_first)
    with torch.no_grad():  # the network moves on; the logits stored earlier do not
        for p in model.parameters():
            p.add_(0.5)
    der.after_step(second, ctx)
    assert torch.allclose(der.logits[:6], expected_first)
    assert torch.allclose(der.logits[6:10], eval_logits(model, second.x))
    assert not torch.allclose(eval_logits(model, first.x), expected_first)


def test_memory_is_replays_reservoir_and_each_slot_keeps_its_own_logits():
    model = make_net()
    der, replay = DER(DERParams(memory=7)), Replay(ReplayParams(memory=7))
    ctx_der, ctx_replay = make_ctx(model, seed=5), make_ctx(None, seed=5)
    for seed in range(8):  # 8 batches of 5: the reservoir replaces slots after the 2nd
        batch = examples(5, seed=seed)
        der.after_step(batch, ctx_der)
        replay.after_step(batch, ctx_replay)
    assert der.n_seen == replay.n_seen == 40
    for mine, theirs in zip(der.buffer, replay.buffer):
        assert torch.equal(mine, theirs)
    # the weights never changed, so every slot's logits are those of its stored example
    assert torch.allclose(der.logits, eval_logits(model, der.buffer.x), atol=1e-6)


def filled(method, model, n=8, seed=0):
    ctx = make_ctx(model, seed=seed)
    method.after_step(examples(n, n_tasks=model.n_heads), ctx)
    return ctx


def grads(model, loss):
    return torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def test_logit_term_adds_the_hand_derived_mse_gradient():
    """grad(alpha) - grad(0) = J^T 2 alpha (h(x') - z') / (B L), h = all_logits, with x' the
    memory batch the method draws (replicated from the same generator state)."""
    model = make_net(n_heads=2)
    alpha = 0.7
    with_term, without = DERpp(DERppParams(memory=8, alpha=alpha, beta=0.5)), \
        DERpp(DERppParams(memory=8, alpha=0.0, beta=0.5))
    ctx = filled(with_term, model)
    filled(without, model)
    with torch.no_grad():  # training moved on since the logits were stored
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.eval()  # no dropout: the three forward passes must agree
    state = ctx.generator.get_state()
    g_alpha = grads(model, with_term.penalty(ctx))
    ctx.generator.set_state(state)
    g_zero = grads(model, without.penalty(ctx))
    ctx.generator.set_state(state)
    pick = torch.randint(8, (4,), generator=ctx.generator)  # the method's first draw
    h = model.all_logits(with_term.buffer.x[pick])  # (4, 6)
    z = with_term.logits[pick]
    assert not torch.allclose(h, z)
    hand = torch.autograd.grad(h, list(model.parameters()),
                               grad_outputs=2 * alpha * (h - z).detach() / h.numel())
    changed = False
    for a, b, c in zip(g_alpha, g_zero, hand):
        assert torch.allclose(a - b, c, atol=1e-6)
        changed |= not torch.allclose(a, b)
    assert changed  # the logit term changes the gradient


def test_beta_term_is_the_cross_entropy_of_a_second_draw_on_each_examples_own_head():
    model = make_net(n_heads=2)
    beta = 0.4
    derpp = DERpp(DERppParams(memory=8, alpha=0.0, beta=beta))
    ctx = filled(derpp, model)
    model.eval()
    state = ctx.generator.get_state()
    value = derpp.penalty(ctx)
    ctx.generator.set_state(state)
    torch.randint(8, (4,), generator=ctx.generator)  # the logit term's draw comes first
    pick = torch.randint(8, (4,), generator=ctx.generator)
    x, y, task = (part[pick] for part in derpp.buffer)
    with torch.no_grad():
        every = model.all_logits(x).view(4, 2, 3)
        hand = 0.0
        for i in range(4):
            own = every[i, task[i]]  # this example's head
            hand += float(torch.log(torch.exp(own).sum()) - own[y[i]])
    assert abs(float(value.detach()) - beta * hand / 4) < 1e-6


def test_der_has_no_beta_term_and_nothing_before_the_memory_fills():
    model = make_net()
    der = DER(DERParams(memory=8, alpha=0.3))
    ctx = make_ctx(model)
    assert der.penalty(ctx) is None
    filled(der, model)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    model.eval()
    state = ctx.generator.get_state()
    value = der.penalty(ctx)
    ctx.generator.set_state(state)
    pick = torch.randint(8, (4,), generator=ctx.generator)
    with torch.no_grad():
        hand = ((model.all_logits(der.buffer.x[pick]) - der.logits[pick]) ** 2).mean()
    assert torch.allclose(value, 0.3 * hand)


def test_the_memory_batch_is_augmented_by_the_runs_transform():
    model = make_net()
    shift = lambda x, generator: x + 1.0  # noqa: E731
    der = DER(DERParams(memory=8, alpha=1.0))
    filled(der, model)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    model.eval()
    ctx = make_ctx(model, seed=3, transform=shift)
    value = der.penalty(ctx)
    pick = torch.randint(8, (4,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hand = ((model.all_logits(der.buffer.x[pick] + 1.0) - der.logits[pick]) ** 2).mean()
        plain = ((model.all_logits(der.buffer.x[pick]) - der.logits[pick]) ** 2).mean()
    assert torch.allclose(value, hand)
    assert not torch.allclose(value, plain)


def test_state_round_trips_through_a_weights_only_checkpoint():
    model = make_net(n_heads=2)
    derpp = DERpp(DERppParams(memory=6))
    ctx = make_ctx(model)
    for seed in range(3):
        derpp.after_step(examples(4, n_tasks=2, seed=seed), ctx)
    saved = io.BytesIO()
    torch.save(derpp.state_dict(), saved)
    saved.seek(0)
    restored = DERpp(DERppParams(memory=6))
    restored.load_state_dict(torch.load(saved, weights_only=True))
    assert restored.n_seen == 12 and torch.equal(restored.logits, derpp.logits)
    model.eval()
    state = ctx.generator.get_state()
    a = derpp.penalty(ctx)
    ctx.generator.set_state(state)
    assert torch.equal(a, restored.penalty(ctx))
    # and the reservoir continues identically
    ctx.generator.set_state(state)
    derpp.after_step(examples(4, n_tasks=2, seed=9), ctx)
    ctx.generator.set_state(state)
    restored.after_step(examples(4, n_tasks=2, seed=9), ctx)
    assert all(torch.equal(a, b) for a, b in zip(derpp.buffer, restored.buffer))
