"""Experience replay with a fixed memory budget filled by reservoir sampling.

Memory: `memory` examples (x, target, task id), never more, so cost does not grow with the
stream. Every training example offered to the buffer (the task's own mini-batch, not the
replayed part) is stored with probability memory / n_seen, replacing a uniformly chosen
slot: reservoir sampling (Vitter 1985, "Random sampling with a reservoir", Algorithm R),
which keeps a uniform sample of everything seen so far. As a continual-learning baseline:
Chaudhry et al. 2019, "On tiny episodic memories in continual learning" (ER-reservoir).

Each step trains on the concatenation of the current mini-batch and `replay_batch_size`
examples drawn uniformly (with replacement) from the memory; the loss is the mean cross
entropy over the concatenated batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engram.config import opt
from engram.data.streams import TensorSet
from engram.methods.base import Batch, Context, Method


@dataclass
class ReplayParams:
    memory: int = opt(200, "examples the buffer holds (fixed budget)", low=1)
    replay_batch_size: int | None = opt(None, "memory examples per step (null: train.batch_size)", low=1)


class Replay(Method):
    """Reservoir-sampled replay buffer mixed into every mini-batch."""

    Params = ReplayParams

    def __init__(self, params: ReplayParams | None = None) -> None:
        super().__init__(params)
        self.buffer: TensorSet | None = None  # x (M, ...), y (M,), task (M,)
        self.n_seen = 0                       # examples offered to the reservoir so far

    @property
    def n_filled(self) -> int:
        return min(self.n_seen, self.params.memory)

    def make_batch(self, batch: Batch, ctx: Context) -> Batch:
        if self.n_filled == 0:
            return batch
        size = self.params.replay_batch_size or ctx.train_cfg.batch_size
        pick = torch.randint(self.n_filled, (size,), generator=ctx.generator).to(batch.y.device)
        return TensorSet(*(torch.cat([new, old[pick]]) for new, old in zip(batch, self.buffer)))

    def after_step(self, batch: Batch, ctx: Context) -> None:
        memory, n = self.params.memory, len(batch)
        if self.buffer is None:
            self.buffer = TensorSet(*(torch.zeros((memory,) + part.shape[1:], dtype=part.dtype,
                                                  device=part.device) for part in batch))
        # Algorithm R, one batch at a time: example number p (0-based count of examples
        # offered before it) goes to slot p while the buffer fills, afterwards to a slot
        # j ~ U{0..p} if j < memory.
        # The uniforms are float64: float32 ones have 2**24 values, so once about a million
        # examples were offered some slots would be measurably likelier than others, and past
        # 2**25 half of them could never be drawn again.
        position = self.n_seen + torch.arange(n)
        draw = (torch.rand(n, generator=ctx.generator, dtype=torch.float64) * (position + 1)).long()
        slot = torch.where(position < memory, position, draw)
        keep = slot < memory
        if keep.any():
            slot, source = slot[keep], torch.arange(n)[keep]
            # When two examples of one batch pick the same slot, the later one wins, as in
            # the one-at-a-time algorithm.
            winner = torch.full((memory,), -1, dtype=torch.long)
            winner.scatter_reduce_(0, slot, source, reduce="amax")
            slots = torch.nonzero(winner >= 0).squeeze(1)
            device = batch.y.device
            for stored, new in zip(self.buffer, batch):
                stored[slots.to(device)] = new[winner[slots].to(device)]
        self.n_seen += n

    def state_dict(self) -> dict[str, Any]:
        buffer = None if self.buffer is None else list(self.buffer)
        return {"buffer": buffer, "n_seen": self.n_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = None if state["buffer"] is None else TensorSet(*state["buffer"])
        self.n_seen = int(state["n_seen"])
