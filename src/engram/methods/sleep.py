"""Sleep Replay Consolidation, SRC (Tadros, Krishnan, Ramyaa & Bazhenov 2022, "Sleep-like
unsupervised replay reduces catastrophic forgetting in artificial neural networks",
Nat. Commun. 13:7742). Variant: the authors' MATLAB code, `tmtadros/SleepReplayConsolidation`
(`sleep/sleepnn_old.m`, `utils/normalize_nn_data.m`, `utils/create_masked_input.m`, MNIST
driver `MNIST/run_class_task_summary.m`); reference sheet, section 19.

After each task the trained ReLU MLP (the body's Linear layers, then the head) is run for a
while as a spiking network of integrate-and-fire neurons driven by noisy input spikes, and a
local Hebbian rule changes its weights; the changed weights are the network's weights after.

1. Scale factors (data-based normalisation, Diehl et al. 2015 as coded by the authors), with
   a_l the ReLU activations of layer l on the current task's training images:
       s_l = max(max_ij W_l,ij^+, max_x a_l(x)^+),  lambda_l = s_l / lambda_(l-1)  (lambda_0 = 1),
       alpha_l = alpha_scale / lambda_l.
   The code divides by the previous *applied factor* lambda_(l-1), not by s_(l-1) as the
   reference sheet writes; the code is followed, since its constants were tuned with it.
2. Sleep input: the mean training image of every task seen so far; at each step a random
   square window (side `window_fraction` of the image side, 11 of 28 pixels in the code's
   mask_size 10) is kept and the rest zeroed. Input spikes are Bernoulli,
       s_0,j = [u_j * (1 / (dt max_rate)) / 2 < x_j],  i.e. p_j = min(1, 2 dt max_rate x_j).
3. Integrate-and-fire, layer by layer within one time step (layer l sees layer l-1's spikes
   of the same step):
       v_l <- decay * v_l + alpha_l * W_l s_(l-1);  s_l = [v_l >= threshold * beta_l];
       v_l[s_l] <- 0  (reset; no refractory period, no inhibition, no DC input: all zero in
       the code).
4. Plasticity, right after layer l spikes, for every post neuron i that spiked:
       pre j spiked:  W_ij += inc * sig(W_ij);   pre j silent: W_ij -= dec * sig(W_ij),
       sig(w) = 2 / (1 + exp(w / 0.001))   (= 2 (1 - 1 / (1 + exp(-w / 0.001))) in the code).
   Rows of post neurons that did not spike are untouched.
5. Length: sleep_steps + (t - 1) * sleep_steps_growth time steps after task t (15000 + 5000
   (t - 1) in the MNIST driver, i.e. numiterations * (1 + (t - 1) / 3)).

Defaults are the MNIST constants of the code (x = [max_rate, inc, dec, beta1..3, alpha_scale]
found by the authors' search, dt 0.001, threshold 1, decay 0.999).

Simplifications and choices against the paper's code:
- Biases: our MLP has biases, the paper's has none. The sleep ignores them (only W drives the
  membrane potentials and only W changes); the scale factors use the real activations, with
  biases, in eval mode (no dropout), like the code's `nnff` at test time.
- Old data: the code computes the scale factors on the training data of *all* tasks seen so
  far. Here they use the *current* task's training images only, so no old example is kept.
  The mean image of all tasks seen so far is kept as memory: one running mean of d_in floats
  and its example count, i.e. the same mean over the concatenated training sets.
- Depth: the code has three weight layers and three betas. For another depth the hidden
  layers take the betas in order (the last hidden beta repeated if there are more) and the
  output layer always takes the last beta; a one-element list is used for every layer.
- The window: the reference fixes an 11x11 window on 28x28 MNIST; here its side is a fraction
  of the image's height and width (round(11/28 * 8) = 3 pixels on 8x8 digits), the same
  window for every channel; inputs that are not images get no window.
- The output layer is the whole head: in task-incremental learning every task's head sleeps.
- The simulation runs on the CPU in float32 (the code: MATLAB doubles), whatever the
  training device, with every random draw from the run's generator.
- Scale-factor guard: a layer whose weights and activations are all <= 0 gets s_l = 1e-8.
- Input spikes use a strict `<` where the code has `<=`, so a zeroed pixel never fires (the
  code's can, with the chance that rand() returns exactly 0).
- The 0.001 inside sig is exposed as `sig_width` (default 0.001, as in the code): weights
  much above it barely change, which matters for networks trained to large weights.
- Speed (exact, not an approximation): a layer that receives no spike in a step only decays,
  since with threshold > 0 it cannot fire; its matrix work is skipped. The Hebbian update
  touches only the rows of neurons that fired. Random draws are made 1000 steps at a time.
- Only MLP bodies with ReLU are supported (Flatten, Linear, ReLU, Dropout); other models are
  refused with a ConfigError. The paper's training (SGD lr 0.1, momentum 0.5, dropout 0.25,
  2 epochs/task, U(-0.01, 0.01) init) is a config choice, not part of the method.

Memory bill (extra_bytes): the running mean image, d_in float32, plus its count, one int64:
4 d_in + 8 bytes (264 B on 8x8 digits, 3144 B on MNIST), constant over tasks. The scale
factors are recomputed at every sleep and not kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engram.data.lazy import loaded
from engram.schema import opt
from engram.errors import ConfigError
from engram.models.protocol import require_structure
from engram.methods.base import Context, Method

SIG_WIDTH = 0.001  # the code's sigmoid(x) = 2 (1 - 1 / (1 + exp(-x / 0.001)))
STEPS_PER_CHUNK = 1000  # random draws are made for this many time steps at once
MNIST_BETAS = [14.548273, 44.560317, 38.046326]


@dataclass
class SleepParams:
    inc: float = opt(0.032064, "potentiation: W += inc * sig(W) when post and pre both spike",
                     low=0.0)
    dec: float = opt(0.003344, "depression: W -= dec * sig(W) when post spikes and pre is silent",
                     low=0.0)
    alpha_scale: float = opt(55.882454, "multiplies every layer's data-based scale factor "
                             "1 / lambda_l (input gain of the spiking network)", low=0.0)
    betas: list[float] = opt(list(MNIST_BETAS), "firing threshold of each weight layer, in units "
                             "of `threshold` (hidden layers in order, the last one for the output)")
    max_rate: float = opt(239.515363, "input rate: a pixel of value x spikes with probability "
                          "min(1, 2 dt max_rate x) per step", low=0.0)
    dt: float = opt(0.001, "time step of the input spike generator", low=0.0)
    decay: float = opt(0.999, "membrane potential kept from one step to the next", low=0.0,
                       high=1.0)
    threshold: float = opt(1.0, "base firing threshold, multiplied by each layer's beta", low=0.0)
    sleep_steps: int = opt(15000, "time steps of the sleep after the first task", low=0)
    sleep_steps_growth: int = opt(5000, "time steps added to the sleep for each further task",
                                  low=0)
    sig_width: float = opt(SIG_WIDTH, "w scale of sig(w) = 2 / (1 + exp(w / sig_width)): weights "
                           "above ~10 sig_width barely change (code: 0.001)", low=1e-9)
    window_fraction: float = opt(11 / 28, "side of the random square input window kept at each "
                                 "step, as a fraction of the image side (code: 11 of 28 pixels)",
                                 low=0.0, high=1.0)


def sig(w: torch.Tensor, width: float = SIG_WIDTH) -> torch.Tensor:
    """The plasticity's weight dependence: 2 / (1 + exp(w / width)), width 0.001 in the code;
    1 at 0, -> 2 for w < 0, -> 0 for w >~ 10 width (exp overflows to inf: exactly 0, no NaN)."""
    return 2.0 / (1.0 + torch.exp(w / width))


def hebbian_update_(weight: torch.Tensor, pre: torch.Tensor, post: torch.Tensor, inc: float,
                    dec: float, width: float = SIG_WIDTH) -> None:
    """In place, the rows of post neurons that spiked: W_ij += inc sig(W_ij) where pre j
    spiked, W_ij -= dec sig(W_ij) where it did not. weight (n_out, n_in); pre (n_in,) and
    post (n_out,) bool."""
    rows = post.nonzero(as_tuple=True)[0]  # (k,) the spiking post neurons
    if rows.numel():
        pre_rows = pre.nonzero(as_tuple=True)[0]
        step = _plasticity_step(pre_rows, weight.shape[1], inc, dec, weight.dtype)
        _update_rows_(weight, rows, step, width)


def _plasticity_step(pre_rows: torch.Tensor, n_in: int, inc: float, dec: float,
                     dtype: torch.dtype) -> torch.Tensor:
    """(n_in,): 2 inc at the pre neurons that spiked, -2 dec elsewhere (the 2 of sig folded in)."""
    return torch.full((n_in,), -2.0 * dec, dtype=dtype).index_fill_(0, pre_rows, 2.0 * inc)


def _update_rows_(weight: torch.Tensor, rows: torch.Tensor, step: torch.Tensor,
                  width: float) -> None:
    """W[rows] += step * sig(W[rows]) / 2, sig(w) / 2 = sigmoid(-w / width) in one fused op."""
    block = weight.index_select(0, rows)  # (k, n_in)
    weight.index_copy_(0, rows, block + step * torch.sigmoid(block * (-1.0 / width)))


def sleep_step(weights: list[torch.Tensor], potentials: list[torch.Tensor],
               input_spikes: torch.Tensor, alphas: list[float], thresholds: list[float],
               decay: float, inc: float, dec: float,
               width: float = SIG_WIDTH) -> list[torch.Tensor]:
    """One time step of the spiking network, in place on `weights` and `potentials`.

    weights[l] (n_l, n_(l-1)) and potentials[l] (n_l,) for each layer; input_spikes (n_0,)
    bool; thresholds[l] = threshold * beta_l. Returns the indices of the neurons of each layer
    that fired, (k_l,) long. For each layer in turn (it sees this step's spikes below it):
        v <- decay v + alpha W s_pre;  fire where v >= theta;  Hebbian update of the rows that
        fired (before the next layer reads them);  v <- 0 where fired.
    A layer without input spikes only decays: with theta > 0 it cannot fire (v < theta held
    after the previous step, and decaying keeps it below), so the matrix work is skipped.
    """
    return _step(weights, potentials, input_spikes.to(weights[0].dtype),
                 input_spikes.nonzero(as_tuple=True)[0], alphas, thresholds, decay, inc, dec,
                 width)


def _step(weights: list[torch.Tensor], potentials: list[torch.Tensor], pre: torch.Tensor,
          pre_rows: torch.Tensor, alphas: list[float], thresholds: list[float], decay: float,
          inc: float, dec: float, width: float) -> list[torch.Tensor]:
    """sleep_step with the input given twice: as 0/1 floats (n_0,) and as indices (k_0,)."""
    fired = []
    for weight, v, alpha, theta in zip(weights, potentials, alphas, thresholds):
        if pre_rows.numel() == 0 and theta > 0:
            v.mul_(decay)
            fired.append(pre_rows.new_empty(0))
            pre_rows = fired[-1]
            continue
        v.addmv_(weight, pre, beta=decay, alpha=alpha)  # decay, integrate
        rows = (v >= theta).nonzero(as_tuple=True)[0]  # (k_l,) fire
        if rows.numel():
            step = _plasticity_step(pre_rows, weight.shape[1], inc, dec, weight.dtype)
            _update_rows_(weight, rows, step, width)
            v.index_fill_(0, rows, 0.0)  # reset the neurons that fired
            pre = torch.zeros_like(v).index_fill_(0, rows, 1.0)  # (n_l,) next layer's input
        fired.append(rows)
        pre_rows = rows
    return fired


def input_spike_probability(x: torch.Tensor, dt: float, max_rate: float) -> torch.Tensor:
    """p = min(1, 2 dt max_rate x): the chance that a pixel of value x spikes in one step."""
    return torch.clamp(2.0 * dt * max_rate * x, max=1.0)


def masked_inputs(mean_image: torch.Tensor, n_steps: int, window_fraction: float,
                  generator: torch.Generator) -> torch.Tensor:
    """(n_steps, d_in): the mean image (C, H, W) with all but a random square window zeroed,
    a fresh window per step, uniform over all positions inside the image (the code's
    create_masked_input). Non-image inputs are returned whole."""
    flat = mean_image.reshape(1, -1)
    if mean_image.dim() != 3 or window_fraction >= 1.0:
        return flat.expand(n_steps, -1).clone()
    _, height, width = mean_image.shape
    side_h = max(1, round(window_fraction * height))
    side_w = max(1, round(window_fraction * width))
    top = torch.randint(0, height - side_h + 1, (n_steps, 1), generator=generator)
    left = torch.randint(0, width - side_w + 1, (n_steps, 1), generator=generator)
    rows, cols = torch.arange(height), torch.arange(width)
    in_rows = (rows >= top) & (rows < top + side_h)  # (n_steps, H)
    in_cols = (cols >= left) & (cols < left + side_w)  # (n_steps, W)
    window = in_rows[:, :, None] & in_cols[:, None, :]  # (n_steps, H, W)
    return (mean_image[None] * window[:, None]).reshape(n_steps, -1)  # (n_steps, C*H*W)


def input_spikes(images: torch.Tensor, dt: float, max_rate: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Bernoulli spikes, the code's `rand * (1 / (dt max_rate)) / 2 <= x` with a strict `<`
    so that a zero pixel never fires: p = min(1, 2 dt max_rate x). images (T, d) -> (T, d) bool."""
    u = torch.rand(images.shape, generator=generator)
    return u * (0.5 / (dt * max_rate)) < images


def layer_values(values: list[float], n_layers: int) -> list[float]:
    """One value per weight layer from a list written for the code's three layers: hidden
    layers in order (the last hidden value repeated), the output layer the last value."""
    values = [float(v) for v in values]
    if not values:
        raise ConfigError("sleep: betas must hold at least one threshold")
    if any(v <= 0 for v in values):  # a unit with threshold <= 0 would fire on no input at all
        raise ConfigError(f"sleep: every beta must be > 0, got {values}")
    if len(values) == n_layers or len(values) == 1:
        return values * (n_layers // len(values))
    hidden = values[:-1] or values[-1:]
    hidden = (hidden + [hidden[-1]] * n_layers)[:n_layers - 1]
    return hidden + [values[-1]]


@torch.no_grad()
def scale_factors(layers: list[tuple[torch.Tensor, torch.Tensor | None]], x: torch.Tensor,
                  alpha_scale: float) -> list[float]:
    """alpha_l = alpha_scale / lambda_l with lambda_l = s_l / lambda_(l-1), lambda_0 = 1,
    s_l = max(max W_l^+, max_x a_l(x)^+): the code's normalize_nn_data. layers: (weight
    (n_l, n_(l-1)), bias (n_l,) or None) in order; x (N, d_in) flattened; a_l is the ReLU'd
    output of layer l (the output layer's logits clipped at 0), biases included."""
    alphas, previous, a = [], 1.0, x
    for weight, bias in layers:
        a = torch.relu(F.linear(a, weight, bias))  # (N, n_l)
        s = max(float(weight.max().clamp(min=0)), float(a.max()) if a.numel() else 0.0)
        factor = max(s, 1e-8) / previous  # lambda_l
        alphas.append(alpha_scale / factor)
        previous = factor
    return alphas


def sleep(weights: list[torch.Tensor], mean_image: torch.Tensor, steps: int,
          alphas: list[float], thresholds: list[float], params: SleepParams,
          generator: torch.Generator) -> list[int]:
    """Run `steps` time steps in place on `weights` (CPU float tensors); return the number of
    spikes of each layer over the whole sleep, for diagnostics. Draws are made for
    STEPS_PER_CHUNK steps at once (masks, then uniforms), all from `generator`."""
    potentials = [torch.zeros(w.shape[0], dtype=w.dtype) for w in weights]
    counts = [0] * len(weights)
    for start in range(0, steps, STEPS_PER_CHUNK):
        n = min(STEPS_PER_CHUNK, steps - start)
        images = masked_inputs(mean_image, n, params.window_fraction, generator)  # (n, d_in)
        spikes_in = input_spikes(images, params.dt, params.max_rate, generator)  # (n, d_in)
        # per step: the spikes as floats and as indices, prepared for the chunk in two ops
        per_step = spikes_in.sum(dim=1).tolist()
        indices = spikes_in.nonzero()[:, 1].split(per_step)  # n tensors (k_0,)
        as_float = spikes_in.to(weights[0].dtype)
        for t in range(n):
            fired = _step(weights, potentials, as_float[t], indices[t], alphas, thresholds,
                          params.decay, params.inc, params.dec, params.sig_width)
            counts = [count + len(rows) for count, rows in zip(counts, fired)]
    return counts


def sleeping_layers(model: nn.Module) -> list[nn.Linear]:
    """The MLP's Linear layers in order, body then head; ConfigError for anything else (the
    structure need "relu_mlp" of engram.models.protocol)."""
    require_structure(model, Sleep.model_needs,
                      "sleep (Sleep Replay Consolidation, which turns a ReLU MLP into a spiking "
                      "network)")
    return [layer for layer in model.body if isinstance(layer, nn.Linear)] + [model.head]


class Sleep(Method):
    """After each task, a spiking sleep phase with Hebbian plasticity on the MLP's weights."""

    Params = SleepParams
    model_needs = ("relu_mlp",)

    def __init__(self, params: SleepParams | None = None) -> None:
        super().__init__(params)
        self.mean_image: torch.Tensor | None = None  # (C, H, W) mean of all seen training images
        self.count = torch.zeros((), dtype=torch.long)  # training images in that mean
        self.last_spike_counts: list[int] = []  # spikes per layer in the latest sleep (diagnostics)

    def prepare_model(self, model: nn.Module, ctx: Context) -> nn.Module:
        sleeping_layers(model)  # refuse a CNN or another activation before any training
        if self.params.threshold <= 0:  # units would fire on no input at all
            raise ConfigError(f"sleep: threshold must be > 0, got {self.params.threshold}")
        return model

    def before_task(self, ctx: Context) -> None:
        sleeping_layers(ctx.model)

    def after_task(self, ctx: Context) -> None:
        images = loaded(ctx.task.train.x).detach().float().cpu()  # (N, C, H, W), all read
        self._add_to_mean(images)
        linears = sleeping_layers(ctx.model)
        layers = [(linear.weight.detach().float().cpu(),
                   None if linear.bias is None else linear.bias.detach().float().cpu())
                  for linear in linears]
        alphas = scale_factors(layers, images.reshape(len(images), -1), self.params.alpha_scale)
        betas = layer_values(self.params.betas, len(linears))
        thresholds = [self.params.threshold * beta for beta in betas]
        steps = self.sleep_length(ctx.task.index)
        weights = [linear.weight.detach().float().cpu().clone() for linear in linears]
        self.last_spike_counts = sleep(weights, self.mean_image, steps, alphas, thresholds,
                                       self.params, ctx.generator)
        with torch.no_grad():
            for linear, weight in zip(linears, weights):
                linear.weight.copy_(weight)

    def sleep_length(self, task_index: int) -> int:
        """Time steps of the sleep after task `task_index` (0-based): T_0 + t * growth."""
        return self.params.sleep_steps + task_index * self.params.sleep_steps_growth

    def _add_to_mean(self, images: torch.Tensor) -> None:
        """Running mean over every training image seen: the same as the mean of the union."""
        n = len(images)
        if n == 0:
            return
        batch_mean = images.mean(dim=0)
        if self.mean_image is None:
            self.mean_image = batch_mean
        else:
            total = int(self.count) + n
            self.mean_image = self.mean_image + (batch_mean - self.mean_image) * (n / total)
        self.count = self.count + n

    def state_dict(self) -> dict[str, Any]:
        if self.mean_image is None:
            return {"count": self.count.clone()}
        return {"mean_image": self.mean_image.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"].clone().cpu()
        mean = state.get("mean_image")
        self.mean_image = None if mean is None else mean.clone().cpu()

