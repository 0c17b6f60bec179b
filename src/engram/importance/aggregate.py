"""Group weights, rank the groups by importance, threshold them and evaluate the results.

The profiler asks: if the fraction t of a model's weights that a measure deems least (or
most) important is replaced by small random values, how much does the validation loss rise?
This module does everything after the importance measure, for every threshold at once:

1. `make_groups`: which elements are ranked together. Profiled are all parameters (weight
   and bias) of every nn.Linear and nn.Conv2d module, output head included; a "layer" is one
   such module, numbered in `model.named_modules()` order.
   - weight: every element is its own group.
   - unit: output unit i of a Linear is row i of weight (out, in), i.e. its *fan-in* (dim 1),
     plus bias[i]; of a Conv2d, output channel i's kernel weight[i] (in, kh, kw) plus bias[i].
     (The earlier "HM" attempt reduced a Keras (in, out) kernel over axis -1, i.e. over an
     *input* unit's fan-out, and a conv kernel across filters: the bug this avoids.)
   - filter: a Conv2d output channel's whole kernel plus its bias, the same groups as unit;
     a Linear layer has no filters, its "filters" are its units (so on an MLP, filter and
     unit give identical groups).
   - layer: one group per module (weight and bias).
2. `group_scores`: one score per group, the mean, min or max of its elements' importance.
3. `replacement_order`: the rank of each group inside its scope (its layer, or the whole
   model), 0 = replaced first; least_first sorts by ascending importance, most_first by
   descending; ties are broken uniformly at random (a random permutation, then a stable
   sort), so count-valued measures with many equal scores still replace exactly the asked
   fraction (HM's strict `<` against a quantile never replaced tied weights).
4. `replacement_values`: what a replaced element becomes, drawn once and shared by every
   threshold: normal  N(0, (scale * std(W_layer))^2), std with correction 0 as numpy's
   np.std (HM's rule, scale 0.1), or zero.
5. `thresholded_parameters`: for thresholds t_1..t_T, the stacked parameter sets
   {name: (T, *shape)}: within each scope s with n_s groups, the groups of rank
   < round(t * n_s) take the replacement values, the others keep the trained values.
   torch.round rounds half to even, like Python's round. One broadcast comparison
   `order < k[t, scope]` builds every threshold's mask at once.
6. `evaluate_stacked`: mean cross-entropy and accuracy of every parameter set, vectorised
   with torch.func.vmap over torch.func.functional_call, several sets per pass, in chunks
   that bound memory. The model itself is never changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from engram.importance.measures import Importance, profiled_layers

AGGREGATIONS: tuple[str, ...] = ("weight", "unit", "filter", "layer")
REDUCERS: tuple[str, ...] = ("mean", "min", "max")
SCOPES: tuple[str, ...] = ("layer", "model")
DIRECTIONS: tuple[str, ...] = ("least_first", "most_first")
REPLACEMENTS: tuple[str, ...] = ("normal", "zero")
# One evaluation pass (parameter sets x examples x activations) may hold about this many
# floats (128 MiB in float32); evaluate_stacked picks its chunk sizes from it.
CHUNK_BUDGET_FLOATS = 2**25


@dataclass
class Groups:
    """Which group every profiled element belongs to. G groups, numbered 0..G-1 layer by layer."""
    index: dict[str, torch.Tensor]  # param name -> int64 group id of each element (param shape)
    layer: torch.Tensor             # (G,) layer number of each group
    size: torch.Tensor              # (G,) elements in each group

    @property
    def n_groups(self) -> int:
        return len(self.layer)


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {choices}")


def _layer_group_ids(weight: torch.Tensor, has_bias: bool,
                     aggregation: str) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Group ids 0..n-1 of one layer: (ids like weight, ids like bias or None, n groups)."""
    out = weight.shape[0]
    device = weight.device
    if aggregation == "weight":
        n_weight = weight.numel()
        weight_ids = torch.arange(n_weight, device=device).view(weight.shape)
        bias_ids = n_weight + torch.arange(out, device=device) if has_bias else None
        return weight_ids, bias_ids, n_weight + (out if has_bias else 0)
    if aggregation in ("unit", "filter"):
        # Output unit / channel i: the whole slice weight[i] (its fan-in, kernel) and bias[i].
        rows = torch.arange(out, device=device)
        weight_ids = rows.view(out, *([1] * (weight.dim() - 1))).expand(weight.shape).clone()
        return weight_ids, (rows.clone() if has_bias else None), out
    weight_ids = torch.zeros(weight.shape, dtype=torch.long, device=device)  # layer
    bias_ids = torch.zeros(out, dtype=torch.long, device=device) if has_bias else None
    return weight_ids, bias_ids, 1


