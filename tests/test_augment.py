"""Augmentation on tensors (engram.data.augment) and train.augment in `engram run`."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F

from engram.config import AugmentConfig, TrainConfig, train_identity
from engram.data.augment import (NORMALIZATIONS, TrainingAugmentation, normalize,
                                 normalize_stream, padding_fill, random_crop, random_flip,
                                 training_augmentation)
from engram.errors import ConfigError
from engram.experiments.continual import continual_run_id, run_experiment
from tests.conftest import tiny_config


def arange_images(batch=4, channels=3, height=5, width=6) -> torch.Tensor:
    """Images whose every pixel value is distinct, so any misplaced pixel shows."""
    return torch.arange(batch * channels * height * width, dtype=torch.float32).view(
        batch, channels, height, width) + 1


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_crop_equals_the_hand_sliced_padded_image_at_the_drawn_offsets():
    x, padding = arange_images(), 2
    out = random_crop(x, padding, generator(3))
    # The offsets random_crop draws: B of dy, then B of dx, from the same generator state.
    dy, dx = torch.randint(0, 2 * padding + 1, (2, len(x)), generator=generator(3))
    height, width = x.shape[2:]
    for b in range(len(x)):
        padded = torch.zeros(x.shape[1], height + 2 * padding, width + 2 * padding)
        padded[:, padding:padding + height, padding:padding + width] = x[b]
        assert torch.equal(out[b], padded[:, dy[b]:dy[b] + height, dx[b]:dx[b] + width])
    assert out.shape == x.shape
    assert len({(int(a), int(c)) for a, c in zip(dy, dx)}) > 1  # offsets differ per example


def test_crop_pads_with_one_fill_value_per_channel():
    x = torch.zeros(64, 2, 3, 3) + 5
    out = random_crop(x, 3, generator(0), fill=(-1.0, -2.0))
    # every pixel is the image's 5 or its channel's fill, and the fill does appear
    assert set(out[:, 0].unique().tolist()) == {-1.0, 5.0}
    assert set(out[:, 1].unique().tolist()) == {-2.0, 5.0}


def test_flip_mirrors_exactly_the_examples_whose_draw_is_below_one_half():
    x = arange_images(batch=16)
    out = random_flip(x, generator(1))
    flipped = torch.rand(16, generator=generator(1)) < 0.5
    assert 0 < int(flipped.sum()) < 16
    for b in range(16):
        expected = x[b, :, :, torch.arange(x.shape[3] - 1, -1, -1)] if flipped[b] else x[b]
        assert torch.equal(out[b], expected)


def test_the_same_seed_repeats_and_another_seed_differs():
    x = arange_images(batch=32)
    augment = TrainingAugmentation(crop_padding=4, flip=True)
    assert torch.equal(augment(x, generator(0)), augment(x, generator(0)))
    assert not torch.equal(augment(x, generator(0)), augment(x, generator(1)))
    assert augment(x, generator(0)).shape == x.shape


def test_normalisation_values_and_the_padding_fill_is_normalised_black():
    mean, std = NORMALIZATIONS["cifar10"]
    x = torch.rand(2, 3, 4, 4, generator=generator(0))
    out = normalize(x, mean, std)
    for c in range(3):
        assert torch.allclose(out[:, c], (x[:, c] - mean[c]) / std[c])
    black = normalize(torch.zeros(1, 3, 1, 1), mean, std).flatten().tolist()
    assert padding_fill(mean, std) == pytest.approx(black)
    # crop of normalised images with that fill == normalising the zero-padded crop
    crop_then = normalize(random_crop(x, 2, generator(5)), mean, std)
    assert torch.allclose(random_crop(out, 2, generator(5), padding_fill(mean, std)), crop_then,
                          atol=1e-6)


def test_the_configs_normalize_choices_are_the_known_constants():
    from typing import get_args, get_type_hints
    literal, _none = get_args(get_type_hints(AugmentConfig)["normalize"])
    assert set(get_args(literal)) == set(NORMALIZATIONS)
    assert all(len(mean) == len(std) == 3 for mean, std in NORMALIZATIONS.values())


def test_normalisation_is_folded_into_every_split_of_the_stream():
    from engram.data import DATASETS, build_stream
    cfg = tiny_config()
    stream = build_stream(DATASETS.get("digits")(None), cfg.data, cfg.stream, 0)
    with pytest.raises(ConfigError, match="3-channel images"):
        normalize_stream(stream, "cifar10")  # digits have one channel
    NORMALIZATIONS["test_gray"] = ((0.5,), (0.25,))
    try:
        normalised = normalize_stream(stream, "test_gray")
    finally:
        del NORMALIZATIONS["test_gray"]
    for before, after in zip(stream.tasks, normalised.tasks):
        for split in ("train", "test"):
            assert torch.equal(getattr(after, split).x, (getattr(before, split).x - 0.5) / 0.25)
            assert torch.equal(getattr(after, split).y, getattr(before, split).y)


def test_defaults_leave_the_run_id_and_train_identity_unchanged():
    assert "augment" not in train_identity(TrainConfig())
    assert "amp" not in train_identity(TrainConfig())
    plain = tiny_config()
    augmented = tiny_config(train={"augment": {"flip": True}})
    assert continual_run_id(plain, plain.methods[0], 0) != \
        continual_run_id(augmented, plain.methods[0], 0)
    assert training_augmentation(AugmentConfig()) is None


def test_bad_augment_keys_are_one_line_errors():
    with pytest.raises(ConfigError, match="train.augment.normalize"):
        tiny_config(train={"augment": {"normalize": "imagenet"}})
    with pytest.raises(ConfigError, match="train.augment.crop_padding"):
        tiny_config(train={"augment": {"crop_padding": -1}})


def test_a_config_with_augment_runs_and_augments_the_trained_batches(tmp_path, monkeypatch):
    seen = []
    original = TrainingAugmentation.__call__

    def spy(self, x, gen):
        out = original(self, x, gen)
        seen.append(not torch.equal(out, x))
        return out

    monkeypatch.setattr(TrainingAugmentation, "__call__", spy)
    cfg = tiny_config(train={"epochs": 1, "augment": {"crop_padding": 2, "flip": True}},
                      methods=[{"name": "replay"}])
    report = run_experiment(cfg, tmp_path, show_progress=False, raise_failures=True)
    rows = list(csv.DictReader(open(report.results)))
    assert any(r["metric"] == "run_complete" for r in rows)
    assert seen and all(seen)
