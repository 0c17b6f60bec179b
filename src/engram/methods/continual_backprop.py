"""Continual backprop (CBP): keep plasticity by reinitialising the least useful hidden units
(Dohare et al., "Loss of plasticity in deep continual learning", Nature 632, 2024; arXiv
2108.06325; code shibhansh/loss-of-plasticity @63c35f3 "LoP", lop/algos/cbp.py + gnt.py).

Hidden unit i of layer l is the output h_i of the activation module after the l-th Linear of
the body; its input weights are row W_l[i, :] (+ bias b_l[i]), its outgoing weights column
W_{l+1}[:, i] of the next Linear (the next body Linear, or the head for the last hidden
layer: with one head per task, every head's rows). After every optimizer step, for every
hidden layer, with h the (B, n) activations of that step's training batch:

    a_i <- a_i + 1                                          age (steps since (re)initialised)
    f_i <- eta f_i + (1 - eta) mean_B h_i                   running mean of the activation
    f^_i = f_i / (1 - eta^a_i)                              bias-corrected (Adam style)
    u_i <- eta u_i + (1 - eta) y_i                          running utility
    u^_i = u_i / (1 - eta^a_i)                              bias-corrected utility, the ranking
    y_i (utility=contribution, Nature eq. 1, the default) = mean_B |h_i| * sum_k |W_{l+1}[k, i]|
    y_i (utility=adaptable_contribution, LoP gnt.py)      = mean_B |h_i - f^_i|
                                   * mean_k |W_{l+1}[k, i]| / mean_j |W_l[i, j]|
    y_i (utility=random)                                  = U(0, 1)

Units with a_i > m (maturity, strict, as gnt.py) are eligible; immature ones never are.
Fractional replacement (gnt.py's accumulate=True, cbp_linear.py): each layer keeps an
accumulator A; every step with n_el > 0 eligible units, A <- A + rho * n_el, the floor(A)
eligible units with the smallest u^ are replaced (ties: lowest index) and A <- A - floor(A).
(Not implemented: gnt.py's default accumulate=False, which replaces one unit with
probability rho * n_el when that is below 1; convGnT/res_gnt's increment rho * width.)
A replaced unit i, in this order:

    b_{l+1} <- b_{l+1} + W_{l+1}[:, i] * f^_i     the next layer absorbs the unit's mean output
    W_l[i, :] ~ U(-bound, bound)                  the layer's initial distribution (`init`)
    b_l[i] = 0,  W_{l+1}[:, i] = 0,  u_i = f_i = a_i = 0

so the network's output does not change at the moment of replacement as far as the unit's
mean output goes (exactly, when the unit's activation was constant).

Variant: the INTENDED bias correction, with f^_i computed before f_i is reset. LoP's gnt.py
sets f_i = 0 in test_features before gen_new_features adds W_{l+1}[:, i] * f_i /
(1 - eta^a_i) to the bias, so its correction adds exactly 0 (a bug); engram does not copy
it. As gnt.py (and unlike the paper's eq. 3, which corrects f_{t-1}), the current batch is
folded into f before f^ is taken. The activations come from the training forward pass, i.e.
before the optimizer step; the weights are the ones after it (cbp.py calls gen_and_test
after opt.step()). Layers are processed in order, all from the same step's activations;
when units of two consecutive layers are replaced in the same step, the weight from the new
lower unit to the new upper unit is set to 0 at the end (`zero_outgoing`: the zero outgoing
weights win over the fresh input row; gnt.py leaves the fresh value there).

`init` (the bounds of LoP's gnt.compute_bounds): default (the default) bound =
sqrt(1 / fan_in), PyTorch's nn.Linear initialisation (kaiming_uniform_ with a = sqrt(5)),
which is the distribution engram's mlp and the residual net's `init: default` draw their
first weights from, so a reset unit starts like a fresh one, as Dohare et al. intend (LoP's
networks start from kaiming with the activation's gain, and LoP redraws from that); kaiming
bound = gain * sqrt(3 / fan_in), nn.init.kaiming_uniform_ with the activation's gain (relu
sqrt 2, tanh 5/3, sigmoid 1, leaky_relu sqrt(2 / (1 + slope^2))): LoP's distribution, and
engram's default before it was corrected (on an engram relu mlp its rows have 2.45x the
spread of the initial weights); lecun sqrt(3 / fan_in); xavier gain * sqrt(6 / (fan_in +
fan_out)); zeros: a zero row, which is the initial distribution of the zero-initialised
sliding-window network (`engram window`, init: zeros). New biases are 0 whatever `init` is,
as in LoP (gnt.py) and ReDo's code.

Residual networks (engram.models.residual.ResidualNet, the sliding-window network): a hidden
unit is the output of a block's activation, added to the residual stream by the identity
skip. Its outgoing weights are that identity's column (so utility=contribution is
mean_B |h_i| * 1), which cannot be zeroed and has no next-layer bias to absorb the unit's mean:
a replacement resets only the unit's input row and bias, and the network's output changes by
the unit's old output minus its new one (0 with init: zeros). This residual rule is
engram's own choice; the papers' networks give every reset unit outgoing weights to zero.

Pluggable utility: `UNIT_UTILITIES` is a registry of functions
`utility(h, w_in, w_out, mean_hat, generator) -> (n,) scores` (higher = more useful), with h
(B, n) the batch's activations, w_in (n, fan_in) and w_out (n_next, n) the live weight
Parameters (read only; their .grad still holds this step's gradient, so e.g. a per-unit
Fisher `(w_in.grad ** 2).sum(1)` fits), mean_hat (n,) = f^ (None when the function was
registered with needs_mean_hat=False, which saves its computation on most steps) and
generator = ctx.generator. Add one with `register_utility("name", fn, "one-line
description")` before the config is parsed; then `{name: continual_backprop, utility: name}`
uses it.

How the activations are read: prepare_model puts a forward hook on each hidden layer's
activation module; make_batch arms it and the first forward pass of the live model after
that (the training forward) is recorded, so evaluation, A-GEM's memory gradients or copies
of the model (LwF, snapshots) are never mixed in. In a compose, put continual_backprop after
any method whose make_batch runs the live network.

Simplifications against LoP: no optimizer-state reset for the replaced weights (LoP's
AdamGnT zeroes their Adam moments; the runner's optimizer is not visible to methods, and a
fresh one is made at each task); mlp bodies only (Conv2d channels are refused with a
ConfigError). State per hidden layer: u, f (float, (n,)) and a (int64, (n,)), the
accumulator A and the count of replaced units. Cost: about a dozen small tensor operations
per layer and step; the number of eligible units is mirrored on the host (`Maturity`), so a
step without a replacement never waits for the device.
Hyperparameters: replacement_rate rho, maturity m, decay eta, utility, init.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import nn

from engram.schema import opt
from engram.errors import ConfigError
from engram.methods.base import Batch, Context, Method
from engram.models.protocol import require_structure, residual_net
from engram.models.residual import Atan
from engram.registry import Registry

UnitUtility = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator],
                       torch.Tensor]
Init = Literal["kaiming", "lecun", "xavier", "default", "zeros"]

# ----------------------------------------------------------------------------- utilities

UNIT_UTILITIES: Registry = Registry("unit utility")


@dataclass(frozen=True)
class UtilitySpec:
    """A registered unit utility: the function, and whether it reads mean_hat."""
    fn: UnitUtility
    needs_mean_hat: bool = True


def register_utility(name: str, fn: UnitUtility, description: str, *,
                     needs_mean_hat: bool = True) -> UnitUtility:
    """Make `fn(h, w_in, w_out, mean_hat, generator) -> (n,)` available as `utility: name`;
    with needs_mean_hat=False it gets mean_hat=None."""
    UNIT_UTILITIES.add(name, UtilitySpec(fn, needs_mean_hat), description)
    return fn


def contribution_utility(h: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
                         mean_hat: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Nature eq. 1: mean_B |h_i| * sum_k |W_{l+1}[k, i]|. h (B, n), w_out (n_next, n) -> (n,).
    (LoP's code takes the mean over k: the same ranking, n_next times smaller.)"""
    return h.abs().mean(0) * w_out.detach().abs().sum(0)


