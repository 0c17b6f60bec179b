"""Weight-importance measures for the profiler: pure functions in one registry.

Every measure has the same signature and never changes the model:

    MEASURES.get(name)(model, batches, loss_fn, *, trajectory, generator) -> Importance

- `model`: a single-head network called as `model(x)` (ContinualNet with one head).
- `batches`: [(x (B, ...), y (B,)), ...] on the model's device (training data, say).
- `loss_fn(logits (B, C), y (B,)) -> scalar`, the mean training loss (F.cross_entropy).
- `trajectory`: what a TrajectoryRecorder saw while the model trained (the trajectory
  measures need it: their registry function has `needs_trajectory = True`), else None.
- `generator`: a CPU torch.Generator, the only source of randomness (random, fisher_sample).
- returns {parameter name: tensor shaped like the parameter}, larger = more important, for
  every parameter (weights and biases) of every nn.Linear / nn.Conv2d module, the output
  head included (`profiled_parameters`).

Pure: the weights, their .grad and every module's train/eval mode are the same afterwards.
Every measure evaluates the network in eval mode (dropout off), as the Fisher and MAS do.
Gradients are taken with torch.func on detached copies of the parameters, so .grad is never
touched (and parameters with requires_grad=False are scored too).

    name               omega (per parameter unless said)                  source
    random             U[0, 1) noise                                      baseline
    magnitude          |w|                                                (pruning folklore)
    inverse_magnitude  1 / (|w| + 1e-12)                                  control: should do badly
    fisher_exact       E_x sum_c p(c|x) (d log p(c|x)/dw)^2               EWC, Kirkpatrick 2017
    fisher_sample      E_x (d log p(c~|x)/dw)^2, c~ ~ p(.|x)              (estimators: fisher.py)
    fisher_empirical   E_x (d log p(y|x)/dw)^2, y the true label
    fisher_batch       mean over batches of (batch-mean d log p(y|x)/dw)^2
    mas                E_x |d ||f(x)||^2 / dw|                            Aljundi 2018 (per example)
    si                 relu(path / ((w_now - w_start)^2 + 1e-3))          Zenke 2017
    taylor             mean over batches of (g_b * w)^2                   Molchanov 2019
    snip               |g_1 * w| / sum over all profiled weights          Lee 2019 (one batch)
    weight_change      1 / (1 + sum_t |w_t - w_{t-1}|)                    HM, corrected
    sign_flips         1 / (1 + #{t: w_t w_{t-1} < 0})                    HM
    direction_flips    1 / (1 + #{t: (w_t - w_{t-1})(w_{t-1} - w_{t-2}) < 0})   HM
    cbp_utility        unit i: mean_x |h_i| sum_k |w_ki|, on its fan-in   Dohare 2024 (continual
                       and bias (output units: mean_x |output_i|)         backprop)

HM is hmcalister/Neural-Network-Weight-Importance-Measures @31fa80b; this module does not
repeat its bugs (reference sheet section 4): counts are kept on copies, never on the live
tensors; weight change is the path length sum |dw|, not the signed sum that telescopes to
w_T - w_0; magnitude and inverse magnitude use |w|; the Fisher uses log-softmax and labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad

from engram.importance.fisher import fisher_diagonal
from engram.importance.mas import mas_importance
from engram.models.protocol import eval_mode
from engram.registry import MEASURES

Batches = list[tuple[torch.Tensor, torch.Tensor]]   # (x (B, ...), y (B,)) on the model's device
Importance = dict[str, torch.Tensor]                # param name -> tensor like it; larger = more important
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MeasureFn = Callable[..., Importance]

PROFILED_MODULES = (nn.Linear, nn.Conv2d)
SI_DAMPING = 1e-3        # xi of the SI measure (Zenke et al.'s split-CIFAR value)
INVERSE_EPS = 1e-12      # keeps 1/|w| finite for w = 0 without tying small weights



# ----------------------------------------------------------------------------------------------
# Which parameters are profiled, and the purity helpers every measure uses


def profiled_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every nn.Linear / nn.Conv2d module, in `model.named_modules()` order (layer numbers)."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, PROFILED_MODULES)]


def profiled_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of every weight and bias of the profiled layers, named_parameters order."""
    wanted = {id(p) for _, layer in profiled_layers(model) for p in layer.parameters(recurse=False)}
    return {name: p for name, p in model.named_parameters() if id(p) in wanted}


def _only_profiled(model: nn.Module, scores: dict[str, torch.Tensor]) -> Importance:
    return {name: scores[name] for name in profiled_parameters(model)}


