"""Experience replay with a fixed memory budget and a choice of memory policy.

Memory: `memory` examples (x, target, task id), never more, so cost does not grow with the
stream. What the memory keeps is the `policy`:

- `reservoir` (default): every training example offered to the buffer (the task's own
  mini-batch, not the replayed part) is stored with probability memory / n_seen, replacing a
  uniformly chosen slot: reservoir sampling (Vitter 1985, "Random sampling with a
  reservoir", Algorithm R), a uniform sample of everything seen so far. As a
  continual-learning baseline: Chaudhry et al. 2019, "On tiny episodic memories in
  continual learning" (ER-reservoir).
- `class_balanced`: examples are stored while there is room; once full, a new example
  replaces a random stored example of the class that holds the most slots (ties: the class
  met first), as REMIND's buffer does (Hayes et al. 2020; reference sheet, section 14,
  variant c). Classes end up with equal shares however unequal the stream.
- `herding`: the memory changes only at the end of a task. Each class of the finished task
  gets m = memory // (classes seen) exemplars chosen by iCaRL's herding (Rebuffi et al.
  2017, Algorithm 4): on L2-normalised features of the network's body, greedily add the
  example that brings the mean of the chosen set closest to the class mean ("review only the
  underlined parts"); earlier classes keep the first m of their ordered lists (Algorithm 5).
  A class is identified by (task id, target), so this works in all three scenarios.

Each step trains on the concatenation of the current mini-batch and `replay_batch_size`
examples drawn uniformly (with replacement) from the memory; the loss is the mean cross
entropy over the concatenated batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from engram.data.streams import TensorSet
from engram.errors import ConfigError
from engram.schema import opt
from engram.methods.base import Batch, Context, Method, ProblemInfo
from engram.models.protocol import eval_mode


@dataclass
class ReplayParams:
    memory: int = opt(200, "examples the buffer holds (fixed budget)", low=1)
    replay_batch_size: int | None = opt(None, "memory examples per step (null: train.batch_size)", low=1)
    policy: Literal["reservoir", "class_balanced", "herding"] = opt(
        "reservoir", "what the memory keeps: a uniform sample, equal shares per class, or "
        "iCaRL's herding exemplars chosen at each task's end")


def class_keys(data: TensorSet) -> torch.Tensor:
    """One integer per example naming its class: (task id, target), unique in every scenario."""
    return data.task.long() * 2**32 + data.y.long()


def herding_selection(features: torch.Tensor, m: int) -> torch.Tensor:
    """iCaRL's herding (Rebuffi et al. 2017, Alg. 4): indices of m rows of `features` (N, d),
    in the order chosen; the k-th is the row that brings the mean of the first k closest to
    the mean of all rows, never picking a row twice."""
    target = features.mean(dim=0)                      # (d,)
    chosen: list[int] = []
    total = torch.zeros_like(target)                   # sum of the chosen rows
    available = torch.ones(len(features), dtype=torch.bool, device=features.device)
    for k in range(1, min(m, len(features)) + 1):
        distance = (target - (total + features) / k).norm(dim=1)  # (N,) if each were added
        distance[~available] = float("inf")
        pick = int(distance.argmin())
        chosen.append(pick)
        total += features[pick]
        available[pick] = False
    return torch.tensor(chosen, dtype=torch.long, device=features.device)


def empty_memory(batch: TensorSet, memory: int) -> TensorSet:
    """A memory of `memory` zero examples shaped, typed and placed like `batch`'s."""
    return TensorSet(*(torch.zeros((memory,) + part.shape[1:], dtype=part.dtype,
                                   device=part.device) for part in batch))