def adaptable_contribution_utility(h: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
                                   mean_hat: torch.Tensor,
                                   generator: torch.Generator) -> torch.Tensor:
    """LoP gnt.py 'adaptable_contribution' (arXiv 2108.06325's overall utility):
    mean_B |h_i - f^_i| * mean_k |W_{l+1}[k, i]| / mean_j |W_l[i, j]|  -> (n,).
    An all-zero input row (zero-initialised nets, init: zeros) would give 0/0: its
    denominator is floored at 1e-12, so such a unit (constant output, no deviation) scores 0
    instead of a NaN that would stick in the running utility."""
    centred = (h - mean_hat).abs().mean(0)  # (n,)
    return centred * w_out.detach().abs().mean(0) / w_in.detach().abs().mean(1).clamp_min(1e-12)


def random_utility(h: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
                   mean_hat: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """U(0, 1) per unit: replace random mature units (LoP's 'random' baseline)."""
    return torch.rand(h.shape[1], generator=generator).to(h.device, h.dtype)


register_utility("contribution", contribution_utility,
                 "mean |h| * sum |outgoing weights| (Nature 2024, eq. 1)", needs_mean_hat=False)
register_utility("adaptable_contribution", adaptable_contribution_utility,
                 "mean |h - f^| * mean |outgoing| / mean |incoming| (LoP gnt.py, arXiv 2108.06325)")
register_utility("random", random_utility, "a uniform random score: random mature units go",
                 needs_mean_hat=False)

# ----------------------------------------------------------------------------- hidden layers

# atan has no gain in nn.init; atan'(0) = 1, so it is given the linear gain 1.
_GAIN_NAMES = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", Atan: "linear"}


def activation_gain(module: nn.Module) -> float:
    """nn.init.calculate_gain for the activation module that follows a Linear."""
    if isinstance(module, nn.LeakyReLU):
        return nn.init.calculate_gain("leaky_relu", module.negative_slope)
    return nn.init.calculate_gain(_GAIN_NAMES[type(module)])


@dataclass
class HiddenLayer:
    """One hidden layer of an mlp body: its units are the outputs of `activation`."""
    name: str              # qualified name of the input Linear, e.g. "body.1"
    linear: nn.Linear      # W_l (n, fan_in): row i = unit i's input weights
    activation: nn.Module  # the module whose output h (B, n) is the layer's units
    # W_{l+1} (n_next, n): column i = unit i's outgoing weights; None for a residual block,
    # whose units are added to the residual stream by the identity skip
    outgoing: nn.Linear | None
    gain: float            # calculate_gain of the activation

    def outgoing_weight(self) -> torch.Tensor:
        """W_{l+1}, or for a residual block the identity (n, n) of its skip connection."""
        if self.outgoing is not None:
            return self.outgoing.weight
        weight = self.linear.weight
        return torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)