def _all_inputs(batches: Batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, ...), y (N,) and task ids (N,) = 0 (a single-head model ignores them)."""
    if not batches:
        raise ValueError("an importance measure needs at least one batch")
    x = torch.cat([xb for xb, _ in batches])
    y = torch.cat([yb for _, yb in batches])
    return x, y, torch.zeros(len(y), dtype=torch.long, device=y.device)


def _loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> dict:
    """d loss_fn(model(x), y) / d theta for every named parameter, without touching .grad."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    return grad(lambda p: loss_fn(functional_call(model, p, (x,)), y))(params)


def _require(trajectory: Trajectory | None, measure: str) -> Trajectory:
    if trajectory is None:
        raise ValueError(f"importance measure {measure!r} needs the training trajectory: record "
                         "it with a TrajectoryRecorder while training and pass trajectory=")
    return trajectory


def _register(name: str, description: str, needs_trajectory: bool = False):
    def add(fn: MeasureFn) -> MeasureFn:
        fn.needs_trajectory = needs_trajectory  # type: ignore[attr-defined]
        return MEASURES.add(name, fn, description)
    return add


# ----------------------------------------------------------------------------------------------
# The training trajectory


@dataclass
class Trajectory:
    """What a TrajectoryRecorder saw while training. Every dict: parameter name -> tensor
    shaped like the parameter, for every named parameter of the model."""
    start: dict[str, torch.Tensor]            # theta_0: weights when recording began
    si_path: dict[str, torch.Tensor]          # sum_t -g_t * (theta_t - theta_{t-1})
    path_length: dict[str, torch.Tensor]      # sum_t |theta_t - theta_{t-1}|
    sign_flips: dict[str, torch.Tensor]       # #{t: theta_t * theta_{t-1} < 0}
    direction_flips: dict[str, torch.Tensor]  # #{t >= 2: (th_t - th_{t-1}) (th_{t-1} - th_{t-2}) < 0}
    steps: int                                # optimizer steps recorded


# ----------------------------------------------------------------------------------------------
# Measures that look only at the weights


@_register("random", "uniform noise U[0,1) per weight: the baseline every measure must beat")
def random_importance(model: nn.Module, batches: Batches, loss_fn: LossFn, *,
                      trajectory: Trajectory | None = None,
                      generator: torch.Generator) -> Importance:
    """omega = U[0, 1), drawn from `generator` (parameters in named_parameters order).

    The baseline: a measure that knows nothing. Same generator state, same scores."""
    return {name: torch.rand(p.shape, generator=generator, dtype=p.dtype,
                             device=generator.device).to(p.device)
            for name, p in profiled_parameters(model).items()}


@_register("magnitude", "|w|: large weights matter")
def magnitude(model: nn.Module, batches: Batches, loss_fn: LossFn, *,
              trajectory: Trajectory | None = None,
              generator: torch.Generator | None = None) -> Importance:
    """omega = |w| (the classic magnitude-pruning criterion; HM's version used the signed w,
    which ranks large negative weights as least important: bug (ii), not repeated)."""
    return {name: p.detach().abs() for name, p in profiled_parameters(model).items()}


@_register("inverse_magnitude", "1/(|w|+1e-12): a control that should do worse than random")
def inverse_magnitude(model: nn.Module, batches: Batches, loss_fn: LossFn, *,
                      trajectory: Trajectory | None = None,
                      generator: torch.Generator | None = None) -> Importance:
    """omega = 1 / (|w| + eps), eps = 1e-12: the exact reverse ranking of `magnitude`, a
    control that removes the largest weights first (HM used 1/w, signed: bug (ii))."""
    return {name: 1.0 / (p.detach().abs() + INVERSE_EPS)
            for name, p in profiled_parameters(model).items()}


# ----------------------------------------------------------------------------------------------
# Gradient measures on the batches


