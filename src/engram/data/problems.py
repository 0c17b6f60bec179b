"""Plasticity problems: long non-stationary streams whose tasks are generated lazily.

Each problem is a function (problem config, data config, seed) -> Problem, registered in
PROBLEMS (engram.registry) below; `engram plasticity` trains on them (engram.experiments.
plasticity, whose docstring describes each problem and its source). Same seed, same tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch

from engram.config import DataConfig
from engram.data.streams import Task, TensorSet
from engram.data.sources import load_source
from engram.registry import PROBLEMS
from engram.schema import opt


@dataclass
class ProblemConfig:
    kind: str = opt("bit_flipping", "the non-stationary problem (see `engram list`)",
                    registry=PROBLEMS)
    n_tasks: int = opt(100, "tasks in the stream (bit flipping: flips; permuted: permutations)",
                       low=1)
    flip_every: int = opt(10000, "bit_flipping: examples per task (T)", low=1)
    n_inputs: int = opt(20, "bit_flipping: input bits (m)", low=2)
    n_flipping: int = opt(15, "bit_flipping: bits constant within a task (f)", low=1)
    flip_one: bool = opt(False, "bit_flipping: flip one bit per task instead of redrawing all")
    target_hidden: int = opt(100, "bit_flipping: threshold units of the target network", low=1)
    beta: float = opt(0.7, "bit_flipping: threshold parameter of the target's units", low=0.0)
    examples_per_task: int | None = opt(None, "permuted_digits: examples per task (default: "
                                              "the whole training set)", low=1)
    classes_per_task: int = opt(2, "class_stream: classes in each task", low=1)
    probe_size: int = opt(500, "examples of the next task the diagnostics are measured on",
                          low=2)


@dataclass
class LTUTarget:
    """The bit-flipping target: x (N, m) bits -> y (N,), through `hidden` linear threshold
    units with weights and biases in {-1, +1} (Dohare et al.; LoP fix_ltu_net.py)."""
    w_in: torch.Tensor   # (hidden, m)
    b_in: torch.Tensor   # (hidden,)
    w_out: torch.Tensor  # (hidden,)
    b_out: torch.Tensor  # ()
    threshold: torch.Tensor  # (hidden,)

    @classmethod
    def draw(cls, m: int, hidden: int, beta: float, generator: torch.Generator) -> LTUTarget:
        def signs(*shape: int) -> torch.Tensor:
            return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1

        w_in, b_in, w_out, b_out = signs(hidden, m), signs(hidden), signs(hidden), signs()
        s = (m - w_in.sum(1) + b_in) / 2  # LoP's S_i ("number of -1 input weights")
        return cls(w_in, b_in, w_out, b_out, beta * (m + 1) - s)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        fired = (x @ self.w_in.T + self.b_in > self.threshold).float()  # (N, hidden)
        return fired @ self.w_out + self.b_out


def bit_flipping_tasks(cfg: ProblemConfig, seed: int) -> Iterator[Task]:
    """The slowly-changing regression's tasks, one per flip, generated lazily."""
    generator = torch.Generator().manual_seed(seed)
    target = LTUTarget.draw(cfg.n_inputs, cfg.target_hidden, cfg.beta, generator)
    flipping = torch.randint(0, 2, (cfg.n_flipping,), generator=generator).float()
    for index in range(cfg.n_tasks):
        if index > 0:
            if cfg.flip_one:
                bit = int(torch.randint(cfg.n_flipping, (1,), generator=generator))
                flipping[bit] = 1 - flipping[bit]
            else:
                flipping = torch.randint(0, 2, (cfg.n_flipping,), generator=generator).float()
        free = torch.randint(0, 2, (cfg.flip_every, cfg.n_inputs - cfg.n_flipping),
                             generator=generator).float()
        x = torch.cat([flipping.expand(cfg.flip_every, -1), free], dim=1)  # (T, m)
        data = TensorSet(x, target(x), torch.zeros(cfg.flip_every, dtype=torch.long))
        yield Task(index, f"flip {index}", [0], data, None, data)


def permuted_digits_tasks(cfg: ProblemConfig, images: torch.Tensor, labels: torch.Tensor,
                          seed: int) -> Iterator[Task]:
    """Online permuted digits: each task a fresh pixel permutation, examples reshuffled."""
    generator = torch.Generator().manual_seed(seed)
    flat = images.reshape(len(images), -1)  # (N, D)
    n = min(cfg.examples_per_task or len(flat), len(flat))
    for index in range(cfg.n_tasks):
        pixels = torch.randperm(flat.shape[1], generator=generator)
        order = torch.randperm(len(flat), generator=generator)[:n]
        x = flat[order][:, pixels]
        data = TensorSet(x, labels[order], torch.zeros(n, dtype=torch.long))
        yield Task(index, f"permutation {index}", list(range(10)), data, None, data)


def class_stream_tasks(cfg: ProblemConfig, images: torch.Tensor, labels: torch.Tensor,
                       seed: int) -> Iterator[Task]:
    """A long class-incremental stream: class groups in a seeded order, cycling."""
    generator = torch.Generator().manual_seed(seed)
    classes = labels.unique()[torch.randperm(len(labels.unique()), generator=generator)]
    groups = [classes[i:i + cfg.classes_per_task]
              for i in range(0, len(classes), cfg.classes_per_task)]
    flat = images.reshape(len(images), -1)
    for index in range(cfg.n_tasks):
        group = groups[index % len(groups)]
        members = torch.nonzero(torch.isin(labels, group)).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        data = TensorSet(flat[members], labels[members], torch.zeros(len(members), dtype=torch.long))
        yield Task(index, "/".join(str(int(c)) for c in group), group.tolist(), data, None, data)


class Problem(NamedTuple):
    """One seed's problem: its tasks (generated lazily), input shape, outputs, loss kind."""
    tasks: Iterator[Task]
    input_shape: tuple[int, ...]
    outputs: int
    regression: bool


def bit_flipping_problem(cfg: ProblemConfig, data: DataConfig, seed: int) -> Problem:
    return Problem(bit_flipping_tasks(cfg, seed), (cfg.n_inputs,), 1, True)


def _images(data: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    source = load_source(data.source, data.path, data.labels)
    return source.x_train.reshape(len(source.x_train), -1), source.y_train  # (N, D), (N,)


def permuted_digits_problem(cfg: ProblemConfig, data: DataConfig, seed: int) -> Problem:
    x, y = _images(data)
    return Problem(permuted_digits_tasks(cfg, x, y, seed), (x.shape[1],), int(y.max()) + 1, False)


def class_stream_problem(cfg: ProblemConfig, data: DataConfig, seed: int) -> Problem:
    x, y = _images(data)
    return Problem(class_stream_tasks(cfg, x, y, seed), (x.shape[1],), int(y.max()) + 1, False)


PROBLEMS.add("bit_flipping", bit_flipping_problem,
             "slowly-changing regression: input bits redrawn every T examples, fixed random "
             "threshold-unit target (Dohare et al. 2024)")
PROBLEMS.add("permuted_digits", permuted_digits_problem,
             "online permuted digits: a fresh pixel permutation per task, each example once")
PROBLEMS.add("class_stream", class_stream_problem,
             "a long class-incremental stream: class groups cycling, one shared head, online")
