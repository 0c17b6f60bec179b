"""Data augmentation on tensors, on whatever device they live: random crop with padding,
horizontal flip and per-channel normalisation, as the continual-learning papers apply them
to Seq-CIFAR and Seq-TinyImageNet (no torchvision needed).

The papers' pipeline (Mammoth, Buzzega et al. NeurIPS 2020, "Dark Experience for General
Continual Learning", datasets/seq_cifar10.py; the same in GEM and ER-ACE code):

    train:  RandomCrop(size, padding=4) -> RandomHorizontalFlip() -> ToTensor -> Normalize
    test:   ToTensor -> Normalize

engram's data are already float tensors in [0, 1] (ToTensor's output), so the two parts split:

* Normalisation is folded into the data once, before training (`normalize_stream`): the
  train, val and test splits of every task are normalised alike, so evaluation, replay
  buffers and every method see the same normalised inputs and no model or evaluation code
  changes. (`train.augment.normalize` in a config.)
* Crop and flip are the per-batch training transform (`TrainingAugmentation`), the
  callable `ctx.transform` of engram's one training loop: it augments the mini-batch
  trained on, stream examples and replayed ones alike, never evaluation data.

Because the crop then pads *normalised* images, it pads with the normalised value of a black
pixel, (0 - mean) / std per channel (`padding_fill`): exactly what padding the raw image
with zeros and normalising afterwards gives, as torchvision's RandomCrop before Normalize.

Every random draw comes from the CPU torch.Generator the caller passes (the run's
ctx.generator) and is moved to x's device, so a run repeats exactly per seed on any device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engram.errors import ConfigError

# Per-channel (mean, std) of the training images in [0, 1], as Mammoth normalises them
# (datasets/seq_cifar10.py, seq_cifar100.py, seq_tinyimagenet.py; the usual published values).
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "tinyimagenet": ((0.4802, 0.4480, 0.3975), (0.2770, 0.2691, 0.2821)),
}


def _channel_view(values, x: torch.Tensor) -> torch.Tensor:
    """Per-channel values as a (1, C, 1, 1) tensor of x's dtype and device."""
    return torch.as_tensor(values, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)


def _check_images(x: torch.Tensor, what: str) -> None:
    if x.ndim != 4:
        raise ConfigError(f"{what} needs images (B, C, H, W); these inputs have shape "
                          f"{tuple(x.shape)}")


def normalization_constants(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of a known normalisation; ConfigError naming the known ones."""
    if name not in NORMALIZATIONS:
        raise ConfigError(f"train.augment.normalize: unknown {name!r}; choose one of: "
                          + ", ".join(NORMALIZATIONS))
    return NORMALIZATIONS[name]


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel; x (B, C, H, W), mean and std C values each."""
    _check_images(x, "normalize")
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ConfigError(f"normalize: {len(mean)} channel means and {len(std)} stds for "
                          f"images with {x.shape[1]} channels")
    return (x - _channel_view(mean, x)) / _channel_view(std, x)


def padding_fill(mean, std) -> tuple[float, ...]:
    """The normalised value of a black (0) pixel per channel: what zero padding of the raw
    image becomes after normalisation."""
    return tuple(-m / s for m, s in zip(mean, std))


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator,
                fill: float | tuple[float, ...] = 0.0) -> torch.Tensor:
    """Each image padded by `padding` pixels of `fill` (one value, or one per channel) on
    every side, then cropped back to (H, W) at its own offset (dy, dx), each uniform in
    [0, 2 padding] and drawn from `generator` (B of dy first, then B of dx):

        out[b, :, i, j] = padded[b, :, dy_b + i, dx_b + j]

    One gather for the whole batch (no loop over examples). x (B, C, H, W) -> same shape."""
    _check_images(x, "random_crop")
    if padding == 0:
        return x
    batch, channels, height, width = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator).to(x.device)
    padded = F.pad(x, (padding,) * 4)  # (B, C, H + 2p, W + 2p), zeros
    fills = fill if isinstance(fill, tuple) else (fill,)
    if any(value != 0 for value in fills):
        inside = F.pad(torch.ones_like(x[:1, :1], dtype=torch.bool), (padding,) * 4)
        padded = torch.where(inside, padded, _channel_view(fills, x))  # (1, 1 or C, 1, 1)
    rows = offsets[0, :, None] + torch.arange(height, device=x.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(width, device=x.device)  # (B, W)
    examples = torch.arange(batch, device=x.device)[:, None, None]
    # Advanced indices around a slice: the indexed dimensions come first, (B, H, W, C).
    cropped = padded[examples, :, rows[:, :, None], cols[:, None, :]]
    return cropped.permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right (along W) with probability 1/2, drawn from
    `generator` (one uniform per example: flipped when < 0.5). x (B, C, H, W)."""
    _check_images(x, "random_flip")
    flipped = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
    return torch.where(flipped[:, None, None, None], x.flip(3), x)


@dataclass(frozen=True)
class TrainingAugmentation:
    """The per-batch training transform (x, generator) -> x of engram's loop (ctx.transform):
    random_crop(crop_padding, fill) then random_flip (if flip), in that order, as Mammoth's
    RandomCrop then RandomHorizontalFlip. Normalisation is not here: it is folded into the
    data (normalize_stream), and `fill` is then the normalised black (padding_fill)."""
    crop_padding: int = 0
    flip: bool = False
    fill: tuple[float, ...] | float = 0.0

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.crop_padding:
            x = random_crop(x, self.crop_padding, generator, self.fill)
        if self.flip:
            x = random_flip(x, generator)
        return x


def training_augmentation(augment) -> TrainingAugmentation | None:
    """The training transform of a train.augment config section (engram.config.AugmentConfig),
    or None when it neither crops nor flips (normalisation alone changes only the data)."""
    if not augment.crop_padding and not augment.flip:
        return None
    fill: tuple[float, ...] | float = 0.0
    if augment.normalize is not None:
        fill = padding_fill(*normalization_constants(augment.normalize))
    return TrainingAugmentation(augment.crop_padding, augment.flip, fill)


def normalize_stream(stream, name: str | None):
    """The stream (engram.data.streams.Stream) with every task's train, val and test inputs
    normalised by the constants `name` (train.augment.normalize; None: the stream as is).
    ConfigError when its inputs are not images with as many channels as the constants."""
    if name is None:
        return stream
    mean, std = normalization_constants(name)
    shape = stream.input_shape
    if len(shape) != 3 or shape[0] != len(mean):
        raise ConfigError(f"train.augment.normalize: {name} normalises {len(mean)}-channel "
                          f"images; this stream's inputs have shape {tuple(shape)}")

    def apply(split):
        # TensorSet's len is its example count, which NamedTuple._replace would misread
        return None if split is None else type(split)(normalize(split.x, mean, std), split.y,
                                                      split.task)

    tasks = [dataclasses.replace(task, train=apply(task.train), val=apply(task.val),
                                 test=apply(task.test)) for task in stream.tasks]
    return dataclasses.replace(stream, tasks=tasks)


def check_augmentable(stream, augment) -> None:
    """ConfigError when train.augment crops or flips inputs that are not images (C, H, W)."""
    if (augment.crop_padding or augment.flip) and len(stream.input_shape) != 3:
        raise ConfigError(f"train.augment: crop and flip need images (C, H, W); this "
                          f"stream's inputs have shape {tuple(stream.input_shape)}")