def _fisher_measure(estimator: str) -> MeasureFn:
    def fisher(model: nn.Module, batches: Batches, loss_fn: LossFn, *,
               trajectory: Trajectory | None = None,
               generator: torch.Generator | None = None) -> Importance:
        x, y, task = _all_inputs(batches)
        with eval_mode(model):
            scores = fisher_diagonal(model, x, y, task, estimator,  # type: ignore[arg-type]
                                     batch_size=len(batches[0][1]), generator=generator)
        return _only_profiled(model, scores)

    fisher.__name__ = fisher.__qualname__ = f"fisher_{estimator}"
    fisher.__doc__ = f"""Diagonal Fisher, estimator {estimator!r}: `fisher_diagonal` on all batches.

    g_c(x) = d log softmax(model(x))_c / d theta (Kirkpatrick et al. 2017, EWC); the four
    estimators (exact: sum_c p(c|x) g_c^2; sample: g_c~^2 with c~ ~ p(.|x) drawn from
    `generator`; empirical: g_y^2; batch: mean over batches of the squared batch-mean g_y)
    are defined and oracle-tested in engram.importance.fisher. The Fisher is that of the
    model's own softmax distribution, so `loss_fn` is not used. For "batch" the examples are
    re-cut into batches of len(batches[0]) examples: the given batches when all but the last
    have that size."""
    return fisher


for _estimator, _description in [
        ("exact", "diagonal Fisher, exact expectation over the model's labels (EWC)"),
        ("sample", "diagonal Fisher, one label sampled from the model per example"),
        ("empirical", "diagonal Fisher with the true labels (the empirical Fisher)"),
        ("batch", "diagonal Fisher as the squared mini-batch mean gradient (Avalanche style)")]:
    _register(f"fisher_{_estimator}", _description)(_fisher_measure(_estimator))


@_register("mas", "MAS: mean |d ||f(x)||^2 / dw| per example (Aljundi et al. 2018)")
def mas(model: nn.Module, batches: Batches, loss_fn: LossFn, *,
        trajectory: Trajectory | None = None,
        generator: torch.Generator | None = None) -> Importance:
    """omega = (1/N) sum_x |d ||f(x)||_2^2 / d w|, f the logits (Aljundi et al. 2018, ECCV).

    The paper's per-example form via `mas_importance` (the released code's default takes |.|
    of the batch-summed gradient, letting signs cancel). Label-free: y and `loss_fn` unused."""
    x, _, task = _all_inputs(batches)
    with eval_mode(model):
        scores = mas_importance(model, x, task)
    return _only_profiled(model, scores)


@_register("taylor", "first-order Taylor (g_b*w)^2, batch-mean gradient, mean over batches (Molchanov 2019)")
def taylor(model: nn.Module, batches: Batches, loss_fn: LossFn, *,
           trajectory: Trajectory | None = None,
           generator: torch.Generator | None = None) -> Importance:
    """omega = (1/M) sum_b (g_b * w)^2, g_b = d loss_fn(model(x_b), y_b) / d w, the gradient of
    the batch-mean loss, M batches.

    Molchanov, Mallya, Tyree, Frosio & Kautz 2019 ("Importance estimation for neural network
    pruning", CVPR), first-order criterion per parameter: the squared first-order Taylor
    estimate of the loss change when w is set to 0, scores summed over mini-batches and
    divided by their number (NVlabs/Taylor_pruning). Variants not used: |g * w| (no square;
    same ranking for one batch, not for a mean over batches) and the 2017 per-feature-map
    |mean(g * z)| (Molchanov et al., ICLR 2017)."""
    params = profiled_parameters(model)
    scores = {name: torch.zeros_like(p) for name, p in params.items()}
    with eval_mode(model):
        for x, y in batches:
            g = _loss_gradient(model, x, y, loss_fn)
            for name, p in params.items():
                scores[name] += (g[name] * p.detach()).pow(2)
    return {name: s / len(batches) for name, s in scores.items()}


@_register("snip", "SNIP connection sensitivity |g*w| on one batch, normalised to sum 1 (Lee et al. 2019)")
def snip(model: nn.Module, batches: Batches, loss_fn: LossFn, *,
         trajectory: Trajectory | None = None,
         generator: torch.Generator | None = None) -> Importance:
    """omega_j = |g_j * w_j| / sum_k |g_k * w_k|, g = d loss_fn(model(x_1), y_1) / d w on the
    FIRST batch only; the sum runs over every profiled weight and bias of the model.

    Lee, Ajanthan & Torr 2019 ("SNIP: single-shot network pruning based on connection
    sensitivity", ICLR; namhoonlee/snip-public): d L(c * w) / d c at c = 1 equals w * dL/dw,
    normalised globally, biases included, from one mini-batch. SNIP scores a network at
    initialisation; the profiler scores it wherever it is asked (after training, say). The
    normalisation does not change the ranking; all-zero saliencies stay zero."""
    x, y = batches[0]
    params = profiled_parameters(model)
    with eval_mode(model):
        g = _loss_gradient(model, x, y, loss_fn)
    saliency = {name: (g[name] * p.detach()).abs() for name, p in params.items()}
    total = sum(s.sum() for s in saliency.values())
    total = total.clamp_min(torch.finfo(total.dtype).tiny)
    return {name: s / total for name, s in saliency.items()}


