"""Loss-of-plasticity diagnostics: pure functions of activations, features and weights.

Definitions follow the loss-of-plasticity code of Dohare et al. (Nature 632, 2024;
shibhansh/loss-of-plasticity @63c35f3, "LoP"), as summarised in section 2 of the project's
reference sheet (shared/references/plasticity-importance-metrics.md).  Each function's
docstring gives its formula, its source and, where LoP and the paper differ, which one is
implemented.

Conventions
-----------
* ``h`` is a hidden layer's post-activation output on a probe batch: ``(N, units)`` for a
  fully connected layer, ``(N, C, H, W)`` for a conv layer whose "units" are the C
  channels (statistics then average over the batch *and* the spatial positions, as ReDo's
  code does).
* ``features`` for the rank measures is ``(N, D)``: rows are examples, columns are units
  (conv outputs are flattened to ``(N, C*H*W)``).  Singular values are computed in float64
  on the CPU (``torch.linalg.svdvals``), as the reference sheet advises; LoP warns that
  GPU SVDs of large matrices can fail to converge.
* Three different "ranks" exist in this literature; the names here say which is which:

  ========================  ==========================================================
  ``effective_rank``        Roy & Vetterli 2007: exp(entropy of sigma / sum sigma)
  ``stable_rank``           LoP's "stable rank" (srank_delta): smallest k with
                            sum_{i<=k} sigma_i >= (1-delta) sum sigma, sigma *unsquared*
  ``approximate_rank``      Yang et al. 2019: the same with sigma **squared**
  ``numerical_stable_rank`` linear algebra's stable rank ||A||_F^2 / ||A||_2^2
  ``numerical_rank``        the number of singular values above a rounding tolerance
  ========================  ==========================================================

* "Hidden layer l" of a :class:`~engram.models.ContinualNet` (1-based, ``layer{l}``) is the
  output of the activation module that follows the l-th Linear/Conv layer of ``model.body``;
  the same name labels that layer's (input) weights in :func:`weight_magnitude`; the output
  layer is ``head``.

Every function leaves its inputs (and the model) unchanged and returns Python numbers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "approximate_rank",
    "dead_fraction",
    "dormant_fraction",
    "effective_rank",
    "gradient_magnitude",
    "hidden_activations",
    "named_weight_layers",
    "numerical_rank",
    "numerical_stable_rank",
    "plasticity_diagnostics",
    "rank_measures",
    "redo_scores",
    "saturated_fraction",
    "singular_values",
    "stable_rank",
    "weight_magnitude",
]

WEIGHTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
REDO_EPS = 1e-9  # dopamine labs/redo adds this to the layer mean (denominator of the score)

# Saturation: a unit is saturated where f'(z)/f'(0) < 0.19 ("derivative rule").  For tanh
# this is exactly LoP's |tanh z| > 0.9 (1 - 0.9^2 = 0.19).  Written on the output h:
#   tanh     1 - h^2 < 0.19       <=> |h| > 0.9              <=> |z| > atanh(0.9) = 1.472
#   sigmoid  4 h (1-h) < 0.19     <=> |2h - 1| > 0.9         <=> |z| > 2 atanh(0.9) = 2.944
#   atan     cos(h)^2 < 0.19      <=> |h| > atan(sqrt(1/0.19 - 1)) = 1.1195  <=> |z| > 2.065
SATURATION_RATIO = 0.19
_ATAN_Z_BOUND = math.sqrt(1.0 / SATURATION_RATIO - 1.0)  # 2.0647
_SATURATION = {  # activation -> (f, distance of h from the centre, bound on that distance)
    "tanh": (torch.tanh, lambda h: h.abs(), 0.9),
    "sigmoid": (torch.sigmoid, lambda h: (2.0 * h - 1.0).abs(), 0.9),
    "atan": (torch.atan, lambda h: h.abs(), math.atan(_ATAN_Z_BOUND)),
}


# --------------------------------------------------------------------------- units


def _unit_mean_abs(h: torch.Tensor) -> torch.Tensor:
    """mean_x |h_i(x)| per unit: (N, units, *spatial) -> (units,), averaging over every
    dimension but dim 1 (batch and, for conv layers, positions)."""
    if h.dim() < 2 or h.shape[0] == 0 or h.shape[1] == 0:
        raise ValueError(f"activations must be (N, units, ...) with N, units >= 1, "
                         f"got shape {tuple(h.shape)}")
    dims = [0, *range(2, h.dim())]
    return h.detach().abs().to(torch.float64).mean(dim=dims)  # (units,)


def dead_fraction(h: torch.Tensor) -> float:
    """Fraction of dead units: units whose output is exactly zero on every probe example.

        dead_i  <=>  sum_x |h_i(x)| == 0

    h: (N, units) post-activation outputs on a probe batch ((N, C, H, W) for conv: a channel
    is dead when it is zero at every example and position).  Source: LoP online permuted
    MNIST (online_expr.py), where a ReLU unit is dead if it never fires on the task's first
    2000 examples; LoP plots 100 * dead / total units.  Equals ``dormant_fraction(h, 0.0)``.
    """
    return float((_unit_mean_abs(h) == 0).to(torch.float64).mean())


def redo_scores(h: torch.Tensor) -> torch.Tensor:
    """ReDo's normalised activation score of each unit of one layer.

        s_i = mean_x |h_i(x)| / ( (1/H) sum_{k=1..H} mean_x |h_k(x)| + 1e-9 )

    h: (N, units) or (N, C, H, W) -> (units,) float64.  Source: Sokar et al., ICML 2023
    (the dormant neuron phenomenon); the 1e-9 and the mean over batch *and* spatial
    positions are from the code (google/dopamine labs/redo, estimate_neuron_score).
    """
    return scores_from_activity(_unit_mean_abs(h))  # mean |h| per unit: (units,)


def scores_from_activity(activity: torch.Tensor) -> torch.Tensor:
    """ReDo's score from the units' mean |h| (units,): activity / (its mean + 1e-9)."""
    return activity / (activity.mean() + REDO_EPS)


def dormant_fraction(h: torch.Tensor, tau: float) -> float:
    """Fraction of tau-dormant units of one layer: units with ReDo score s_i <= tau.

    s_i as in :func:`redo_scores`.  tau = 0 counts exactly the dead units; ReDo's paper uses
    tau = 0.025 (0.1 at high replay ratio), its code 0.0, LoP's ReDo port 0.01 (0.1 for Ant).
    Report tau and the probe size with the number: tau = 0 and tau = 0.1 differ a lot.
    """
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    return float((redo_scores(h) <= tau).to(torch.float64).mean())


def _saturation_rule(activation: str | nn.Module) -> tuple:
    name = activation if isinstance(activation, str) else _activation_name(activation)
    if name not in _SATURATION:
        raise ValueError(f"saturation is defined for bounded activations {sorted(_SATURATION)}, "
                         f"got {activation!r}")
    return _SATURATION[name]


def saturated_fraction(values: torch.Tensor, activation: str | nn.Module, *,
                       pre_activation: bool = False) -> float:
    """Fraction of saturated outputs of a bounded activation (tanh, sigmoid or atan).

    Rule (the reference sheet's *derivative rule*): an output is saturated where the
    activation's slope has fallen below 0.19 of its slope at 0, f'(z)/f'(0) < 0.19.
      * tanh:    |tanh z| > 0.9, which is exactly LoP's rule (expr.py); |z| > 1.472.
      * sigmoid: sigma(z) < 0.05 or > 0.95, |z| > 2.944 (here the range rule "within 10% of
                 a bound" agrees).
      * atan:    |atan z| > 1.1195 (0.713 of pi/2), |z| > 2.065.  The sheet's range rule
                 (|atan z| > 0.9 pi/2, |z| > 6.314) is NOT what is used: the derivative rule
                 tracks gradient flow and matches tanh's 0.9.  Only tanh's rule comes from a
                 paper (LoP); the sigmoid/atan rules are the sheet's proposal.

    values: post-activation outputs h (default) or pre-activations z (``pre_activation=True``,
    mapped through f first), any shape.  Returns the fraction of all entries that are
    saturated; on an (N, units) probe batch this is LoP's per-example fraction of saturated
    units, averaged over the N examples.
    """
    f, distance, bound = _saturation_rule(activation)
    h = values.detach().to(torch.float64)
    if pre_activation:
        h = f(h)
    if h.numel() == 0:
        raise ValueError("saturated_fraction needs at least one value")
    return float((distance(h) > bound).to(torch.float64).mean())


# --------------------------------------------------------------------------- ranks


def singular_values(features: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, float64, CPU) of the (N, D) representation matrix.

    Inputs with more than 2 dimensions are flattened to (N, prod(rest))."""
    if features.dim() < 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    phi = features.detach().reshape(features.shape[0], -1).to("cpu", torch.float64)  # (N, D)
    if phi.numel() == 0:
        raise ValueError(f"features must be non-empty, got shape {tuple(features.shape)}")
    return torch.linalg.svdvals(phi)  # (min(N, D),), descending


def effective_rank(features: torch.Tensor) -> float:
    """Effective rank (Roy & Vetterli, EUSIPCO 2007), as LoP's compute_effective_rank.

        p_k = sigma_k / sum_j sigma_j        (singular values, NOT squared)
        erank = exp( -sum_k p_k ln p_k ),    with 0 ln 0 = 0

    Between 1 and min(N, D) for a nonzero matrix (n for the n x n identity); returns 0.0
    for an all-zero matrix (LoP would divide by zero there).
    """
    return _effective_rank(singular_values(features))


def _effective_rank(sigma: torch.Tensor) -> float:
    total = sigma.sum()
    if total == 0:
        return 0.0
    p = sigma / total
    p = p[p > 0]  # 0 ln 0 = 0
    return float(torch.exp(-(p * p.log()).sum()))


def _smallest_k_reaching(weights: torch.Tensor, fraction: float) -> int:
    """Smallest k with sum_{i<=k} weights_i >= fraction * sum weights (weights descending).

    A relative slack of 1e-12 keeps exact ties (e.g. 99 of 100 equal values at 0.99) from
    flipping on float64 rounding of the cumulative sum."""
    total = weights.sum()
    if total == 0:
        return 0
    cumulative = torch.cumsum(weights, dim=0)  # (K,)
    reached = cumulative >= fraction * total * (1 - 1e-12)
    return int(torch.nonzero(reached)[0, 0]) + 1


def stable_rank(features: torch.Tensor, delta: float = 0.01) -> int:
    """"Stable rank" in LoP's sense (srank_delta, Kumar et al. ICLR 2021 per the sheet [M]).

        srank = smallest k with  sum_{i<=k} sigma_i >= (1 - delta) * sum_i sigma_i

    sigma sorted descending and **unsquared**; delta = 0.01 (LoP compute_stable_rank /
    compute_abs_approximate_rank, prop = 0.99).  NOT the linear-algebra stable rank
    ||A||_F^2 / ||A||_2^2, which is :func:`numerical_stable_rank`.  0 for a zero matrix.
    """
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    return _smallest_k_reaching(singular_values(features), 1 - delta)  # unsquared


def approximate_rank(features: torch.Tensor, prop: float = 0.99) -> int:
    """Approximate rank (Yang et al. 2019, arXiv 1909.12255; LoP compute_approximate_rank).

        arank = smallest k with  sum_{i<=k} sigma_i^2 >= prop * sum_i sigma_i^2

    Like :func:`stable_rank` but with **squared** singular values (so arank <= srank for
    the same threshold).  0 for a zero matrix.
    """
    if not 0 < prop <= 1:
        raise ValueError(f"prop must be in (0, 1], got {prop}")
    return _smallest_k_reaching(singular_values(features) ** 2, prop)


def numerical_stable_rank(features: torch.Tensor) -> float:
    """The linear-algebra stable rank  ||A||_F^2 / ||A||_2^2 = sum_i sigma_i^2 / sigma_max^2.

    A continuous quantity in [1, rank(A)] (Rudelson & Vershynin 2007); different from LoP's
    "stable rank" (:func:`stable_rank`).  0.0 for a zero matrix."""
    return _numerical_stable_rank(singular_values(features))


def _numerical_stable_rank(sigma: torch.Tensor) -> float:
    if sigma[0] == 0:
        return 0.0
    return float((sigma**2).sum() / sigma[0] ** 2)


def numerical_rank(features: torch.Tensor, rtol: float | None = None) -> int:
    """Number of singular values > rtol * sigma_max (LoP also logs this "rank").

    Default rtol = eps(dtype of the input) * max(N, D), the tolerance of
    torch.linalg.matrix_rank / numpy.linalg.matrix_rank, using the *input's* precision
    (a float32 rank-2 product has float32-sized rounding noise even after casting)."""
    return _numerical_rank(singular_values(features), features, rtol)


def _numerical_rank(sigma: torch.Tensor, features: torch.Tensor, rtol: float | None) -> int:
    if rtol is None:
        dtype = features.dtype if features.is_floating_point() else torch.float64
        rtol = torch.finfo(dtype).eps * max(features.shape[0], features[0].numel())
    if sigma[0] == 0:
        return 0
    return int((sigma > rtol * sigma[0]).sum())


def rank_measures(features: torch.Tensor) -> dict[str, float]:
    """All five ranks above at their defaults from one SVD (the SVD dominates the cost):
    {effective_rank, stable_rank (delta=0.01), approximate_rank (prop=0.99),
    numerical_stable_rank, numerical_rank}."""
    sigma = singular_values(features)  # (K,) descending, float64
    return {
        "effective_rank": _effective_rank(sigma),
        "stable_rank": float(_smallest_k_reaching(sigma, 1 - 0.01)),
        "approximate_rank": float(_smallest_k_reaching(sigma**2, 0.99)),
        "numerical_stable_rank": _numerical_stable_rank(sigma),
        "numerical_rank": float(_numerical_rank(sigma, features, None)),
    }


# --------------------------------------------------------------------------- model


def _activation_name(module: nn.Module) -> str:
    """'tanh' for nn.Tanh, 'sigmoid' for nn.Sigmoid, 'atan' for a module class named Atan."""
    return type(module).__name__.lower()


def _is_activation(module: nn.Module) -> bool:
    """torch's activation modules (nn.ReLU, nn.Tanh, ...) or a custom class named Atan."""
    return (type(module).__module__ == "torch.nn.modules.activation"
            or _activation_name(module) == "atan")


def _leaves(module: nn.Module) -> list[nn.Module]:
    """Modules without children, in registration order (forward order for Sequential)."""
    return [m for m in module.modules() if not list(m.children())]


def named_weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear/Conv layers of a model, named as the diagnostics name them.

    A model with ``body`` and ``head`` (a ContinualNet): ``layer1 .. layerL`` for the body's
    Linear/Conv layers in order, then ``head``.  Any other model: qualified module names.
    """
    body, head = getattr(model, "body", None), getattr(model, "head", None)
    if isinstance(body, nn.Module) and isinstance(head, WEIGHTED_LAYERS):
        layers = [m for m in _leaves(body) if isinstance(m, WEIGHTED_LAYERS)]
        return [(f"layer{i}", m) for i, m in enumerate(layers, start=1)] + [("head", head)]
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WEIGHTED_LAYERS)]


def _mean_abs_by_layer(tensors: list[tuple[str, torch.Tensor]]) -> dict[str, float]:
    """{name: mean |t|} plus 'all': sum |t| / count over every tensor pooled."""
    out: dict[str, float] = {}
    total, count = 0.0, 0
    for name, t in tensors:
        s = float(t.detach().abs().to(torch.float64).sum())
        out[name] = s / t.numel()
        total, count = total + s, count + t.numel()
    if count:
        out["all"] = total / count
    return out


def weight_magnitude(model: nn.Module) -> dict[str, float]:
    """Mean absolute weight of each Linear/Conv layer, and over all of them.

        weight_magnitude[l] = mean_j |W_l[j]|,   'all' = sum_l sum_j |W_l[j]| / sum_l |W_l|

    Weights only, biases excluded: 'all' is what LoP plots for online permuted MNIST
    ((sum_layers sum |w|) / 9,588,000).  LoP's CIFAR plot includes biases and BatchNorm;
    this does not.  Layer names as :func:`named_weight_layers`.
    """
    return _mean_abs_by_layer([(n, m.weight) for n, m in named_weight_layers(model)])


def gradient_magnitude(model: nn.Module) -> dict[str, float]:
    """Mean absolute gradient of each Linear/Conv weight (from ``.grad``), and over all.

        gradient_magnitude[l] = mean_j |dL/dW_l[j]|   (LoP slowly-changing regression,
        to_log_grad: mean |dL/dW_1| and mean |dL/dW_out|)

    Reads whatever the last backward pass left in ``.grad``; layers whose weight has no
    gradient are left out, and the result is {} when none has one.
    """
    return _mean_abs_by_layer([(n, m.weight.grad) for n, m in named_weight_layers(model)
                               if m.weight.grad is not None])


def _hidden_modules(body: nn.Module) -> list[nn.Module]:
    """The module whose output is hidden layer l, for each Linear/Conv layer l of body: the
    first activation after it (before the next Linear/Conv), else the layer itself."""
    leaves = _leaves(body)
    hidden = []
    for i, m in enumerate(leaves):
        if not isinstance(m, WEIGHTED_LAYERS):
            continue
        chosen = m
        for nxt in leaves[i + 1:]:
            if isinstance(nxt, WEIGHTED_LAYERS):
                break
            if _is_activation(nxt):
                chosen = nxt
                break
        hidden.append(chosen)
    return hidden


def _body(model: nn.Module) -> nn.Module:
    body = getattr(model, "body", None)
    return body if isinstance(body, nn.Module) else model


@torch.no_grad()
def hidden_activations(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Post-activation outputs of each hidden layer of ``model.body`` on the probe batch x.

    Returns [h_1, ..., h_L], h_l of shape (N, units_l) ((N, C, H, W) for conv layers),
    detached, on the model's device.  Runs ``model.body(x)`` (the whole model when it has no
    ``body``) in eval mode without gradients, via forward hooks on the activation module
    after each Linear/Conv layer; the hooks are removed and every submodule's train/eval
    mode is restored afterwards, even on error.  The model's parameters are not touched.
    """
    body = _body(model)
    modules = _hidden_modules(body)
    outputs: list[torch.Tensor | None] = [None] * len(modules)

    def keep(index: int):
        def hook(_module, _inputs, output):
            outputs[index] = output.detach()
        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(modules)]
    try:
        model.eval()
        device = next((p.device for p in model.parameters()), x.device)
        body(x.to(device))
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    if any(o is None for o in outputs):  # a module reused or skipped by a custom forward
        raise RuntimeError("some hidden layers produced no output during the probe pass")
    return outputs  # type: ignore[return-value]


def plasticity_diagnostics(model: nn.Module, x_probe: torch.Tensor, *,
                           tau: float = 0.1) -> dict[str, float]:
    """Every diagnostic above on one probe batch, as one flat {metric: value} dict.

    Per hidden layer l (``/layer{l}``) and for the whole network (no suffix):
      dead_units            fraction of dead units; network: pooled over all hidden units
                            (LoP's dead / total units)
      dormant_units         fraction of units with ReDo score <= tau (score normalised
                            within each layer); network: pooled over all hidden units
      saturated_units       (tanh/sigmoid/atan layers only) fraction of saturated outputs,
                            see :func:`saturated_fraction`; network: pooled over the entries
                            of those layers
      effective_rank, stable_rank, approximate_rank, numerical_stable_rank, numerical_rank
                            of the (N, units) features; network: mean over layers (LoP plots
                            the mean effective rank; divide by the width for LoP's %)
    Per Linear/Conv layer (``/layer{l}``, ``/head``) and over all weights (no suffix):
      weight_magnitude      mean |w|, see :func:`weight_magnitude`
      gradient_magnitude    mean |dL/dw| from ``.grad``; only when gradients are present

    Pass the same fixed probe batch at every measurement (LoP: the first 2000 examples of
    the task, at the start of each task) and record tau and N with the rows.
    """
    hs = hidden_activations(model, x_probe)
    activations = [_activation_name(m) for m in _hidden_modules(_body(model))]  # same order
    out: dict[str, float] = {}
    dead = dormant = units = 0
    saturated = entries = 0.0
    ranks: dict[str, list[float]] = {k: [] for k in
                                     ("effective_rank", "stable_rank", "approximate_rank",
                                      "numerical_stable_rank", "numerical_rank")}
    for l, (h, act) in enumerate(zip(hs, activations), start=1):
        n_units = h.shape[1]
        layer = {
            "dead_units": dead_fraction(h),
            "dormant_units": dormant_fraction(h, tau),
            **rank_measures(h),
        }
        if act in _SATURATION:
            layer["saturated_units"] = saturated_fraction(h, act)
            saturated += layer["saturated_units"] * h.numel()
            entries += h.numel()
        dead += round(layer["dead_units"] * n_units)  # unit counts, pooled over layers
        dormant += round(layer["dormant_units"] * n_units)
        units += n_units
        for key in ranks:
            ranks[key].append(layer[key])
        out.update({f"{key}/layer{l}": value for key, value in layer.items()})
    if units:
        out["dead_units"] = dead / units
        out["dormant_units"] = dormant / units
        out.update({key: sum(v) / len(v) for key, v in ranks.items()})
    if entries:
        out["saturated_units"] = saturated / entries
    for prefix, values in (("weight_magnitude", weight_magnitude(model)),
                           ("gradient_magnitude", gradient_magnitude(model))):
        for name, value in values.items():
            out[prefix if name == "all" else f"{prefix}/{name}"] = value
    return out
