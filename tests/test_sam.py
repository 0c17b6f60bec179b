"""SAM's gradient is the cross-entropy gradient at w + rho g/||g||, and the weights come back."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engram.methods.sam import SAM
from tests.conftest import tiny_config
from tests.test_methods import _context


def test_sam_gradient_is_taken_at_the_perturbed_weights():
    ctx = _context(tiny_config())
    data = ctx.stream.tasks[0].train
    ctx.batch = type(data)(*(part[:16] for part in data))
    model, params = ctx.model, list(ctx.model.parameters())
    original = [p.detach().clone() for p in params]

    loss = F.cross_entropy(model(ctx.batch.x, ctx.batch.task), ctx.batch.y)
    model.zero_grad()
    loss.backward()
    g = torch.cat([p.grad.reshape(-1) for p in params]).clone()
    SAM(SAM.Params(rho=0.5)).after_backward(ctx)
    got = torch.cat([p.grad.reshape(-1) for p in params])

    # by hand: a copy of the weights moved by rho g/||g||, plain autograd there
    perturbed = [p.detach() + 0.5 * gp.view_as(p) / g.norm() for p, gp in
                 zip(params, torch.split(g, [p.numel() for p in params]))]
    perturbed = [w.view_as(p).requires_grad_() for w, p in zip(perturbed, params)]
    named = dict(zip([n for n, _ in model.named_parameters()], perturbed))
    out = torch.func.functional_call(model, named, (ctx.batch.x, ctx.batch.task))
    expected = torch.cat([t.reshape(-1) for t in torch.autograd.grad(
        F.cross_entropy(out, ctx.batch.y), perturbed)])
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, g)  # the update really changed
    for p, w in zip(params, original):
        torch.testing.assert_close(p.detach(), w)  # weights restored after the probe