# ----------------------------------------------------------------------------------------------
# Trajectory measures (need a TrajectoryRecorder's Trajectory)


@_register("si", "SI: relu(path integral / ((w - w_start)^2 + 1e-3)) (Zenke et al. 2017)",
           needs_trajectory=True)
def si(model: nn.Module, batches: Batches, loss_fn: LossFn, *,
       trajectory: Trajectory | None = None,
       generator: torch.Generator | None = None) -> Importance:
    """omega = relu(P / ((w_now - w_start)^2 + xi)), xi = 1e-3,
    P = sum_t -g_t * (w_t - w_{t-1}) the recorded path integral (Trajectory.si_path).

    Zenke, Poole & Ganguli 2017 ("Continual learning through synaptic intelligence", ICML;
    ganguli-lab/pathint): each weight's share of the drop in the training loss, divided by
    how far it moved. w_now is the model's weight now, w_start the weight when recording
    began; the ReLU is the reference code's. xi = 1e-3 is the paper's split-CIFAR value
    (permuted MNIST used 0.1; engram's SI method defaults to 0.1)."""
    traj = _require(trajectory, "si")
    return {name: torch.relu(traj.si_path[name]
                             / ((p.detach() - traj.start[name]).pow(2) + SI_DAMPING))
            for name, p in profiled_parameters(model).items()}


def _inverse_count(model: nn.Module, counts: dict[str, torch.Tensor]) -> Importance:
    """omega = 1 / (1 + D): HM's convention, a weight that moves or flips a lot matters less."""
    return {name: 1.0 / (1.0 + counts[name]) for name in profiled_parameters(model)}


@_register("weight_change", "1/(1 + path length sum|dw|): weights that travel far matter less (HM, fixed)",
           needs_trajectory=True)
def weight_change(model: nn.Module, batches: Batches, loss_fn: LossFn, *,
                  trajectory: Trajectory | None = None,
                  generator: torch.Generator | None = None) -> Importance:
    """omega = 1 / (1 + D), D = sum_t |w_t - w_{t-1}| (Trajectory.path_length).

    HM's "weight change" measure and its convention that a weight that moves a lot is less
    important (hmcalister/Neural-Network-Weight-Importance-Measures). HM's D was the signed
    sum of steps, which telescopes to w_T - w_0 and makes omega negative or infinite; here D
    is the path length, so omega is in (0, 1] and decreases with D."""
    return _inverse_count(model, _require(trajectory, "weight_change").path_length)


@_register("sign_flips", "1/(1 + number of sign changes of w during training) (HM)",
           needs_trajectory=True)
def sign_flips(model: nn.Module, batches: Batches, loss_fn: LossFn, *,
               trajectory: Trajectory | None = None,
               generator: torch.Generator | None = None) -> Importance:
    """omega = 1 / (1 + D), D = #{t: w_t * w_{t-1} < 0}, steps where the weight changed sign
    (Trajectory.sign_flips), counted over the whole recording (HM's sign-flipping measure,
    reset_on_train_begin=False). Counts tie a lot: the aggregation breaks ties at random."""
    return _inverse_count(model, _require(trajectory, "sign_flips").sign_flips)


@_register("direction_flips", "1/(1 + number of reversals of the update direction) (HM momentum)",
           needs_trajectory=True)
def direction_flips(model: nn.Module, batches: Batches, loss_fn: LossFn, *,
                    trajectory: Trajectory | None = None,
                    generator: torch.Generator | None = None) -> Importance:
    """omega = 1 / (1 + D), D = #{t: (w_t - w_{t-1}) * (w_{t-1} - w_{t-2}) < 0}, steps whose
    update reverses the previous one (Trajectory.direction_flips; HM's "momentum-based"
    measure). A step that leaves the weight unchanged is not a reversal."""
    return _inverse_count(model, _require(trajectory, "direction_flips").direction_flips)


# ----------------------------------------------------------------------------------------------
# Continual backprop's contribution utility (a unit-level measure)


