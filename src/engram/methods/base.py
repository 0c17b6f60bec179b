"""The Method interface: small hooks the runner calls around its one training loop.

The runner owns the step (see `engram.training.train_task`):

    model = method.prepare_model(model, ctx)     # once per run: progressive nets add columns
    method.before_task(ctx)
    data = method.training_data(task.train, ctx)
    for batch in batches(data):
        batch = method.make_batch(batch, ctx)
        loss = method.batch_loss(model(batch.x, batch.task), batch, ctx)  # ctx.loss_fn
        penalty = method.penalty(ctx)            # None means "no penalty"
        if penalty is not None: loss = loss + penalty
        optimizer.zero_grad(); loss.backward()
        for quadratic in method.quadratic_penalties(ctx):  # EWC, MAS, SI, ...: closed form
            quadratic.add_gradient()
        method.after_backward(ctx); optimizer.step()
        method.correct_update(ctx); method.after_step(batch, ctx)
    method.after_task(ctx)
    accuracy = evaluate(method.eval_model(ctx), test_data)  # snapshots, PackNet pick by task

A method never calls `optimizer.step()` itself, so methods compose. All of its state that
matters for resuming lives in `state_dict()` (tensors, numbers, strings, lists and dicts
only: checkpoints are loaded with `torch.load(weights_only=True)`).

Before any training, every entry point (`engram run`, `plasticity`, `window`) asks each
method `unusable_reason(problem)` and refuses the run with that reason when the method could
not act on the problem (e.g. LwF's softmax over a single regression output is constant, so
its loss and gradient would be exactly 0): see `refuse_unusable`.

Likewise for the network: a method that needs more of it than `net(x, task)` and its
parameters names what in `Method.model_needs` (names of engram.models.protocol.NEEDS:
"features", "head", "sequential_body", "linear_conv_body", "hidden_units", "relu_mlp"), and
never pokes at attributes beyond those; the runner refuses it, before training, on a network
that lacks one (e.g. a black box made by engram.models.adapt): see `refuse_unusable_model`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engram.config import MethodSpec, TrainConfig
from engram.data.lazy import loaded
from engram.data.streams import Stream, Task, TensorSet
from engram.errors import ConfigError
from engram.models.protocol import unmet_need

Batch = TensorSet  # a mini-batch is a TensorSet of B examples: x (B, ...), y (B,), task (B,)
"""A mini-batch: a TensorSet of B examples, x (B, ...), y (B,) targets, task (B,) task ids."""


@dataclass(frozen=True)
class QuadraticPenalty:
    """The penalty (strength / 2) * sum_i precision_i (theta_i - anchor_i)^2 + constant over
    `params` (one precision and one anchor tensor per parameter; a precision may be a 0-d
    tensor, broadcast): the penalty of EWC, online EWC, MAS, L2, SI, RWalk, EWC++ and L2
    Init (those without the 1/2 pass strength 2 lambda).

    The runner never differentiates it: after the backward pass of the step's loss it adds
    the gradient, strength * precision * (theta - anchor), straight to each parameter's
    .grad (`add_gradient`: three foreach passes over the parameters). As an autograd term
    the penalty cost about as much as a small network's whole step: EWC took 1.63x naive
    fine-tuning on the digits MLP that way, 1.32x this way (benchmarks/bench_fisher.py).
    `value()` is the penalty itself, for tests and reports."""
    strength: float
    params: Sequence[torch.Tensor]     # the network's parameters, theta
    precision: Sequence[torch.Tensor]  # e.g. EWC's summed Fisher, same order
    anchor: Sequence[torch.Tensor]     # theta*, same order
    constant: float = 0.0              # EWC's merged anchors leave one (see methods.ewc)

    def value(self) -> torch.Tensor:
        """The penalty as a differentiable scalar."""
        total = sum(((p - m).pow(2) * a).sum()
                    for p, a, m in zip(self.params, self.precision, self.anchor))
        return 0.5 * self.strength * (total + self.constant)

    def add_gradient(self) -> None:
        """param.grad += strength * precision * (param - anchor) (add_quadratic_gradients)."""
        add_quadratic_gradients([self])


@torch.no_grad()
def add_quadratic_gradients(penalties: Sequence[QuadraticPenalty]) -> None:
    """Add each penalty's gradient, strength * precision * (theta - anchor), to its
    parameters' .grad: for every parameter that trains (a frozen one takes no gradient, as
    with autograd; one without a gradient this step, an unused head, gets this one alone).
    Penalties of one strength share three foreach passes, so the seeds of a batched group
    (engram.batched_training) cost three passes, not three per seed."""
    # (strength, [(param, precision, anchor)], ids of its params): a parameter appears at
    # most once per group, since an in-place foreach over one tensor twice may race on CUDA
    groups: list[tuple[float, list[tuple[torch.Tensor, ...]], set[int]]] = []
    for quadratic in penalties:
        for triple in zip(quadratic.params, quadratic.precision, quadratic.anchor):
            if not triple[0].requires_grad:
                continue
            group = next((g for g in groups if g[0] == quadratic.strength
                          and id(triple[0]) not in g[2]), None)
            if group is None:
                group = (quadratic.strength, [], set())
                groups.append(group)
            group[1].append(triple)
            group[2].add(id(triple[0]))
    for strength, triples, _ in groups:
        params, precision, anchor = (list(part) for part in zip(*triples))
        pull = torch._foreach_sub([p.detach() for p in params], anchor)
        # strength (theta - anchor); a strength beyond float32's range gives inf, as the
        # penalty's autograd gradient did (alpha= would refuse it)
        torch._foreach_mul_(pull, strength)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch._foreach_addcmul_([p.grad for p in params], pull, precision)  # += pull * A


@dataclass
class Context:
    """What a hook may read. The runner updates `task` and `step`; hooks do not write here."""
    model: nn.Module
    stream: Stream
    train_cfg: TrainConfig
    # CPU generator: all of a run's randomness after init, except dropout masks, which
    # come from torch's global RNG (the runner checkpoints that too, so resume stays exact)
    generator: torch.Generator
    device: torch.device
    task: Task | None = None
    step: int = 0
    seen_tasks: list[Task] = field(default_factory=list)  # tasks started so far, current last
    batch: TensorSet | None = None  # the batch of the current step, set before penalty()
    # The training loss, (outputs, targets) -> scalar: cross-entropy for classification;
    # the plasticity problems' regression uses mean squared error.
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    # Online accuracy: when set, the runner counts the task examples each step classifies
    # correctly *before* its update and leaves the epoch's fraction in epoch_accuracy.
    count_correct: bool = False
    epoch_accuracy: float | None = None
    # The runner's optimizer and LR scheduler (None: none) of the current task, made by
    # engram.training.task_optimizer; one pair for the whole run under optimizer_policy carry.
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    # The user's factories (engram.fit): params -> optimizer and optimizer -> LR scheduler,
    # used by task_optimizer instead of train_cfg's optimizer / scheduler when set.
    make_optimizer: Callable[[Any], torch.optim.Optimizer] | None = None
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    # A training-batch transform (engram.fit's transform=; data augmentation), x (B, ...) ->
    # x: applied by train_task to every mini-batch trained on (the task's examples and what a
    # method mixes in), never to evaluation, nor to what after_step stores (a replay buffer
    # keeps the raw examples, augmented again each time they are replayed). Its random
    # draws come from the run's generator, passed as its second argument.
    transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    # train.amp on CUDA: the run's gradient scaler, kept from task to task by the runner.
    grad_scaler: Any = None


@dataclass(frozen=True)
class ProblemInfo:
    """What a method may need to know about a problem before training, to say whether it can
    act on it at all: a name for messages, the width of the output the loss reads (one head's),
    and whether the loss is a classification loss (cross-entropy on integer class targets)
    rather than a regression (squared error on real-valued targets)."""
    name: str
    outputs: int
    classification: bool


def needs_class_scores(problem: ProblemInfo, what: str) -> str | None:
    """The shared refusal of a method built on a softmax over class scores: `what` it does
    (e.g. "distils a softmax over the outputs") cannot work on one output, where the softmax
    is the constant 1 (so its loss and gradient are exactly 0), nor on regression outputs,
    which are not class scores. None when the problem has class scores."""
    if problem.outputs < 2:
        return (f"{what}, and this problem has {problem.outputs} output "
                "(its loss and gradient would be exactly 0)")
    if not problem.classification:
        return (f"{what}, and this problem is a regression (squared error on real-valued "
                "targets), whose outputs are not class scores")
    return None


def refuse_unusable(spec: MethodSpec, problem: ProblemInfo) -> None:
    """ConfigError naming the method, the problem and the reason when the method cannot act on
    the problem (`Method.unusable_reason`). Cheap: it only builds the method object, so every
    entry point calls it for every configured method before any training starts."""
    from engram.registry import METHODS

    reason = METHODS.get(spec.name)(spec.params).unusable_reason(problem)
    if reason is not None:
        raise ConfigError(f"method {spec.label()} cannot act on problem {problem.name}: it {reason}")


def model_unusable_reason(method: Method, model: nn.Module) -> str | None:
    """Why `method` cannot act on `model` (a phrase following "it": "needs WHAT, and WHY
    not"), from the method's declared `model_needs`; None when the network has all of them."""
    return unmet_need(model, method.model_needs)


def refuse_unusable_model(spec: MethodSpec, model: nn.Module) -> None:
    """ConfigError "method LABEL cannot act on this network: it needs ..." when the method
    needs a structure the network lacks (`Method.model_needs`). Called by the runner right
    after the network is built, before `prepare_model` and any training."""
    from engram.registry import METHODS

    reason = model_unusable_reason(METHODS.get(spec.name)(spec.params), model)
    if reason is not None:
        raise ConfigError(f"method {spec.label()} cannot act on this network: it {reason}")


@dataclass
class NoParams:
    """This method has no parameters."""


class Method:
    """Base class of a continual-learning method: every hook does nothing (plain fine-tuning,
    `naive`). A method subclasses it, overrides the hooks it needs (the module docstring shows
    where the runner calls each), and registers with one line in engram/methods/__init__.py,
    e.g. ``METHODS.add("ewc", EWC, "elastic weight consolidation ...")`` (engram.registry).

    `Params` is a dataclass of the method's config keys, validated from YAML or from
    ``engram.fit(..., method_params=...)``; the instance gets it as ``self.params``. Example,
    an L2 pull toward the previous task's weights, penalty = (strength / 2) * ||theta - theta*||^2::

        @dataclass
        class Params:
            strength: float = 1.0

        class PullBack(Method):
            Params = Params

            def after_task(self, ctx):
                self.anchor = [p.detach().clone() for p in ctx.model.parameters()]

            def penalty(self, ctx):
                if not hasattr(self, "anchor"):
                    return None
                return self.params.strength / 2 * sum(
                    ((p - a) ** 2).sum() for p, a in zip(ctx.model.parameters(), self.anchor))

    (A real method also keeps `anchor` in `state_dict` so that a resumed run has it.)
    """

    Params: ClassVar[type] = NoParams
    # Freezing by zeroing gradients (PackNet) is undone by a method that recomputes the
    # gradient (SAM) or rewrites the optimizer's update (A-GEM, OGD): both move the frozen
    # weights. Compose refuses to combine the two kinds.
    masks_gradients: ClassVar[bool] = False
    rewrites_gradients: ClassVar[bool] = False
    # What the method needs of the network beyond net(x, task), net.all_logits(x) and its
    # parameters: names of engram.models.protocol.NEEDS (a property where it depends on the
    # params). The runner refuses the method on a network lacking one (refuse_unusable_model).
    model_needs: ClassVar[tuple[str, ...]] = ()
    # Whether the seeds of a run may train together as one stacked network (`batch_seeds`,
    # engram.batched_training): every hook then runs per seed on that seed's own network,
    # generator and state, so a method qualifies once a test shows its batched rows equal
    # its one-seed rows (tests/test_batched_seeds.py); the others run one seed at a time.
    batchable: ClassVar[bool] = False

    def __init__(self, params: Any = None) -> None:
        self.params = params if params is not None else self.Params()

    def prepare_model(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Called once per run, before any task (and before a checkpoint is loaded into the
        model): return the network to train. Architecture methods return a wrapper."""
        return model

    def before_task(self, ctx: Context) -> None:
        """Called at the start of every task, `ctx.task` already the new task (e.g. LwF
        keeps a frozen copy of the previous network here)."""

    def training_data(self, data: TensorSet, ctx: Context) -> TensorSet:
        """The examples the task trains on, batched and shuffled by the runner: the task's
        training split `data` itself, or more (joint training adds every earlier task's)."""
        return data

    def make_batch(self, batch: Batch, ctx: Context) -> Batch:
        """The batch to train on: `batch` itself, or its examples first, in order, followed by
        any extra ones (replay's memory examples). The runner relies on that order to record
        the loss and accuracy of the step's own examples."""
        return batch

    def batch_loss(self, outputs: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        """The loss the runner trains on, from the network's outputs (B, K) on the step's
        batch (what make_batch returned, transformed): the problem's loss `ctx.loss_fn` unless
        a method needs another one on those same outputs (ER-ACE masks the logits of classes
        absent from the batch). Penalties are added to it."""
        return ctx.loss_fn(outputs, batch.y)

    @property
    def replaces_loss(self) -> bool:
        """Whether `batch_loss` is other than the problem's loss (the method overrides it)."""
        return type(self).batch_loss is not Method.batch_loss

    def penalty(self, ctx: Context) -> torch.Tensor | None:
        """A scalar added to the step's loss (`ctx.batch` is the step's batch), or None for
        none. Regularisation methods live here, e.g. EWC's
        (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2 (Kirkpatrick et al. 2017)."""
        return None

    def quadratic_penalties(self, ctx: Context) -> list[QuadraticPenalty]:
        """Penalties of the form (lambda / 2) sum_i precision_i (theta_i - anchor_i)^2, whose
        gradients the runner adds in closed form after the backward pass, before
        after_backward (so projections and SAM see them, as any penalty's): EWC, online EWC,
        MAS, L2, SI, RWalk, EWC++, L2 Init. A quadratic penalty belongs here rather than in
        `penalty`, where autograd would pay for a graph as large as the network twice over
        every step."""
        return []

    def unusable_reason(self, problem: ProblemInfo) -> str | None:
        """Why this method cannot act on `problem`, as a phrase following "it" (e.g.
        "distils a softmax over the outputs, and this problem has 1 output ..."); None
        when it can. Checked before any training (`refuse_unusable`)."""
        return None

    def after_backward(self, ctx: Context) -> None:
        """Called after `loss.backward()`, before `optimizer.step()`: the gradients in
        `.grad` may be read or changed (SI accumulates its path integral, PackNet zeroes
        frozen weights' gradients, SAM recomputes them at the perturbed point)."""

    def correct_update(self, ctx: Context) -> None:
        """Called right after `optimizer.step()`, before any method's `after_step`: a method
        may replace the update the optimizer just made (OGD and A-GEM project it, see
        `UpdateSnapshot`), so that every later hook sees the corrected weights."""

    def after_step(self, batch: Batch, ctx: Context) -> None:
        """Called after every update with the step's batch (replay fills its memory,
        continual backprop and ReDo reinitialise units here)."""

    def after_task(self, ctx: Context) -> None:
        """Called when a task's training ends, before its evaluation (EWC estimates the
        Fisher and stores the anchor, PackNet prunes)."""

    def eval_model(self, ctx: Context) -> nn.Module:
        """The network that is evaluated, `net(x, task) -> logits`: the live model, unless
        the method keeps per-task weights (snapshots, PackNet masks) and may pick them by
        task id, which only task-incremental learning allows (see `task_ids_at_test`)."""
        return ctx.model

    def state_dict(self) -> dict[str, Any]:
        """All the state a resumed run needs (anchors, importances, memories), as tensors,
        numbers, strings, lists and dicts only: checkpoints are loaded with
        ``torch.load(weights_only=True)``. Also what `extra_bytes` counts."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (on resume, after `prepare_model`)."""

    def extra_bytes(self) -> int:
        """Bytes of tensors the method keeps between tasks (anchors, Fishers, buffers)."""
        return sum(t.numel() * t.element_size() for t in _tensors(self.state_dict()))


def penalty_value(method: Method, ctx: Context) -> torch.Tensor | None:
    """The whole penalty `method` adds to the step's loss, as a differentiable scalar: its
    `penalty` plus its quadratic penalties' values (None: no penalty). What the runner
    trains on, for tests and reports; the runner itself never builds it (see
    QuadraticPenalty)."""
    terms = [quadratic.value() for quadratic in method.quadratic_penalties(ctx)]
    penalty = method.penalty(ctx)
    if penalty is not None:
        terms.insert(0, penalty)
    return sum(terms[1:], terms[0]) if terms else None


def task_ids_at_test(ctx: Context) -> bool:
    """Whether the task identity may be used at test time: task-incremental learning only."""
    return ctx.stream.scenario == "task"


def _tensors(tree: Any):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def frozen_copy(model: nn.Module, state: dict[str, Any] | None = None) -> nn.Module:
    """A copy of `model` in eval mode that takes no gradients: a teacher to distil from (LwF,
    iCaRL, generative replay's previous solver), with the weights of `state` when given (a
    resumed method's saved teacher)."""
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if state is not None:
        teacher.load_state_dict(state)
    return teacher


def random_subset(data: TensorSet, n: int | None, generator: torch.Generator) -> TensorSet:
    """At most `n` examples of `data` drawn without replacement (all of them if n is None),
    as tensors (inputs streamed from a Dataset are read: engram.data.lazy)."""
    if n is None or n >= len(data):
        return TensorSet(loaded(data.x), data.y, data.task)
    pick = torch.randperm(len(data), generator=generator)[:n].to(data.y.device)
    return TensorSet(*(part[pick] for part in data))


def flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    """All parameters' .grad as one vector (P,), in `params` order."""
    return torch.cat([p.grad.reshape(-1) for p in params])


def set_flat_grad(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Write a (P,) vector back into the parameters' .grad, in `params` order."""
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


class UpdateSnapshot:
    """The update an optimizer actually makes, for methods that constrain it (OGD, A-GEM).

    A gradient projection alone holds only for plain SGD: Adam rescales each coordinate and
    momentum or weight decay add other directions, so the step leaves the subspace the
    projected gradient was in. Instead, `take(params)` copies the trainable parameters
    w_old before `optimizer.step()` (in after_backward); after the step, `update()` is
    d = w_new - w_old and `replace(d')` writes w_old + d' back (in correct_update).
    Costs one copy of the trainable parameters and a few vector operations per step.
    """

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.before: torch.Tensor | None = None  # (P,) w_old, flat

    def take(self, params: list[torch.Tensor]) -> None:
        self.params = params
        with torch.no_grad():
            self.before = torch.cat([p.detach().reshape(-1) for p in params])

    @property
    def taken(self) -> bool:
        return self.before is not None

    def update(self) -> torch.Tensor:
        """d = w_new - w_old, flat (P,)."""
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1) for p in self.params]) - self.before

    def replace(self, update: torch.Tensor) -> None:
        """Set the parameters to w_old + `update` and forget the snapshot."""
        with torch.no_grad():
            offset = 0
            for p in self.params:
                n = p.numel()
                p.copy_((self.before[offset:offset + n] + update[offset:offset + n]).view_as(p))
                offset += n
        self.forget()

    def forget(self) -> None:
        """Drop the snapshot (the update stays as the optimizer made it)."""
        self.params, self.before = [], None
