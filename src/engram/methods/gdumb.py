"""GDumb: greedy sampler and dumb learner (Prabhu, Torr & Dokania, ECCV 2020, "GDumb: A
Simple Approach that Questions Our Progress in Continual Learning").

- **Greedy class-balanced sampler.** Every example of the stream is offered once, in the
  order the task holds it, to a memory of K slots. With n the number of classes stored and
  k_c = K // max(1, n), an example of class y is stored when y is not stored yet or holds
  fewer than k_c slots; if the memory is then full, a uniformly chosen example of the class
  holding the most slots (ties: the smallest (task, target) key) is evicted first. Otherwise
  the example is dropped. This is the paper's sampler as Mai et al.'s survey code implements
  it (RaptorMai/online-continual-learning, agents/gdumb.py, `greedy_balancing_update`);
  the authors' own code (drimpossible/GDumb, src/dataloader.py) takes the first K // classes
  examples of each class offline, which this reaches on a class-sorted stream. Classes are
  (task id, target) keys, so it works in all three scenarios; however unequal the stream,
  the classes end up within one slot of equal shares.
- **Dumb learner.** The stream never trains the network. At each task the network is
  re-initialised (`reset_parameters()` of every module that has one, seeded from the run's
  generator) and trained from scratch on the memory alone, for train.epochs epochs, by the
  runner's own loop with the run's optimizer: `training_data` fills the memory with the
  task's examples and returns the memory as the data to train on, so every evaluation sees a
  network trained only on the memory. The paper's SGDR schedule and cutmix are not used;
  configure train.optimizer / train.scheduler for them (and keep optimizer_policy fresh:
  under carry the optimizer's moments and schedule carry across the re-initialisation).
  Mammoth's GDumb (aimagelab/mammoth, models/gdumb.py) instead trains once, after the
  last task. The training loss engram records is the memory's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engram.data.streams import TensorSet
from engram.errors import ConfigError
from engram.methods.base import Context, Method, ProblemInfo
from engram.methods.replay import class_keys, random_slot_of
from engram.schema import opt


@dataclass
class GDumbParams:
    memory: int = opt(200, "K: examples the class-balanced memory holds", low=1)


def reinitialise(model: nn.Module, generator: torch.Generator) -> None:
    """Reset every module that has `reset_parameters()` (its own default initialisation),
    with torch's RNG seeded from `generator` inside a fork, so the run's other random draws
    (dropout) are untouched and a resumed run re-initialises identically. ConfigError when a
    parameter belongs to no such module: it could not be re-initialised."""
    covered = set()
    resettable = [m for m in model.modules() if callable(getattr(m, "reset_parameters", None))]
    for module in resettable:
        covered.update(id(p) for p in module.parameters())
    for name, parameter in model.named_parameters():
        if id(parameter) not in covered:
            raise ConfigError(f"gdumb re-initialises the network with reset_parameters(), and "
                              f"parameter {name} belongs to no module that has one")
    seed = int(torch.randint(2**62, (1,), generator=generator))
    cuda = sorted({p.device.index for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        with torch.no_grad():
            for module in resettable:
                module.reset_parameters()


class GDumb(Method):
    """A greedy class-balanced memory; the network retrained from scratch on it each task."""

    Params = GDumbParams

    def __init__(self, params: GDumbParams | None = None) -> None:
        super().__init__(params)
        self.memory: TensorSet | None = None  # x (M, ...), y (M,), task (M,), M <= K

    def unusable_reason(self, problem: ProblemInfo) -> str | None:
        if not problem.classification:
            return ("keeps a class-balanced memory, and this problem is a regression (squared "
                    "error on real-valued targets), which has no classes")
        return None

    def before_task(self, ctx: Context) -> None:
        # Before the runner makes the task's optimizer, which then starts from these weights.
        reinitialise(ctx.model, ctx.generator)

    def training_data(self, data: TensorSet, ctx: Context) -> TensorSet:
        """Offer the task's examples to the memory; train on the memory alone."""
        self.memory = self.greedy_fill(data, ctx.generator)
        return self.memory

    def greedy_fill(self, data: TensorSet, generator: torch.Generator) -> TensorSet:
        """The memory after offering every example of `data`, in order, to the sampler."""
        budget = self.params.memory
        # slot -> (class key, example): from the memory (old) or `data` (new)
        keys = [] if self.memory is None else class_keys(self.memory).tolist()
        source = [("old", i) for i in range(len(keys))]
        counts: dict[int, int] = {}
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
        for i, key in enumerate(class_keys(data).tolist()):
            share = budget // max(1, len(counts))
            if key in counts and counts[key] >= share:
                continue  # its class already holds its share
            if len(keys) < budget:
                keys.append(key)
                source.append(("new", i))
            else:  # evict a random example of the largest class (ties: smallest key)
                largest = max(counts, key=lambda k: (counts[k], -k))
                slot = random_slot_of(torch.tensor(keys), largest, generator)
                counts[largest] -= 1
                if counts[largest] == 0:
                    del counts[largest]
                keys[slot], source[slot] = key, ("new", i)
            counts[key] = counts.get(key, 0) + 1
        is_new = torch.tensor([origin == "new" for origin, _ in source], device=data.y.device)
        index = torch.tensor([i for _, i in source], device=data.y.device)
        old_parts = self.memory if self.memory is not None else data  # no old slot: unused
        filled = []
        for old, new in zip(old_parts, data):  # each part (M, ...) in slot order
            chosen = new[index[is_new]]  # read only these when the inputs are streamed
            part = chosen.new_empty((len(source),) + chosen.shape[1:])
            part[is_new] = chosen
            part[~is_new] = old[index[~is_new]]
            filled.append(part)
        return TensorSet(*filled)

    def state_dict(self) -> dict[str, Any]:
        return {"memory": None if self.memory is None else list(self.memory)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory = None if state["memory"] is None else TensorSet(*state["memory"])
