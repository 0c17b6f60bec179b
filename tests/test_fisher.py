"""Every diagonal-Fisher estimator against a plain per-example autograd loop (the oracle).

The oracle computes log p(.|x) of ONE example with an ordinary forward pass and takes
gradients with torch.autograd.grad, one class at a time: nothing shared with the vmap /
jacrev implementation. Everything runs in float64, so agreement is checked to ~1e-10.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engram.importance.fisher as fisher_module
import engram.importance.per_example as per_example_module
from engram.importance.fisher import FISHER_ESTIMATORS, fisher_diagonal
from engram.models import ContinualNet

N, HEAD_DIM = 20, 4
TOL = dict(rtol=1e-9, atol=1e-12)


def make_model(n_heads: int, seed: int = 0) -> ContinualNet:
    """Tiny MLP body with dropout: a Fisher computed in train mode would be random."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(),
                         nn.Dropout(0.5))
    return ContinualNet(body, 5, n_heads, HEAD_DIM).double()


def make_data(n_heads: int, n: int = N, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(HEAD_DIM, (n,), generator=g)
    task = torch.randint(n_heads, (n,), generator=g)  # per-example task ids (all 0 for 1 head)
    return x, y, task


def per_example_log_prob_grads(model, x, task, i):
    """[(log p(.|x_i), d log p(c|x_i)/d theta for c in 0..C-1)] by plain autograd, eval mode."""
    model.eval()
    params = list(model.parameters())
    log_probs = F.log_softmax(model(x[i:i + 1], task[i:i + 1]), dim=-1)[0]
    grads = [torch.autograd.grad(log_probs[c], params, retain_graph=True)
             for c in range(len(log_probs))]
    return log_probs.detach(), grads


def oracle(model, x, y, task, estimator, labels=None, batch_size=None):
    """The four estimators written as loops over examples (and classes)."""
    was_training = model.training
    names = [name for name, _ in model.named_parameters()]
    out = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    per_example = [per_example_log_prob_grads(model, x, task, i) for i in range(len(y))]
    if estimator == "batch":
        starts = list(range(0, len(y), batch_size))
        for start in starts:
            members = range(start, min(start + batch_size, len(y)))
            for k, name in enumerate(names):
                mean_grad = sum(per_example[i][1][int(y[i])][k] for i in members) / len(members)
                out[name] += mean_grad.pow(2)
        divisor = len(starts)
    else:
        for i, (log_probs, grads) in enumerate(per_example):
            if estimator == "exact":
                weighted = [(float(log_probs[c].exp()), grads[c]) for c in range(len(log_probs))]
            else:
                label = int(labels[i] if estimator == "sample" else y[i])
                weighted = [(1.0, grads[label])]
            for weight, grad in weighted:
                for k, name in enumerate(names):
                    out[name] += weight * grad[k].pow(2)
        divisor = len(y)
    model.train(was_training)
    return {name: value / divisor for name, value in out.items()}


def sampled_labels(model, x, task, seed, chunk_size):
    """The labels "sample" draws: torch.multinomial(probs, 1, generator) once per chunk."""
    g = torch.Generator().manual_seed(seed)
    model.eval()
    labels = []
    with torch.no_grad():
        for start in range(0, len(x), chunk_size):
            probs = F.softmax(model(x[start:start + chunk_size], task[start:start + chunk_size]), -1)
            labels.append(torch.multinomial(probs, 1, generator=g).squeeze(1))
    return torch.cat(labels)


def assert_same(actual, expected, **tol):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        torch.testing.assert_close(actual[name], expected[name], **(tol or TOL), msg=name)


@pytest.mark.parametrize("n_heads", [1, 3])
@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_deterministic_estimators_match_the_loop(estimator, n_heads):
    model = make_model(n_heads)
    x, y, task = make_data(n_heads)
    expected = oracle(model, x, y, task, estimator)
    assert any(v.abs().sum() > 0 for v in expected.values())
    assert_same(fisher_diagonal(model, x, y, task, estimator), expected)


@pytest.mark.parametrize("n_heads", [1, 3])
@pytest.mark.parametrize("chunk_size", [N, 7])
def test_sample_estimator_matches_the_loop_with_the_same_draws(n_heads, chunk_size):
    model = make_model(n_heads)
    x, y, task = make_data(n_heads)
    labels = sampled_labels(model, x, task, seed=5, chunk_size=chunk_size)
    got = fisher_diagonal(model, x, y, task, "sample", chunk_size=chunk_size,
                          generator=torch.Generator().manual_seed(5))
    assert_same(got, oracle(model, x, y, task, "sample", labels=labels))
    # the draws matter: the true labels (a different labelling here) give another matrix
    assert not torch.equal(labels, y)
    empirical = fisher_diagonal(model, x, y, task, "empirical")
    assert any(not torch.allclose(got[k], empirical[k]) for k in got)


@pytest.mark.parametrize("n_heads", [1, 3])
@pytest.mark.parametrize("batch_size", [8, 5, N])
def test_batch_estimator_squares_the_mean_gradient_of_each_batch(n_heads, batch_size):
    model = make_model(n_heads)
    x, y, task = make_data(n_heads)
    got = fisher_diagonal(model, x, y, task, "batch", batch_size=batch_size)
    assert_same(got, oracle(model, x, y, task, "batch", batch_size=batch_size))


def test_batch_of_one_is_the_empirical_fisher():
    model = make_model(3)
    x, y, task = make_data(3)
    assert_same(fisher_diagonal(model, x, y, task, "batch", batch_size=1),
                fisher_diagonal(model, x, y, task, "empirical"))


@pytest.mark.parametrize("estimator", ["exact", "empirical", "sample"])
def test_chunking_does_not_change_the_result(estimator):
    model = make_model(3)
    x, y, task = make_data(3)
    results = [fisher_diagonal(model, x, y, task, estimator, chunk_size=chunk,
                               generator=torch.Generator().manual_seed(2))
               for chunk in (3, 1, 64, None)]
    if estimator == "sample":
        # the labels are drawn per chunk; make sure this torch draws them identically
        # whatever the chunking (multinomial with one sample consumes one exponential per
        # probability, row by row), otherwise only the deterministic estimators are checked
        same_draws = all(torch.equal(sampled_labels(model, x, task, 2, 3),
                                     sampled_labels(model, x, task, 2, c)) for c in (1, 64))
        if not same_draws:
            pytest.skip("this torch's multinomial draws depend on the chunk shape")
    for other in results[1:]:
        assert_same(other, results[0])


def test_default_chunk_fits_the_budget(monkeypatch):
    """torch.func path (fast=False): a 784-400-400-10 MLP has 478,410 parameters; 2**25
    floats hold 7 per-example jacobians (x10 classes) or 70 gradients. The gradients are
    skipped (func_statistic stubbed): only the chunks of the forward passes are looked at."""
    monkeypatch.setattr(per_example_module, "func_statistic", lambda *args, **kwargs: {})

    def largest_chunk(model, estimator, n):
        seen = []
        handle = model.body.register_forward_hook(lambda mod, inp, out: seen.append(len(inp[0])))
        x, y = torch.zeros(n, 1, 28, 28), torch.zeros(n, dtype=torch.long)
        fisher_diagonal(model, x, y, torch.zeros(n, dtype=torch.long), estimator, fast=False)
        handle.remove()
        return max(seen)

    body = nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400),
                         nn.ReLU())
    model = ContinualNet(body, 400, 1, 10)
    assert sum(p.numel() for p in model.parameters()) == 478_410
    assert largest_chunk(model, "exact", 20) == 2**25 // (478_410 * 10) == 7
    for estimator in ("sample", "empirical"):
        assert largest_chunk(model, estimator, 100) == 2**25 // 478_410 == 70
    # a model too large for one example in the budget still gets chunks of one
    huge = ContinualNet(nn.Sequential(nn.Flatten(), nn.Linear(784, 4096), nn.ReLU()), 4096, 1, 10)
    assert largest_chunk(huge, "exact", 3) == 1


