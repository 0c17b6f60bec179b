"""Seq-CIFAR-10's training work at full size: engram's loop against a hand-written PyTorch loop.

One task of CIFAR-shaped data (3x32x32, 10 classes, random pixels: the time of a step does
not depend on their values), trained for `--epochs` epochs by `engram run`'s code path
(configs/seq_cifar10.yaml's settings: the reduced ResNet-18, SGD lr 0.03, batch 32, random
crop with padding 4 and flip, normalised inputs), for naive fine-tuning and DER++ (memory
500, 32 replayed examples a step), each with float32 and with train.amp + channels_last. The
yardstick is the leanest loop doing naive's work: the same network, data on the device, the
same augmentation functions, forward, cross-entropy, backward, step (under autocast and a
gradient scaler for the amp rows). Times are training time only (engram's train_seconds
rows; the hand loop timed around its epochs, synchronised), measured in one process:

    python benchmarks/seq_cifar_speed.py --device cuda            # the full 10,000 examples
    python benchmarks/seq_cifar_speed.py --device cpu --examples 256 --model resnet18_slim
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
import torch.nn.functional as F

from engram.config import ModelConfig, load_config_dict
from engram.data.augment import TrainingAugmentation, normalization_constants, padding_fill
from engram.data.sources import CIFAR10_CLASSES, SourceData
from engram.experiments.continual import run_experiment
from engram.models import build_model
from engram.registry import DATASETS
from engram.results import read_rows


def synthetic_cifar(n_train: int, n_test: int = 1000):
    def load(path: str | None = None) -> SourceData:
        g = torch.Generator().manual_seed(0)
        return SourceData("synthetic_cifar", torch.rand(n_train, 3, 32, 32, generator=g),
                          torch.arange(n_train) % 10, torch.rand(n_test, 3, 32, 32, generator=g),
                          torch.arange(n_test) % 10, list(CIFAR10_CLASSES))
    return load


def engram_seconds(args, method: dict, fast: bool) -> float:
    """train_seconds of the one task, as engram run records it."""
    cfg = load_config_dict({
        "name": "speed", "seeds": [0], "device": args.device, "threads": 0, "plots": False,
        "data": {"source": "synthetic_cifar"},
        "stream": {"kind": "split", "scenario": "class", "n_tasks": 1, "classes_per_task": 10},
        "model": {"kind": args.model},
        "train": {"epochs": args.epochs, "batch_size": 32, "optimizer": "sgd", "lr": 0.03,
                  "augment": {"crop_padding": 4, "flip": True, "normalize": "cifar10"},
                  "amp": fast, "channels_last": fast},
        "methods": [method]})
    with tempfile.TemporaryDirectory() as out:
        report = run_experiment(cfg, out, show_progress=False, raise_failures=True)
        rows = read_rows(report.results)
    return sum(float(r["value"]) for r in rows if r["metric"] == "train_seconds")


def hand_seconds(args, fast: bool) -> float:
    """The same epochs of naive training, written out by hand."""
    device = torch.device(args.device)
    source = synthetic_cifar(args.examples)()
    mean, std = normalization_constants("cifar10")
    view = (1, 3, 1, 1)
    x = ((source.x_train - torch.tensor(mean).view(view)) / torch.tensor(std).view(view)).to(device)
    y = source.y_train.to(device)
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=args.model), (3, 32, 32), 1, 10).to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03)
    augment = TrainingAugmentation(4, True, padding_fill(mean, std))
    generator = torch.Generator().manual_seed(0)
    scaler = torch.amp.GradScaler(device.type, enabled=fast and device.type == "cuda")
    model.train()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(y), generator=generator).to(device)
        for index in order.split(32):
            batch = augment(x[index], generator)
            if fast:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda"
                                else torch.bfloat16, enabled=fast):
                loss = F.cross_entropy(model(batch), y[index])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--examples", type=int, default=10_000, help="a Seq-CIFAR-10 task: 10,000")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--model", default="resnet18")
    args = parser.parse_args()
    DATASETS.add("synthetic_cifar", synthetic_cifar(args.examples), "random CIFAR-shaped data")
    methods = {"naive": "naive", "derpp": {"name": "derpp", "memory": 500, "replay_batch_size": 32}}
    print(f"{args.model}, {args.examples} examples x {args.epochs} epochs, batch 32, on "
          f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}")
    print(f"{'precision':<24} {'hand loop':>10} {'naive':>10} {'ratio':>6} {'derpp':>10} {'ratio':>6}")
    for fast in (False, True):
        hand_seconds(copy.copy(args), fast)  # warm-up: kernels, cuDNN's algorithm choice
        hand = hand_seconds(args, fast)
        times = {name: engram_seconds(args, method, fast) for name, method in methods.items()}
        label = "amp + channels_last" if fast else "float32"
        print(f"{label:<24} {hand:>9.1f}s {times['naive']:>9.1f}s {times['naive'] / hand:>6.2f} "
              f"{times['derpp']:>9.1f}s {times['derpp'] / hand:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
