"""Compose: run several methods as one, e.g. replay + EWC, without writing a new file.

Each hook calls the composed methods in the order given (the optax `chain` idea):
`training_data` and `make_batch` are chained (each sees the previous one's output), at
most one part may replace the training loss (`batch_loss`), penalties are summed, and
`after_backward` and `correct_update` projections apply one after another. Config:

    methods:
      - name: compose
        methods: [replay, {name: ewc, strength: 10}]

Without `methods`, compose combines replay and EWC with their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engram.config import MethodSpec
from engram.data.streams import TensorSet
from engram.errors import ConfigError
from engram.methods.base import Batch, Context, Method, ProblemInfo, QuadraticPenalty


@dataclass
class ComposeParams:
    methods: list[MethodSpec] = field(default_factory=list, metadata={
        "doc": "the methods to combine, each {name: METHOD, param: value, ...}"})


class Compose(Method):
    """Several methods' hooks, called in order; penalties add up."""

    Params = ComposeParams
    takes_methods = True  # the config parser validates `methods` as nested method entries
    default_methods = ("replay", "ewc")  # what {name: compose} alone combines

    def __init__(self, params: ComposeParams | None = None) -> None:
        super().__init__(params)
        from engram.registry import METHODS

        if not self.params.methods:  # Compose() in code: the same default as the config
            from engram.config import parse_method
            self.params.methods = [parse_method(n, {}, "compose") for n in self.default_methods]
        self.parts: list[Method] = [METHODS.get(spec.name)(spec.params)
                                    for spec in self.params.methods]
        masking = [s.name for s, m in zip(self.params.methods, self.parts) if m.masks_gradients]
        rewriting = [s.name for s, m in zip(self.params.methods, self.parts) if m.rewrites_gradients]
        if masking and rewriting:
            raise ConfigError(
                f"compose: {', '.join(masking)} freezes weights by zeroing their gradients and "
                f"{', '.join(rewriting)} recomputes the gradient or the optimizer's update, which "
                "would move the frozen weights; these methods cannot be combined")

        own_loss = [s.name for s, m in zip(self.params.methods, self.parts) if m.replaces_loss]
        if len(own_loss) > 1:
            raise ConfigError(f"compose: {' and '.join(own_loss)} each replace the training "
                              "loss (batch_loss); at most one such method can be combined")

    @property
    def model_needs(self) -> tuple[str, ...]:
        """Every part's needs, in order, each once."""
        return tuple(dict.fromkeys(need for part in self.parts for need in part.model_needs))

    def unusable_reason(self, problem: ProblemInfo) -> str | None:
        """The first part's reason, naming the part."""
        for spec, part in zip(self.params.methods, self.parts):
            reason = part.unusable_reason(problem)
            if reason is not None:
                return f"combines {spec.label()}, which {reason}"
        return None

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        for part in self.parts:
            model = part.prepare_model(model, ctx)
        return model

    def before_task(self, ctx: Context) -> None:
        for part in self.parts:
            part.before_task(ctx)

    def training_data(self, data: TensorSet, ctx: Context) -> TensorSet:
        for part in self.parts:
            data = part.training_data(data, ctx)
        return data

    def make_batch(self, batch: Batch, ctx: Context) -> Batch:
        for part in self.parts:
            batch = part.make_batch(batch, ctx)
        return batch

    def batch_loss(self, outputs: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        """The one part that replaces the training loss decides (at most one may)."""
        for part in self.parts:
            if part.replaces_loss:
                return part.batch_loss(outputs, batch, ctx)
        return ctx.loss_fn(outputs, batch.y)

    @property
    def replaces_loss(self) -> bool:
        return any(part.replaces_loss for part in self.parts)

    def penalty(self, ctx: Context) -> torch.Tensor | None:
        penalties = [p for p in (part.penalty(ctx) for part in self.parts) if p is not None]
        return sum(penalties[1:], penalties[0]) if penalties else None

    def quadratic_penalties(self, ctx: Context) -> list[QuadraticPenalty]:
        return [quadratic for part in self.parts for quadratic in part.quadratic_penalties(ctx)]

    def after_backward(self, ctx: Context) -> None:
        for part in self.parts:
            part.after_backward(ctx)

    def correct_update(self, ctx: Context) -> None:
        for part in self.parts:
            part.correct_update(ctx)

    def after_step(self, batch: Batch, ctx: Context) -> None:
        for part in self.parts:
            part.after_step(batch, ctx)

    def after_task(self, ctx: Context) -> None:
        for part in self.parts:
            part.after_task(ctx)

    def eval_model(self, ctx: Context) -> torch.nn.Module:
        """The first part that evaluates something other than the live model decides."""
        for part in self.parts:
            net = part.eval_model(ctx)
            if net is not ctx.model:
                return net
        return ctx.model

    def extra_bytes(self) -> int:
        return sum(part.extra_bytes() for part in self.parts)

    def state_dict(self) -> dict[str, Any]:
        return {str(i): part.state_dict() for i, part in enumerate(self.parts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, part in enumerate(self.parts):
            part.load_state_dict(state[str(i)])