@pytest.mark.parametrize("estimator, budget_examples", [("exact", 3), ("empirical", 4)])
def test_default_chunk_is_used_and_exact(monkeypatch, estimator, budget_examples):
    """torch.func path: with the budget shrunk to a few examples' per-example gradients, no
    forward pass sees a larger chunk."""
    model = make_model(3)
    x, y, task = make_data(3)
    n_params = sum(p.numel() for p in model.parameters())
    per_example = n_params * (HEAD_DIM if estimator == "exact" else 1)
    monkeypatch.setattr(fisher_module, "CHUNK_BUDGET_FLOATS", budget_examples * per_example + 1)
    seen = []
    handle = model.body.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    got = fisher_diagonal(model, x, y, task, estimator, fast=False)
    handle.remove()
    assert max(seen) == budget_examples
    assert_same(got, oracle(model, x, y, task, estimator))


@pytest.mark.parametrize("estimator, budget_examples", [("exact", 5), ("empirical", 6)])
def test_default_chunk_of_the_hooked_path_is_used_and_exact(monkeypatch, estimator, budget_examples):
    """Hooked path: the budget holds the layers' inputs and outputs times (C + 1) per example
    (16+6, 6+5, 5+12 floats for this model); no forward pass sees a larger chunk (the 4-example
    check of the hooks and a 1-example probe of the sizes come first)."""
    model = make_model(3)
    x, y, task = make_data(3)
    per_example = (16 + 6 + 6 + 5 + 5 + 12) * ((HEAD_DIM if estimator == "exact" else 1) + 1)
    monkeypatch.setattr(fisher_module, "CHUNK_BUDGET_FLOATS", budget_examples * per_example + 1)
    seen = []
    handle = model.body.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    got = fisher_diagonal(model, x, y, task, estimator)
    handle.remove()
    assert max(seen) == budget_examples
    assert seen[-1] == (N % budget_examples or budget_examples)  # the last chunk: the rest
    assert_same(got, oracle(model, x, y, task, estimator))


