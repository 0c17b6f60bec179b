"""Online quadratic anchors (online EWC, MAS, L2) and the MAS importance oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import engram.methods.anchor as anchor_module
from engram.data.streams import Task, TensorSet
from engram.importance.mas import mas_importance
from engram.methods.anchor import L2, MAS, OnlineAnchor, OnlineEWC
from engram.methods.base import Context, penalty_value
from engram.models import ContinualNet


def _linear_model(n_in=4, n_out=3, heads=1):
    torch.manual_seed(0)
    return ContinualNet(nn.Flatten(), n_in, heads, n_out).double()


def test_mas_matches_closed_form_on_a_linear_model():
    """f(x) = W x + b: d||f||^2/dW = 2 f x^T and d||f||^2/db = 2 f, per example."""
    model = _linear_model()
    x = torch.randn(7, 4, dtype=torch.float64)
    task = torch.zeros(7, dtype=torch.long)
    got = mas_importance(model, x, task, chunk_size=3)
    W, b = model.head.weight.detach(), model.head.bias.detach()
    f = x @ W.T + b                                             # (N, 3)
    expected_w = (2 * f[:, :, None] * x[:, None, :]).abs().mean(0)  # (3, 4)
    expected_b = (2 * f).abs().mean(0)
    torch.testing.assert_close(got["head.weight"], expected_w)
    torch.testing.assert_close(got["head.bias"], expected_b)


def test_mas_is_per_example_not_batch_summed():
    """The batch-summed variant lets signs cancel; engram's per-example one must not."""
    model = _linear_model()
    x = torch.randn(2, 4, dtype=torch.float64)
    x = torch.cat([x, -x])  # bias-free parts of the gradients cancel when summed first
    got = mas_importance(model, x, torch.zeros(4, dtype=torch.long))["head.weight"]
    f = x @ model.head.weight.detach().T + model.head.bias.detach()
    summed_first = (2 * f[:, :, None] * x[:, None, :]).sum(0).abs() / 4
    assert (got > summed_first + 1e-9).any()


def _context(model):
    data = TensorSet(torch.randn(5, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.long),
                     torch.zeros(5, dtype=torch.long))
    task = Task(0, "t", [0], data, None, data)
    return Context(model=model, stream=None, train_cfg=None,
                   generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                   task=task)


@pytest.mark.parametrize("decay", [1.0, 0.5, 0.0])
def test_online_penalty_is_decayed_importance_at_the_latest_anchor(monkeypatch, decay):
    model = _linear_model()
    ctx = _context(model)
    omegas = [{n: torch.rand_like(p) for n, p in model.named_parameters()} for _ in range(2)]
    calls = iter(omegas)
    monkeypatch.setattr(anchor_module, "measure_importance", lambda *a, **k: next(calls))
    method = OnlineAnchor(OnlineAnchor.Params(strength=3.0, decay=decay))
    assert penalty_value(method, ctx) is None
    anchors = []
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        method.after_task(ctx)
        anchors.append({n: p.detach().clone() for n, p in model.named_parameters()})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    # direct formula: (lambda/2) sum (gamma*Omega_1 + Omega_2) (theta - theta*_2)^2
    direct = sum(1.5 * ((decay * omegas[0][n] + omegas[1][n]) * (p - anchors[1][n]).pow(2)).sum()
                 for n, p in model.named_parameters())
    penalty = penalty_value(method, ctx)
    torch.testing.assert_close(penalty, direct)
    grads = torch.autograd.grad(penalty, list(model.parameters()))
    for (n, p), g in zip(model.named_parameters(), grads):
        expected = 3.0 * (decay * omegas[0][n] + omegas[1][n]) * (p.detach() - anchors[1][n])
        torch.testing.assert_close(g, expected)  # the penalty really changes the gradient
        assert g.abs().sum() > 0


def test_l2_is_half_lambda_squared_distance_to_previous_weights():
    model = _linear_model()
    ctx = _context(model)
    method = L2(L2.Params(strength=2.0))
    method.after_task(ctx)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    expected = sum((p - before[n]).pow(2).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(penalty_value(method, ctx), expected)
    # its memory bill is the anchor alone: one number per weight (+ one scalar per tensor)
    size = next(model.parameters()).element_size()
    n_weights = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    assert method.extra_bytes() == size * (n_weights + n_tensors)
    method.after_task(ctx)  # a second task: gamma = 0 keeps the importance at 1
    assert all(float(omega) == 1.0 for omega in method.importance.values())


def test_variants_pick_their_importance_and_decay():
    assert OnlineEWC.Params().importance == "fisher_exact" and OnlineEWC.Params().decay == 1.0
    assert MAS.Params().importance == "mas"
    assert L2.Params().importance == "uniform" and L2.Params().decay == 0.0