def make_groups(model: nn.Module, aggregation: str) -> Groups:
    """Group every element of every Linear / Conv2d parameter by `aggregation` (see module doc)."""
    _check_choice(aggregation, AGGREGATIONS, "aggregation")
    known = dict(model.named_parameters())
    index: dict[str, torch.Tensor] = {}
    layers, offset = [], 0
    for number, (prefix, module) in enumerate(profiled_layers(model)):
        names = [f"{prefix}.{p}" if prefix else p for p in ("weight", "bias")]
        for name in names:
            if name not in known and getattr(module, name.rsplit(".", 1)[-1]) is not None:
                raise ValueError(f"parameter {name!r} is shared with another module; "
                                 "the profiler needs every layer to own its parameters")
        weight_ids, bias_ids, n = _layer_group_ids(module.weight, module.bias is not None,
                                                   aggregation)
        index[names[0]] = weight_ids + offset
        if bias_ids is not None:
            index[names[1]] = bias_ids + offset
        layers.append(torch.full((n,), number, dtype=torch.long))
        offset += n
    if not index:
        raise ValueError("the model has no nn.Linear or nn.Conv2d layer to profile")
    device = next(iter(index.values())).device
    layer = torch.cat(layers).to(device)  # (G,)
    all_ids = torch.cat([ids.reshape(-1) for ids in index.values()])
    size = torch.bincount(all_ids, minlength=offset)  # (G,)
    return Groups(index=index, layer=layer, size=size)


def group_scores(importance: Importance, groups: Groups, reducer: str) -> torch.Tensor:
    """(G,) float64 score of every group: mean, min or max of its elements' importance."""
    _check_choice(reducer, REDUCERS, "reducer")
    missing = [name for name in groups.index if name not in importance]
    if missing:
        raise ValueError(f"importance has no entry for {missing}")
    bad = [name for name, ids in groups.index.items() if importance[name].shape != ids.shape]
    if bad:
        raise ValueError(f"importance of {bad} is not shaped like the parameter")
    values = torch.cat([importance[name].detach().reshape(-1).to(torch.float64)
                        for name in groups.index])  # (P,)
    ids = torch.cat([ids.reshape(-1) for ids in groups.index.values()])  # (P,)
    if torch.isnan(values).any():
        raise ValueError("importance contains NaN; it cannot be ranked")
    values, ids = values.to(groups.size.device), ids.to(groups.size.device)
    if reducer == "mean":
        sums = torch.zeros(groups.n_groups, dtype=torch.float64, device=values.device)
        return sums.index_add_(0, ids, values) / groups.size
    reduce = {"min": "amin", "max": "amax"}[reducer]
    out = torch.zeros(groups.n_groups, dtype=torch.float64, device=values.device)
    return out.scatter_reduce_(0, ids, values, reduce=reduce, include_self=False)


def _scope_of_groups(groups: Groups, scope: str) -> torch.Tensor:
    """(G,) scope number of each group: its layer, or 0 for everybody."""
    _check_choice(scope, SCOPES, "scope")
    return groups.layer if scope == "layer" else torch.zeros_like(groups.layer)


def replacement_order(scores: torch.Tensor, groups: Groups, scope: str, direction: str,
                      generator: torch.Generator) -> torch.Tensor:
    """(G,) int64 rank of each group within its scope, 0 = replaced first.

    least_first: ascending score; most_first: descending; ties in uniformly random order
    (a random permutation from `generator`, then stable sorts, which keep that order).
    """
    _check_choice(direction, DIRECTIONS, "direction")
    scope_of = _scope_of_groups(groups, scope)
    n = len(scores)
    perm = torch.randperm(n, generator=generator, device=generator.device).to(scores.device)
    key = scores[perm] if direction == "least_first" else -scores[perm]
    by_score = perm[torch.sort(key, stable=True).indices]  # (G,) group ids, first replaced first
    # Gather each scope's groups together, keeping their score order within the scope.
    queue = by_score[torch.sort(scope_of[by_score], stable=True).indices]  # (G,)
    rank = torch.empty(n, dtype=torch.long, device=scores.device)
    rank[queue] = torch.arange(n, device=scores.device)
    counts = torch.bincount(scope_of)  # (S,)
    first = torch.cumsum(counts, 0) - counts  # (S,) position of each scope's first group
    return rank - first[scope_of]