def reservoir_slots(n_seen: int, n_new: int, memory: int, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reservoir sampling (Vitter 1985, Algorithm R) for a batch of `n_new` examples offered
    after `n_seen` others: (slots, sources), two (k,) long tensors on the CPU, meaning "write
    the batch's example sources[i] into memory slot slots[i]"; slots are distinct and sorted.

    Example number p (0-based count of examples offered before it) goes to slot p while the
    memory fills, afterwards to a slot j ~ U{0..p} if j < memory. When two examples of the
    batch pick the same slot the later one wins, as in the one-at-a-time algorithm. Draws
    n_new float64 uniforms from `generator`: float32 ones have 2**24 values, so once about a
    million examples were offered some slots would be measurably likelier than others, and
    past 2**25 half of them could never be drawn again."""
    position = n_seen + torch.arange(n_new)
    draw = (torch.rand(n_new, generator=generator, dtype=torch.float64) * (position + 1)).long()
    slot = torch.where(position < memory, position, draw)
    keep = slot < memory
    slot, source = slot[keep], torch.arange(n_new)[keep]
    winner = torch.full((memory,), -1, dtype=torch.long)
    winner.scatter_reduce_(0, slot, source, reduce="amax")
    slots = torch.nonzero(winner >= 0).squeeze(1)
    return slots, winner[slots]


def reservoir_insert(buffer: TensorSet, batch: TensorSet, n_seen: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Offer `batch` to the reservoir `buffer` (M slots, `n_seen` examples offered before):
    write the examples Algorithm R keeps into their slots (reservoir_slots) and return
    (slots, sources) on the batch's device, for what else a method stores per slot (DER's
    logits). The caller counts the batch into n_seen."""
    slots, sources = reservoir_slots(n_seen, len(batch), len(buffer), generator)
    slots, sources = slots.to(batch.y.device), sources.to(batch.y.device)
    if len(slots):
        for stored, new in zip(buffer, batch):
            stored[slots] = new[sources]
    return slots, sources


def random_slot_of(keys: torch.Tensor, key: int | torch.Tensor, generator: torch.Generator) -> int:
    """A slot drawn uniformly among those whose class key (`keys` (M,)) is `key`: the example
    a class-balanced memory evicts from its largest class (replay's class_balanced, GDumb)."""
    members = torch.nonzero(keys == key).squeeze(1)
    return int(members[torch.randint(len(members), (1,), generator=generator)])


@torch.no_grad()
def herding_memory(memory: TensorSet | None, data: TensorSet, model: torch.nn.Module,
                   budget: int) -> TensorSet:
    """iCaRL's exemplar memory after a task (Rebuffi et al. 2017, Algorithms 4 and 5): with
    m = budget // (classes seen), every class already in `memory` keeps the first m of its
    ordered exemplars, and every new class of `data` gets m exemplars chosen by herding on
    the L2-normalised `model.features` (eval mode: no dropout noise). Classes are (task id,
    target) keys; the result lists them old first, each in its chosen order."""
    new_keys = class_keys(data)
    old_keys = class_keys(memory) if memory is not None else new_keys[:0]
    old_classes = list(dict.fromkeys(old_keys.tolist()))  # in stored order
    new_classes = [k for k in dict.fromkeys(new_keys.tolist()) if k not in old_classes]
    n_classes = len(old_classes) + len(new_classes)
    per_class = budget // n_classes
    if per_class == 0:
        raise ConfigError(f"a memory of {budget} examples cannot hold one exemplar for each "
                          f"of the {n_classes} classes seen so far: raise memory to at least "
                          f"{n_classes} (or the number of classes of the whole stream)")
    parts = []
    for key in old_classes + new_classes:
        if key in old_classes:  # stored in chosen order: the first m stay (Alg. 5)
            index = torch.nonzero(old_keys == key).squeeze(1)[:per_class]
            parts.append(TensorSet(*(part[index] for part in memory)))
        else:
            index = torch.nonzero(new_keys == key).squeeze(1)
            members = TensorSet(*(part[index] for part in data))
            with eval_mode(model):  # features without dropout noise
                features = F.normalize(model.features(members.x), dim=1)  # (n, d)
            pick = herding_selection(features, per_class)
            parts.append(TensorSet(*(part[pick] for part in members)))
    return TensorSet.concat(parts)


def memory_draw(n_filled: int, replay_batch_size: int | None, ctx: Context) -> torch.Tensor:
    """(B,) slots of a memory holding `n_filled` examples, drawn uniformly with replacement
    from the run's generator (on the CPU); B = replay_batch_size, default train.batch_size.
    Replay's memory batches, and DER's."""
    size = replay_batch_size or ctx.train_cfg.batch_size
    return torch.randint(n_filled, (size,), generator=ctx.generator)


class Replay(Method):
    """Reservoir-sampled replay buffer mixed into every mini-batch."""

    Params = ReplayParams
    batchable = True  # its seeds may train as one stacked network (batch_seeds)

    def __init__(self, params: ReplayParams | None = None) -> None:
        super().__init__(params)
        self.buffer: TensorSet | None = None  # x (M, ...), y (M,), task (M,)
        self.n_seen = 0                       # examples offered to the reservoir so far

    @property
    def model_needs(self) -> tuple[str, ...]:
        """Herding picks exemplars by their body features; the other policies need nothing."""
        return ("features",) if self.params.policy == "herding" else ()

    def unusable_reason(self, problem: ProblemInfo) -> str | None:
        """class_balanced and herding sort examples by class; reservoir works on any targets."""
        if self.params.policy != "reservoir" and not problem.classification:
            return (f"keeps its memory per class (policy: {self.params.policy}), and this problem "
                    "is a regression (squared error on real-valued targets), which has no "
                    "classes; use policy: reservoir")
        return None

    @property
    def n_filled(self) -> int:
        if self.params.policy == "herding":
            return 0 if self.buffer is None else len(self.buffer)
        return min(self.n_seen, self.params.memory)

    def sample(self, ctx: Context) -> TensorSet:
        """`replay_batch_size` (default train.batch_size) memory examples drawn uniformly
        with replacement; call only when n_filled > 0."""
        pick = memory_draw(self.n_filled, self.params.replay_batch_size, ctx)
        return TensorSet(*(part[pick.to(part.device)] for part in self.buffer))

    def make_batch(self, batch: Batch, ctx: Context) -> Batch:
        if self.n_filled == 0:
            return batch
        return TensorSet.concat([batch, self.sample(ctx)])

    def after_step(self, batch: Batch, ctx: Context) -> None:
        memory, n = self.params.memory, len(batch)
        if self.params.policy == "herding":
            return  # chosen at the task's end
        if self.buffer is None:
            self.buffer = empty_memory(batch, memory)
        if self.params.policy == "class_balanced":
            self._class_balanced_insert(batch, ctx)
            return
        reservoir_insert(self.buffer, batch, self.n_seen, ctx.generator)
        self.n_seen += n

    def _class_balanced_insert(self, batch: Batch, ctx: Context) -> None:
        """Store while there is room; then replace a random example of the largest class."""
        memory = self.params.memory
        batch_keys = class_keys(batch)
        keys = class_keys(self.buffer)
        for i in range(len(batch)):  # one at a time: each insertion changes the class counts
            if self.n_seen < memory:
                slot = self.n_seen
            else:
                classes, counts = torch.unique(keys, return_counts=True)  # sorted by key
                largest = classes[counts.argmax()]  # the first of the tied, by key order
                slot = random_slot_of(keys, largest, ctx.generator)
            for stored, new in zip(self.buffer, batch):
                stored[slot] = new[i]
            keys[slot] = batch_keys[i]
            self.n_seen += 1

    def after_task(self, ctx: Context) -> None:
        if self.params.policy == "herding":
            self.buffer = herding_memory(self.buffer, ctx.task.train, ctx.model,
                                         self.params.memory)

    def state_dict(self) -> dict[str, Any]:
        buffer = None if self.buffer is None else list(self.buffer)
        return {"buffer": buffer, "n_seen": self.n_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = None if state["buffer"] is None else TensorSet(*state["buffer"])
        self.n_seen = int(state["n_seen"])