def hidden_layers(model: nn.Module, method: str) -> list[HiddenLayer]:
    """The hidden layers of a ContinualNet with an mlp body, in order. ConfigError otherwise
    (the structure need "hidden_units" of engram.models.protocol): the body must be an
    nn.Sequential whose every Linear is directly followed by a ReLU, Tanh, Sigmoid or
    LeakyReLU, with no Conv2d, and the model must have a Linear `head`.
    A ResidualNet (the sliding-window network, also as a black box) has one hidden layer per
    block."""
    require_structure(model, ("hidden_units",), method)
    residual = residual_net(model)
    if residual is not None:
        prefix = "" if residual is model else "module."
        return [HiddenLayer(f"{prefix}blocks.{i}.linear", block.linear, block.activation, None,
                            activation_gain(block.activation))
                for i, block in enumerate(residual.blocks)]
    modules = list(model.body.children())
    linears = [i for i, m in enumerate(modules) if isinstance(m, nn.Linear)]
    layers = []
    for position, i in enumerate(linears):
        after = modules[i + 1]  # an activation: checked by require_structure
        outgoing = modules[linears[position + 1]] if position + 1 < len(linears) else model.head
        layers.append(HiddenLayer(f"body.{i}", modules[i], after, outgoing, activation_gain(after)))
    return layers