def _layer_of_names(groups: Groups) -> dict[str, int]:
    return {name: int(groups.layer[ids.reshape(-1)[0]]) for name, ids in groups.index.items()}


def replacement_values(params: dict[str, torch.Tensor], groups_or_model: Groups | nn.Module,
                       kind: str = "normal", scale: float = 0.1,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """What each profiled element becomes when replaced, drawn once: {name: tensor like param}.

    normal: N(0, (scale * std(W))^2), W the weight of the element's layer (biases use their
    layer's weight std), std with correction 0 (numpy's np.std, HM's rule); zero: zeros.
    The profiled names and their layers come from any Groups of the model, or from the
    model itself; the values do not depend on the aggregation.
    """
    _check_choice(kind, REPLACEMENTS, "replacement")
    groups = (groups_or_model if isinstance(groups_or_model, Groups)
              else make_groups(groups_or_model, "layer"))
    if kind == "zero":
        return {name: torch.zeros_like(params[name]) for name in groups.index}
    if generator is None:
        raise ValueError("normal replacement values need a generator")
    layer_of = _layer_of_names(groups)
    weight_std = {layer_of[name]: float(params[name].detach().double().std(correction=0))
                  for name in groups.index if name.rsplit(".", 1)[-1] == "weight"}
    values = {}
    for name in groups.index:
        p = params[name]
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float64,
                            device=generator.device)
        values[name] = (noise * (scale * weight_std[layer_of[name]])).to(p.device, p.dtype)
    return values


def thresholded_parameters(params: dict[str, torch.Tensor], groups: Groups, order: torch.Tensor,
                           scope: str, thresholds: torch.Tensor,
                           values: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                     torch.Tensor]:
    """Stacked parameter sets {name: (T, *shape)} and (T,) float64 fraction of elements replaced.

    At threshold t, in each scope s with n_s groups, the groups of rank < round(t * n_s)
    take `values`, the others keep `params` (new tensors: `params` are not touched). Only the
    profiled names (groups.index) are stacked. `order` must be replacement_order(..., scope).
    Every parameter lies in one scope (make_groups never lets a group span two layers), so
    each parameter's T masks are one broadcast comparison rank < k[:, its scope].
    """
    scope_of = _scope_of_groups(groups, scope)  # (G,)
    device = order.device
    t = torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1).to(device)  # (T,)
    if ((t < 0) | (t > 1)).any():
        raise ValueError("thresholds must lie in [0, 1]")
    n_in_scope = torch.bincount(scope_of)  # (S,)
    if order.shape != scope_of.shape or (order < 0).any() or (order >= n_in_scope[scope_of]).any():
        raise ValueError(f"order is not a within-{scope} ranking of the groups; "
                         f"use replacement_order(..., scope={scope!r})")
    k = torch.round(t[:, None] * n_in_scope[None, :].double()).long()  # (T, S) groups replaced
    stacked = {}
    with torch.no_grad():
        for name, ids in groups.index.items():
            rank = order[ids]  # (*shape) rank of each element's group
            limit = k[:, scope_of[ids.reshape(-1)[0]]].view(-1, *([1] * rank.dim()))  # (T, 1...)
            stacked[name] = torch.where(rank < limit, values[name], params[name])  # (T, *shape)
    return stacked, _fraction_replaced(groups, order, scope_of, n_in_scope, k)