def test_model_parameters_and_training_mode_are_unchanged():
    model = make_model(3)
    x, y, task = make_data(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in (True, False):
        model.train(mode)
        for estimator in FISHER_ESTIMATORS:
            fisher_diagonal(model, x, y, task, estimator, generator=torch.Generator().manual_seed(0))
            assert model.training is mode
            assert all(m.training is mode for m in model.modules())
            assert all(p.grad is None for p in model.parameters())
            for k, v in model.state_dict().items():
                assert torch.equal(v, before[k]), k


def test_train_mode_model_gets_the_eval_mode_fisher():
    """Dropout is active in train mode; the estimate must still be the eval-mode oracle."""
    model = make_model(1).train()
    x, y, task = make_data(1)
    first = fisher_diagonal(model, x, y, task, "exact")
    second = fisher_diagonal(model, x, y, task, "exact")
    assert_same(first, second)
    assert_same(first, oracle(model, x, y, task, "exact"))


def test_mean_of_many_sample_estimates_approaches_exact():
    model = make_model(3)
    x, y, task = make_data(3)
    exact = fisher_diagonal(model, x, y, task, "exact")
    g = torch.Generator().manual_seed(0)
    draws = [fisher_diagonal(model, x, y, task, "sample", generator=g) for _ in range(400)]
    flat = lambda f: torch.cat([v.flatten() for v in f.values()])  # noqa: E731
    mean = flat({k: sum(d[k] for d in draws) / len(draws) for k in exact})
    target = flat(exact)
    one_error = (flat(draws[0]) - target).norm() / target.norm()
    mean_error = (mean - target).norm() / target.norm()
    assert mean_error < 0.1
    assert mean_error < one_error / 5  # ~1/sqrt(400) = 1/20 of a single draw's error


def test_unknown_estimator_and_bad_arguments_raise():
    model = make_model(1)
    x, y, task = make_data(1)
    with pytest.raises(ValueError, match="unknown Fisher estimator"):
        fisher_diagonal(model, x, y, task, "diagonal-ggn")
    with pytest.raises(ValueError, match="at least one example"):
        fisher_diagonal(model, x[:0], y[:0], task[:0], "exact")
    with pytest.raises(ValueError, match="chunk_size"):
        fisher_diagonal(model, x, y, task, "exact", chunk_size=0)