def init_bound(layer: HiddenLayer, init: str) -> float:
    """Half-width b of U(-b, b) for a new input row (LoP gnt.compute_bounds); "default" is
    nn.Linear.reset_parameters' bound for the weights, sqrt(1 / fan_in)."""
    fan_in, fan_out = layer.linear.in_features, layer.linear.out_features
    if init == "kaiming":
        return layer.gain * math.sqrt(3.0 / fan_in)
    if init == "lecun":
        return math.sqrt(3.0 / fan_in)
    if init == "xavier":
        return layer.gain * math.sqrt(6.0 / (fan_in + fan_out))
    return math.sqrt(1.0 / fan_in)  # "default": PyTorch's nn.Linear init


def draw_input_rows(layer: HiddenLayer, count: int, init: str,
                    generator: torch.Generator) -> torch.Tensor:
    """(count, fan_in) fresh input rows from U(-b, b), drawn on the CPU generator."""
    weight = layer.linear.weight
    if init == "zeros":
        return torch.zeros(count, weight.shape[1], dtype=weight.dtype, device=weight.device)
    bound = init_bound(layer, init)
    rows = torch.rand(count, weight.shape[1], generator=generator, dtype=weight.dtype)
    return ((2 * rows - 1) * bound).to(weight.device)


@torch.no_grad()
def reinitialise_units(layer: HiddenLayer, units: torch.Tensor, rows: torch.Tensor,
                       mean_hat: torch.Tensor | None) -> None:
    """Give `units` (k,) the input rows `rows` (k, fan_in), bias 0 and zero outgoing weights.
    With mean_hat (n,), first add their mean output to the next layer's bias:
    b_{l+1} += W_{l+1}[:, units] @ mean_hat[units], so the next layer's output is unchanged
    for a unit whose activation equals its mean. A residual block's unit has neither (its
    skip is the identity): only its input row and bias are reset, so the network's output
    changes at replacement by the unit's old output minus act(new row . h)."""
    out = layer.outgoing
    if out is not None and mean_hat is not None and out.bias is not None:
        out.bias += out.weight[:, units] @ mean_hat[units]  # (n_next, k) @ (k,)
    layer.linear.weight[units] = rows
    if layer.linear.bias is not None:
        layer.linear.bias[units] = 0.0
    if out is not None:
        out.weight[:, units] = 0.0


@torch.no_grad()
def zero_outgoing(replaced: list[tuple[HiddenLayer, torch.Tensor]]) -> None:
    """Zero the outgoing columns of every replaced unit again, after all layers are done: when
    units of two consecutive layers are replaced in one step, the new lower unit's outgoing
    weight to the new upper unit is 0 (it would otherwise be part of the upper unit's fresh
    input row), so every replaced unit has exactly zero outgoing weights."""
    for layer, units in replaced:
        if layer.outgoing is not None:
            layer.outgoing.weight[:, units] = 0.0


class ActivationRecorder:
    """Forward hooks that keep the first output of each hidden activation module after `arm()`.

    The hook only records the very module it was put on, so deep copies of the model (which
    carry the hook along) never write here."""

    def __init__(self) -> None:
        self.outputs: dict[str, torch.Tensor] = {}  # layer name -> h (B, n), detached
        self.names: list[str] = []                  # the hooked layers
        self._armed: set[str] = set()
        self._handles: list[Any] = []

    def attach(self, layers: list[HiddenLayer]) -> None:
        """Hook every layer's activation module (removing the hooks of an earlier attach)."""
        for handle in self._handles:
            handle.remove()
        self._handles = [layer.activation.register_forward_hook(
            self._hook(layer.name, layer.activation)) for layer in layers]
        self.names = [layer.name for layer in layers]

    def _hook(self, name: str, owner: nn.Module) -> Callable:
        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if module is owner and name in self._armed:
                self.outputs[name] = output.detach()
                self._armed.discard(name)
        return record

    def arm(self) -> None:
        """Record the next forward pass of every hooked module (forgetting older records)."""
        self.outputs = {}
        self._armed = set(self.names)

    def take(self, name: str) -> torch.Tensor:
        """The recorded (B, n) output of layer `name`; RuntimeError when there is none."""
        if name not in self.outputs:
            raise RuntimeError(f"no activations of {name} were recorded this step: the runner "
                               "calls make_batch (which arms the hooks) before the forward pass")
        return self.outputs[name]