def _forward_mass(x_next: torch.Tensor, next_layer: nn.Module, n_units: int) -> torch.Tensor:
    """(B, n_units): for each unit of the previous layer, sum over the elements j of its output
    that `next_layer` reads (x_next: that layer's input) of |x_j| * sum of |weights reading x_j|."""
    if isinstance(next_layer, nn.Linear):
        reads = next_layer.weight.detach().abs().sum(dim=0)  # (F,): sum_k |W[k, j]|
        mass = x_next.abs().flatten(1) * reads               # (B, F)
    else:  # Conv2d: every position of input channel c is read by all of W[:, c] (edges aside)
        if next_layer.groups != 1:
            raise ValueError("cbp_utility supports convolutions with groups=1 only")
        reads = next_layer.weight.detach().abs().sum(dim=(0, 2, 3))  # (C,)
        mass = x_next.abs().sum(dim=(2, 3)) * reads                  # (B, C)
    if mass.shape[1] % n_units:
        raise ValueError(f"cbp_utility: a layer with {n_units} units feeds {mass.shape[1]} inputs "
                         "of the next layer; it needs a chain of layers (one after another)")
    return mass.reshape(len(mass), n_units, -1).sum(dim=2)  # Flatten keeps a channel contiguous


@_register("cbp_utility", "continual backprop's contribution utility of the unit: mean |h_i| sum_k |w_ki|")
def cbp_utility(model: nn.Module, batches: Batches, loss_fn: LossFn, *,
                trajectory: Trajectory | None = None,
                generator: torch.Generator | None = None) -> Importance:
    """Unit i of a hidden layer: u_i = mean_x |h_i(x)| * sum_k |w_ki|, its outgoing weights
    w_ki in the next layer; every fan-in weight of unit i and its bias get u_i. Output units
    (the last layer): u_i = mean_x |output_i(x)|.

    Dohare et al. 2024 (Nature, "Loss of plasticity in deep continual learning", Methods,
    eq. 1: the contribution utility of continual backprop), instantaneous version over the
    given examples (no running average with decay 0.99, no age or mean correction: those
    serve replacement during training, not a snapshot). h_i is the unit's output as the next
    layer reads it (after activation, pooling, flattening), recorded with forward hooks that
    are removed afterwards. Convolutional units (channels) sum |h| over the positions the
    next layer reads: u_i = mean_x sum_j |h_ij| * (sum of |w| reading h_ij), which for a
    next Conv2d is sum_p |h_ip| * sum |W[:, i]| (padding edges counted as read). Within a
    layer this equals, up to one constant factor, shibhansh/loss-of-plasticity convGnT's
    'contribution' (mean instead of sum), so layer-wise rankings agree. The model must be a
    chain: layer l's units are read by the next Linear/Conv2d in named_modules order; for
    the output layer (no outgoing weights) the spec's choice is mean |output|. Scales differ
    between layers, so model-wide comparisons of this measure are only indicative.
    `loss_fn` and labels are unused."""
    layers = [module for _, module in profiled_layers(model)]
    seen: dict[int, torch.Tensor] = {}  # index of a layer -> its input (or the last one's output)

    def keep_input(index: int):
        return lambda module, args: seen.__setitem__(index, args[0].detach())

    hooks = [layer.register_forward_pre_hook(keep_input(i)) for i, layer in enumerate(layers) if i > 0]
    hooks.append(layers[-1].register_forward_hook(
        lambda module, args, out: seen.__setitem__(len(layers), out.detach())))
    sums = [torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype, device=layer.weight.device)
            for layer in layers]  # (units of layer l,)
    n = 0
    try:
        with eval_mode(model), torch.no_grad():
            for x, _ in batches:
                model(x)
                for l, layer in enumerate(layers[:-1]):
                    sums[l] += _forward_mass(seen[l + 1], layers[l + 1], len(sums[l])).sum(dim=0)
                out = seen[len(layers)].abs()                                # (B, O, ...)
                sums[-1] += out.reshape(len(out), out.shape[1], -1).mean(dim=2).sum(dim=0)
                n += len(x)
    finally:
        for hook in hooks:
            hook.remove()
    scores: Importance = {}
    for (name, layer), total in zip(profiled_layers(model), sums):
        utility = total / n  # (units,)
        for pname, p in layer.named_parameters(recurse=False):
            shape = (-1,) + (1,) * (p.dim() - 1)  # unit i = row i of weight, bias[i]
            scores[f"{name}.{pname}" if name else pname] = utility.reshape(shape).expand_as(p).clone()
    return _only_profiled(model, scores)


__all__ = ["Batches", "Importance", "MEASURES", "MeasureFn", "PROFILED_MODULES", "SI_DAMPING",
           "Trajectory", "profiled_layers", "profiled_parameters"]