def _fraction_replaced(groups: Groups, order: torch.Tensor, scope_of: torch.Tensor,
                       n_in_scope: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(T,) replaced elements / all elements, from each scope's cumulative group sizes by rank."""
    first = torch.cumsum(n_in_scope, 0) - n_in_scope  # (S,) where each scope starts
    size_by_rank = torch.zeros(groups.n_groups, dtype=torch.float64, device=order.device)
    size_by_rank[first[scope_of] + order] = groups.size.to(order.device, torch.float64)  # (G,)
    cum = torch.cat([size_by_rank.new_zeros(1), torch.cumsum(size_by_rank, 0)])  # (G+1,)
    replaced = (cum[first[None, :] + k] - cum[first][None, :]).sum(1)  # (T,)
    return replaced / cum[-1]


def _activation_floats_per_example(model: nn.Module, x_one: torch.Tensor) -> int:
    """Floats that every leaf module's output holds for one example (one forward on x_one)."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        model(x_one)
    finally:
        for handle in handles:
            handle.remove()
    return max(total, 1)


def _pass_sizes(model: nn.Module, stacked: dict[str, torch.Tensor], x: torch.Tensor,
                n_sets: int, chunk: int | None) -> tuple[int, int]:
    """(parameter sets, examples) per pass so one pass holds about CHUNK_BUDGET_FLOATS floats."""
    per_example = _activation_floats_per_example(model, x[:1])
    examples = max(1, min(len(x), CHUNK_BUDGET_FLOATS // per_example))
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        return min(chunk, n_sets), examples
    per_set = sum(v[0].numel() for v in stacked.values()) + examples * per_example
    return max(1, min(n_sets, CHUNK_BUDGET_FLOATS // per_set)), examples


def _consecutive_distinct(stacked: dict[str, torch.Tensor], n_sets: int) -> torch.Tensor:
    """(T,) bool: set i differs from set i-1 (set 0 always counts as new)."""
    device = next(iter(stacked.values())).device
    same = torch.ones(n_sets - 1, dtype=torch.bool, device=device)  # (T-1,)
    for v in sorted(stacked.values(), key=lambda v: v.numel()):  # cheap ones first
        same &= (v[1:] == v[:-1]).flatten(1).all(1)
        if not same.any():
            break
    return torch.cat([torch.ones(1, dtype=torch.bool, device=device), ~same])


def evaluate_stacked(model: nn.Module, stacked: dict[str, torch.Tensor], x: torch.Tensor,
                     y: torch.Tensor,
                     chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T,) mean cross-entropy and (T,) accuracy of each of the T parameter sets on (x, y).

    `stacked` is {name: (T, *shape)} (names not in it keep the model's own values). Runs
    torch.func.vmap over torch.func.functional_call, `chunk` sets per pass (None: as many
    as fit CHUNK_BUDGET_FLOATS; the examples are split too when one set's activations
    would not fit), in eval mode without gradients. A set equal to the one before it (the
    nested thresholds of coarse groups: a layer-scope "layer" grouping has only 2 distinct
    sets among 0, 0.05, ..., 1) is not evaluated again but given the same results. The
    model is not changed; every module's train/eval mode is restored. Float64 results on
    x's device.
    """
    if not stacked:
        raise ValueError("evaluate_stacked needs stacked parameters")
    sizes = {v.shape[0] for v in stacked.values()}
    if len(sizes) != 1:
        raise ValueError(f"stacked parameters disagree on the number of sets: {sorted(sizes)}")
    if len(y) == 0:
        raise ValueError("evaluate_stacked needs at least one example")
    n_sets = sizes.pop()
    if n_sets == 0:
        raise ValueError("evaluate_stacked needs at least one parameter set")
    with torch.no_grad():
        new = _consecutive_distinct(stacked, n_sets)  # (T,)
        if not new.all():
            distinct = new.nonzero().squeeze(1)  # (U,) the sets to evaluate
            stacked = {name: v[distinct] for name, v in stacked.items()}
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            loss, accuracy = _evaluate_sets(model, stacked, x, y, chunk)  # (U,), (U,)
        finally:
            for module, training in modes:  # every module's own mode, mixed modes too
                module.training = training
    copy_of = (torch.cumsum(new.long(), 0) - 1).to(loss.device)  # (T,) which distinct set
    return loss[copy_of], accuracy[copy_of]


def _evaluate_sets(model: nn.Module, stacked: dict[str, torch.Tensor], x: torch.Tensor,
                   y: torch.Tensor, chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """evaluate_stacked's passes: every set, in chunks of sets and of examples."""
    n_sets, n = next(iter(stacked.values())).shape[0], len(y)
    sets_per_pass, examples_per_pass = _pass_sizes(model, stacked, x, n_sets, chunk)
    loss_sum = torch.zeros(n_sets, dtype=torch.float64, device=x.device)
    correct = torch.zeros(n_sets, dtype=torch.long, device=x.device)
    for s in range(0, n_sets, sets_per_pass):
        part = {name: v[s:s + sets_per_pass] for name, v in stacked.items()}
        for e in range(0, n, examples_per_pass):
            xe, ye = x[e:e + examples_per_pass], y[e:e + examples_per_pass]
            logits = vmap(lambda p, xe=xe: functional_call(model, p, (xe,)))(part)  # (c, m, C)
            c, m = logits.shape[:2]
            ce = F.cross_entropy(logits.flatten(0, 1), ye.repeat(c), reduction="none")  # (c*m,)
            loss_sum[s:s + c] += ce.view(c, m).double().sum(1)
            correct[s:s + c] += (logits.argmax(-1) == ye).sum(1)
    return loss_sum / n, correct.double() / n