def hooked_layers(model: nn.Module, recorder: ActivationRecorder, method: str) -> list[HiddenLayer]:
    """Find the hidden layers of `model` and put the recorder's hooks on them."""
    layers = hidden_layers(model, method)
    recorder.attach(layers)
    return layers

# ----------------------------------------------------------------------------- the method


@dataclass
class ContinualBackpropParams:
    replacement_rate: float = opt(1e-4, "rho: eligible units replaced per step, per layer "
                                  "(fractions accumulate)", low=0.0, high=1.0)
    maturity: int = opt(100, "m: a unit may be replaced only when its age exceeds this", low=0)
    decay: float = opt(0.99, "eta: decay of the running utility and mean activation (< 1)",
                       low=0.0, high=1.0)
    utility: str = opt("contribution", "unit utility: contribution (Nature eq. 1), "
                       "adaptable_contribution (LoP), random, or one added with register_utility")
    init: Init = opt("default", "distribution of new input weights: default (PyTorch's "
                     "nn.Linear init, which engram's networks start from), kaiming (activation "
                     "gain, as LoP's networks), lecun, xavier, zeros (the zero-initialised "
                     "window network)")

    def __post_init__(self) -> None:
        if self.utility not in UNIT_UTILITIES:
            raise ConfigError(f"continual_backprop.utility: unknown unit utility {self.utility!r}; "
                              f"choose one of: {', '.join(UNIT_UTILITIES.names())}")
        if self.decay >= 1.0:
            raise ConfigError(f"continual_backprop.decay: {self.decay} must be below 1 (the bias "
                              "correction divides by 1 - decay^age)")


class Maturity:
    """A host-side count of a layer's immature units (age <= m), mirroring the age tensor so
    that the number of eligible units needs no device sync. Groups of units are kept as
    [clock at their reset, count]; a group matures once clock - reset > m."""

    def __init__(self, ages: torch.Tensor, maturity: int) -> None:
        self.maturity, self.units, self.clock = maturity, len(ages), 0
        young = ages[ages <= maturity]  # one sync, at prepare/load only
        values, counts = torch.unique(young, return_counts=True)  # ascending ages
        # oldest first, so groups leave from the left: reset clock = -age
        self.groups = deque([-int(a), int(c)] for a, c in zip(values.flip(0), counts.flip(0)))
        self.young = int(counts.sum())

    def tick(self) -> int:
        """Every unit ages by one; returns the number of eligible units (age > m)."""
        self.clock += 1
        while self.groups and self.clock - self.groups[0][0] > self.maturity:
            self.young -= self.groups.popleft()[1]
        return self.units - self.young

    def reset(self, count: int) -> None:
        """`count` eligible units restart at age 0."""
        self.groups.append([self.clock, count])
        self.young += count


_NO_UNITS = torch.zeros(0, dtype=torch.long)  # what a layer with no replacement returns


