"""Sums of squared (or absolute) per-example gradients in a few batched passes, for the
parameters of nn.Linear and nn.Conv2d layers, without materialising the gradients when a
closed form exists (the trick of BackPACK: Dangel, Kunstner & Hennig 2020, ICLR; and of
Goodfellow 2015, "Efficient per-example gradient computations").

A layer y = W a + b seen by example b at positions t (a sequence, or a conv's output pixels
via unfold) has the per-example gradient of an objective l_b

    dl_b/dW = sum_t g_bt a_bt^T,   dl_b/db = sum_t g_bt,      g_bt = dl_b / dy_bt

so one forward (keeping each layer's input a) and one backward (giving each layer's output
gradient g) yield every example's gradient. With a single position (a Linear on (B, in)):

    sum_b w_b (dl_b/dW)^2 = (w * g^2)^T (a^2)      sum_b w_b |dl_b/dW| = (w * |g|)^T |a|

an outer product of squares, never a (B, out, in) tensor. With several positions, or a layer
called more than once, the square is taken AFTER summing over positions and calls, so the
per-example gradients are materialised in chunks (Conv2d via F.unfold).

The objectives are given as K "seeds" at the model output: the gradient of l_kb with
respect to example b's outputs, (K, B, C). The K backward passes run as one batched
backward (autograd.grad(..., is_grads_batched=True)); the result is

    sum_k sum_b w_kb reduce(dl_kb / d theta)       reduce = square or abs

Memory: a budget of floats bounds what is materialised at once; when it is small next to
K (the exact Fisher with many classes on a big layer), the K seeds run and are materialised
in groups, and the weighted sums add up over the groups.

Conditions, checked by `hooked_layers` on a few examples (a layer failing one falls back to
torch.func): every call of the layer sees one row per example (not (B*T, D) from a reshape,
nor a task's subset of rows), and the layer's parameters are used only through its forward.
Assumed, not checked: examples do not interact (eval mode; BatchNorm in eval mode is fine).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp, vmap

Reduce = Literal["square", "abs"]
# seeds_fn(outputs (B, C), detached) -> (seeds (K, B, C), weights (K, B))
SeedsFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


def _closed_form_ok(module: nn.Module) -> bool:
    """Whether unfold reproduces this layer's forward (zero padding, numeric padding)."""
    if isinstance(module, nn.Conv2d):
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return isinstance(module, nn.Linear)


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Linear / Conv2d submodules whose parameters are their own (not shared with another
    module) and appear in model.named_parameters(): {module name: module}."""
    names = {id(p): name for name, p in model.named_parameters()}
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, SUPPORTED_LAYERS) or not _closed_form_ok(module):
            continue
        own = list(module.named_parameters(recurse=False))
        if own and all(owners[id(p)] == 1 and names.get(id(p)) == f"{name}.{local}".lstrip(".")
                       for local, p in own):
            layers[name] = module
    return layers


@contextmanager
def _recording(layers: dict[str, nn.Module]) -> Iterator[dict[str, list]]:
    """Forward hooks keeping (input, output) of every call of every layer. The model goes on
    with a clone of the output, so an in-place op after the layer (ReLU(inplace=True)) cannot
    change the tensor whose gradient is asked for."""
    calls: dict[str, list] = {name: [] for name in layers}

    def keep(name: str):
        def hook(module, inputs, output):
            calls[name].append((inputs[0].detach(), output))
            return output.clone()
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in layers.items()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _positions(module: nn.Module, a: torch.Tensor, g: torch.Tensor):
    """Input patches and output gradients of one call, position-major: Linear (B, T, in) and
    (K, B, T, out), T positions (1 for a Linear on (B, in)); Conv2d (B, G, T, in/G) and
    (K, B, G, T, out/G), G groups, T output pixels, in = in_channels x kernel area."""
    batch = a.shape[0]
    if isinstance(module, nn.Linear):
        return a.reshape(batch, -1, a.shape[-1]), g.reshape(g.shape[0], batch, -1, g.shape[-1])
    patches = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
    groups = module.groups
    patches = patches.reshape(batch, groups, -1, patches.shape[-1]).transpose(-1, -2)
    g = g.reshape(g.shape[0], batch, groups, module.out_channels // groups, -1).transpose(-1, -2)
    return patches, g


def _per_example(module: nn.Module, calls: list, grads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-example gradients {local name: (K, B, *shape)} summed over positions and calls."""
    out: dict[str, torch.Tensor] = {}
    for (a, _), g in zip(calls, grads):
        patches, g = _positions(module, a, g)
        if isinstance(module, nn.Linear):
            weight = torch.einsum("kbto,bti->kboi", g, patches)
            bias = g.sum(-2)
        else:
            weight = torch.einsum("kbgto,bgti->kbgoi", g, patches)
            weight = weight.reshape(*weight.shape[:2], *module.weight.shape)
            bias = g.sum(-2).flatten(-2)
        out["weight"] = out.get("weight", 0) + weight
        if module.bias is not None:
            out["bias"] = out.get("bias", 0) + bias
    return out