def _zero_stats(n: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {"utility": torch.zeros(n, device=device), "mean": torch.zeros(n, device=device),
            "age": torch.zeros(n, dtype=torch.long, device=device)}


class ContinualBackprop(Method):
    """Continual backprop: replace the mature hidden units of lowest utility, a few per step."""

    Params = ContinualBackpropParams
    model_needs = ("hidden_units",)

    def __init__(self, params: ContinualBackpropParams | None = None) -> None:
        super().__init__(params)
        self.layers: list[HiddenLayer] = []
        self.recorder = ActivationRecorder()
        self.stats: dict[str, dict[str, torch.Tensor]] = {}  # layer -> u, f (n,), age (n,)
        self.pending: dict[str, float] = {}   # layer -> accumulator A of fractional replacements
        self.replaced: dict[str, int] = {}    # layer -> units replaced so far
        self.last_replaced: dict[str, torch.Tensor] = {}  # layer -> units replaced this step
        self.young: dict[str, Maturity] = {}  # layer -> host mirror of its immature units

    def prepare_model(self, model: nn.Module, ctx: Context) -> nn.Module:
        self.layers = hooked_layers(model, self.recorder, "continual_backprop")
        for layer in self.layers:
            self.stats.setdefault(layer.name, _zero_stats(layer.linear.out_features,
                                                          layer.linear.weight.device))
            self.pending.setdefault(layer.name, 0.0)
            self.replaced.setdefault(layer.name, 0)
        self._mirror_ages()
        return model

    def _mirror_ages(self) -> None:
        self.young = {name: Maturity(s["age"], self.params.maturity)
                         for name, s in self.stats.items()}

    def make_batch(self, batch: Batch, ctx: Context) -> Batch:
        self.recorder.arm()  # the next forward pass is the training forward of this step
        return batch

    def after_step(self, batch: Batch, ctx: Context) -> None:
        self.last_replaced = {}
        for layer in self.layers:
            h = self.recorder.take(layer.name)  # (B, n), from before the optimizer step
            self.last_replaced[layer.name] = self._update_layer(layer, h, ctx.generator)
        zero_outgoing([(layer, units) for layer in self.layers
                       if len(units := self.last_replaced[layer.name])])

    @torch.no_grad()
    def _update_layer(self, layer: HiddenLayer, h: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
        """One step of generate-and-test on one layer; returns the replaced units (k,)."""
        p, spec = self.params, UNIT_UTILITIES.get(self.params.utility)
        stats = self.stats[layer.name]
        if stats["mean"].device != h.device:  # the model moved after prepare_model
            stats = self.stats[layer.name] = {k: v.to(h.device) for k, v in stats.items()}
        eta = p.decay
        stats["age"] += 1
        n_eligible = self.young[layer.name].tick()  # = (age > m).sum(), kept on the host
        stats["mean"].mul_(eta).add_(h.mean(0), alpha=1 - eta)  # f
        correction = mean_hat = None
        if spec.needs_mean_hat:
            correction = 1 - eta ** stats["age"].to(h.dtype)    # (n,) 1 - eta^a
            mean_hat = stats["mean"] / correction                 # f^
        instant = spec.fn(h, layer.linear.weight, layer.outgoing_weight(), mean_hat, generator)
        stats["utility"].mul_(eta).add_(instant, alpha=1 - eta)  # u, (n,)
        count = self._replacement_count(layer.name, n_eligible)
        if count == 0:
            return _NO_UNITS
        if correction is None:
            correction = 1 - eta ** stats["age"].to(h.dtype)
            mean_hat = stats["mean"] / correction
        eligible = stats["age"] > p.maturity  # (n,)
        ranking = torch.where(eligible, stats["utility"] / correction, torch.inf)  # u^, (n,)
        units = torch.sort(ranking, stable=True).indices[:count]  # smallest u^, ties by index
        rows = draw_input_rows(layer, count, p.init, generator)
        reinitialise_units(layer, units, rows, mean_hat)  # bias correction before f is reset
        for key in ("utility", "mean", "age"):
            stats[key][units] = 0
        self.young[layer.name].reset(count)
        self.replaced[layer.name] += count
        return units

    def _replacement_count(self, name: str, n_eligible: int) -> int:
        """A <- A + rho * n_eligible; replace floor(A); A <- A - floor(A) (no change if none
        is eligible, as gnt.py)."""
        if n_eligible == 0:
            return 0
        self.pending[name] += self.params.replacement_rate * n_eligible
        count = min(int(self.pending[name]), n_eligible)
        self.pending[name] -= count
        return count

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats, "pending": dict(self.pending), "replaced": dict(self.replaced)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats = {name: dict(values) for name, values in state["stats"].items()}
        self.pending, self.replaced = dict(state["pending"]), dict(state["replaced"])
        self._mirror_ages()