def _reduce(t: torch.Tensor, reduce: Reduce) -> torch.Tensor:
    return t.pow(2) if reduce == "square" else t.abs()


def _groups(n_seeds: int, floats_per_gradient: int, budget_floats: int) -> tuple[int, int]:
    """(seeds per group, examples per chunk) so that the per-example gradients materialised
    at once, seeds x examples x floats_per_gradient, fit budget_floats: all K seeds and as
    many examples as fit; or, when one example's K gradients do not fit, one example and as
    many seeds as fit. At least one of each (one gradient larger than the budget is not cut)."""
    per_group = min(n_seeds, max(1, budget_floats // max(1, floats_per_gradient)))
    return per_group, max(1, budget_floats // max(1, per_group * floats_per_gradient))


def _weighted_sums(per_example: dict[str, torch.Tensor], weights: torch.Tensor, reduce: Reduce,
                   in_place: bool) -> dict[str, torch.Tensor]:
    """{name: sum_ij weights_ij reduce(per_example[name][i, j])}, values (I, J, *shape) and
    weights (I, J): (K, B) or (B, K). A contraction (tensordot), not a weighted copy summed;
    in_place=True squares the values in place (only for tensors this chunk owns: autograd's
    gradients may alias the seeds or one another)."""
    sums = {}
    for name, value in per_example.items():
        if in_place:
            value = value.pow_(2) if reduce == "square" else value.abs_()
        else:
            value = _reduce(value, reduce)
        sums[name] = torch.tensordot(weights, value, dims=2)
    return sums


def _accumulate(module: nn.Module, calls: list, grads: list[torch.Tensor], weights: torch.Tensor,
                reduce: Reduce, budget_floats: int) -> dict[str, torch.Tensor]:
    """sum_k sum_b w_kb reduce(per-example gradient), {local name: shape of the parameter}.
    grads[i]: (K, B, *output shape) of call i; weights (K, B)."""
    a = calls[0][0]
    if len(calls) == 1 and isinstance(module, nn.Linear) and a.dim() == 2:
        # closed form: (w * r(g))^T r(a), r = square or abs, summed over k first: (B, out)
        per_unit = torch.einsum("kb,kbo->bo", weights, _reduce(grads[0], reduce))
        result = {"weight": per_unit.T @ _reduce(a, reduce)}
        if module.bias is not None:
            result["bias"] = per_unit.sum(0)
        return result
    # materialise per-example gradients (seeds, examples, *shape): seeds x examples x P
    # floats within the budget, cutting the K seeds too when one example's K do not fit
    n_params = sum(p.numel() for p in module.parameters(recurse=False))
    k, batch = weights.shape
    per_group, chunk = _groups(k, n_params, budget_floats)
    result: dict[str, torch.Tensor] = {}
    for start in range(0, batch, chunk):
        part = slice(start, start + chunk)
        sliced = [(a_i[part], None) for a_i, _ in calls]
        for first in range(0, k, per_group):
            group = slice(first, first + per_group)
            per_example = _per_example(module, sliced, [g[group, part] for g in grads])
            # the einsums' outputs are this chunk's own: reduced in place
            for name, value in _weighted_sums(per_example, weights[group, part], reduce,
                                              in_place=True).items():
                result[name] = result.get(name, 0) + value
    return result


def _batched_backward(outputs: torch.Tensor, tensors: list[torch.Tensor],
                      seeds: torch.Tensor) -> list[torch.Tensor | None]:
    """Gradients (K, *shape) of <outputs, seeds[k]> with respect to each tensor (None where
    unused): one vmapped backward, or K plain ones where vmap cannot batch an op's backward."""
    if seeds.shape[0] > 1:
        try:
            return list(torch.autograd.grad(outputs, tensors, seeds, allow_unused=True,
                                            retain_graph=True, is_grads_batched=True))
        except RuntimeError:  # an op without a batching rule for its backward
            pass
    per_seed = [torch.autograd.grad(outputs, tensors, seed, allow_unused=True, retain_graph=True)
                for seed in seeds]
    return [None if parts[0] is None else torch.stack(parts) for parts in zip(*per_seed)]


def hooked_statistic(model: nn.Module, params: dict[str, torch.Tensor],
                     layers: dict[str, nn.Module], x: torch.Tensor, task: torch.Tensor,
                     seeds_fn: SeedsFn, reduce: Reduce,
                     budget_floats: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One forward of x (B, ...) and K batched backward passes: {parameter name of a layer in
    `layers`: sum_k sum_b w_kb reduce(dl_kb/dtheta)}, and the outputs (B, C), detached.

    `params` ({name: tensor}) replaces the model's parameters (functional_call) with leaves
    that require grad, so frozen parameters and the model's .grad are left alone."""
    leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
    with torch.enable_grad(), _recording(layers) as calls:
        outputs = functional_call(model, leaves, (x, task))
    seeds, weights = seeds_fn(outputs.detach())
    called = [name for name in layers if calls[name]]
    tensors = [out for name in called for _, out in calls[name]]
    # a backward of a group of seeds holds their gradients at the layers' outputs next to the
    # forward's activations: groups of seeds such that (group + 1) x activations fit the budget
    activations = sum(a.numel() + out.numel() for name in called for a, out in calls[name])
    n_seeds = seeds.shape[0]
    per_group = min(n_seeds, max(1, budget_floats // max(1, activations) - 1))
    result: dict[str, torch.Tensor] = {}
    for first in range(0, n_seeds, per_group):
        group = slice(first, first + per_group)
        grads = _batched_backward(outputs, tensors, seeds[group])
        position = 0
        for name in called:
            module = layers[name]
            n_calls = len(calls[name])
            layer_grads = grads[position:position + n_calls]
            position += n_calls
            layer_grads = [torch.zeros(seeds[group].shape[:1] + out.shape, dtype=out.dtype,
                                       device=out.device)
                           if g is None else g for g, (_, out) in zip(layer_grads, calls[name])]
            for local, value in _accumulate(module, calls[name], layer_grads, weights[group],
                                            reduce, budget_floats).items():
                full = f"{name}.{local}".lstrip(".")
                result[full] = result.get(full, 0) + value
    for name, module in layers.items():  # never called: zero gradient
        if not calls[name]:
            for local, p in module.named_parameters(recurse=False):
                result[f"{name}.{local}".lstrip(".")] = torch.zeros_like(p)
    return result, outputs.detach()


def _rows_are_examples(calls: list, n_examples: int) -> bool:
    return all(a.shape[0] == n_examples and out.shape[0] == n_examples for a, out in calls)


def hooked_layers(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                  task: torch.Tensor, n_check: int = 4) -> dict[str, nn.Module]:
    """The candidate layers whose every call sees one row per example (input and output
    (n, ...), n the examples) and whose hooked per-example gradients, summed over the first
    `n_check` examples, equal autograd's gradient of the sum (a parameter also used outside
    its layer's forward, e.g. tied or read by F.linear elsewhere, fails); the others are left
    to the torch.func fallback. The objective is sum_b ||f(x_b)||^2 / 2."""
    layers = candidate_layers(model)
    if not layers:
        return {}
    xs, ts = x[:n_check], task[:n_check]
    leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
    with torch.enable_grad(), _recording(layers) as calls:
        outputs = functional_call(model, leaves, (xs, ts))
    names = [f"{name}.{local}".lstrip(".") for name, module in layers.items()
             for local, _ in module.named_parameters(recurse=False)]
    called = [name for name in layers if calls[name]]
    tensors = [out for name in called for _, out in calls[name]]
    seed = outputs.detach()
    reference = torch.autograd.grad(outputs, [leaves[n] for n in names] + tensors, seed,
                                    allow_unused=True)
    by_param = dict(zip(names, reference[:len(names)]))
    grads = reference[len(names):]
    passed = {}
    position = 0
    summed: dict[str, torch.Tensor] = {}
    for name in called:
        n_calls = len(calls[name])
        layer_grads = [torch.zeros_like(out) if g is None else g
                       for g, (_, out) in zip(grads[position:position + n_calls], calls[name])]
        position += n_calls
        if not _rows_are_examples(calls[name], len(xs)):
            continue  # fails below
        # one example at a time: P floats at once, not n_check x P (a big Linear's P is large)
        for i in range(len(xs)):
            one = [(a[i:i + 1], None) for a, _ in calls[name]]
            per_example = _per_example(layers[name], one,
                                       [g[i:i + 1].unsqueeze(0) for g in layer_grads])
            for local, value in per_example.items():
                full = f"{name}.{local}".lstrip(".")
                summed[full] = summed.get(full, 0) + value.sum((0, 1))
    for name, module in layers.items():
        # Rows must be examples: a layer fed (B*T, D) from a reshape, or each task's rows
        # h[mask], sums correctly over the batch (the check below) but not per example.
        ok = _rows_are_examples(calls[name], len(xs))
        for local, p in module.named_parameters(recurse=False):
            full = f"{name}.{local}".lstrip(".")
            expected = by_param[full] if by_param[full] is not None else torch.zeros_like(p)
            got = summed.get(full, torch.zeros_like(p))
            scale = float(expected.abs().max()) if expected.numel() else 0.0
            if not math.isfinite(scale) or not torch.allclose(got, expected, rtol=1e-3,
                                                                atol=1e-4 * scale + 1e-12):
                ok = False
        if ok:
            passed[name] = module
    return passed


def layer_parameter_names(layers: dict[str, nn.Module]) -> set[str]:
    return {f"{name}.{local}".lstrip(".") for name, module in layers.items()
            for local, _ in module.named_parameters(recurse=False)}


def activation_floats(layers: dict[str, nn.Module], model: nn.Module,
                      params: dict[str, torch.Tensor], x: torch.Tensor,
                      task: torch.Tensor) -> int:
    """Floats the hooked layers keep per example (inputs + outputs), from a one-example forward."""
    with torch.no_grad(), _recording(layers) as calls:
        functional_call(model, params, (x[:1], task[:1]))
    return sum(a.numel() + out.numel() for records in calls.values() for a, out in records)


def func_statistic(model: nn.Module, params: dict[str, torch.Tensor], names: list[str],
                   x: torch.Tensor, task: torch.Tensor, seeds: torch.Tensor,
                   weights: torch.Tensor, reduce: Reduce,
                   budget_floats: int) -> dict[str, torch.Tensor]:
    """The fallback for any parameter: {name in `names`: sum_k sum_b w_kb reduce(dl_kb/dtheta)}
    with per-example gradients from torch.func (vmap over examples of a vjp, itself vmapped
    over the seeds), examples x seeds x P floats at a time within `budget_floats` (the K
    seeds cut into groups when one example's K gradients do not fit; see _groups)."""
    frozen = {name: p for name, p in params.items() if name not in names}
    wanted = {name: params[name] for name in names}

    def pullbacks(sub, x_one, task_one, seeds_one):  # seeds_one (K, C) -> {name: (K, *shape)}
        _, pullback = vjp(lambda s: functional_call(model, {**frozen, **s},
                                                    (x_one.unsqueeze(0), task_one.unsqueeze(0)))
                          .squeeze(0), sub)
        return vmap(pullback)(seeds_one)[0]

    per_example = vmap(pullbacks, in_dims=(None, 0, 0, 1))
    n_seeds = seeds.shape[0]
    per_group, chunk = _groups(n_seeds, sum(p.numel() for p in wanted.values()), budget_floats)
    result = {name: torch.zeros_like(p) for name, p in wanted.items()}
    for start in range(0, len(x), chunk):
        part = slice(start, start + chunk)
        for first in range(0, n_seeds, per_group):
            group = slice(first, first + per_group)
            grads = per_example(wanted, x[part], task[part], seeds[group, part])  # (b, k, *shape)
            for name, value in _weighted_sums(grads, weights[group, part].T, reduce,
                                              in_place=False).items():
                result[name] += value
    return result


def per_example_statistic(model: nn.Module, x: torch.Tensor, task: torch.Tensor,
                          seeds_fn: SeedsFn, reduce: Reduce, n_seeds: int, *,
                          chunk_size: int | None, budget_floats: int,
                          fast: bool = True) -> dict[str, torch.Tensor]:
    """{parameter name: sum_b sum_k w_kb reduce(dl_kb/dtheta)} over all examples x (N, ...).

    Parameters of Linear / Conv2d layers that pass `hooked_layers`' check use the hooked
    passes; every other parameter (or all of them with fast=False) uses `func_statistic`.
    `seeds_fn` is called once per chunk of `chunk_size` examples, in order (it may draw
    random labels). chunk_size=None: the largest chunk whose memory fits `budget_floats`
    (hooked layers: their activations x (n_seeds + 1) per example; torch.func: n_seeds x P
    per example), at least 1. Whatever the chunk, what is materialised at once stays within
    the budget where one example's single gradient does: the hooked backward runs the seeds
    in groups of (budget / the chunk's activations) - 1, and per-example gradients are
    materialised in pieces of examples x seeds x P floats (`_groups`: the K seeds of one
    example are cut into groups when they do not fit), summed as they come."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    layers = hooked_layers(model, params, x, task) if fast else {}
    hooked_names = layer_parameter_names(layers)
    rest = [name for name in params if name not in hooked_names]
    if chunk_size is None:
        if layers:
            per_example = activation_floats(layers, model, params, x, task) * (n_seeds + 1)
        else:
            per_example = n_seeds * sum(params[name].numel() for name in rest)
        chunk_size = max(1, budget_floats // max(1, per_example))
    result = {name: torch.zeros_like(p) for name, p in params.items()}
    drawn: list[tuple[torch.Tensor, torch.Tensor]] = []  # this chunk's seeds, for torch.func

    def remember(outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        drawn[:] = [seeds_fn(outputs)]
        return drawn[0]

    for start in range(0, len(x), chunk_size):
        xs, ts = x[start:start + chunk_size], task[start:start + chunk_size]
        if layers:
            hooked, _ = hooked_statistic(model, params, layers, xs, ts, remember, reduce,
                                         budget_floats)
            seeds, weights = drawn[0]
            for name, value in hooked.items():
                result[name] += value
        else:
            with torch.no_grad():
                seeds, weights = seeds_fn(functional_call(model, params, (xs, ts)))
        if rest:
            for name, value in func_statistic(model, params, rest, xs, ts, seeds, weights,
                                              reduce, budget_floats).items():
                result[name] += value
    return result
