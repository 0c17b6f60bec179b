"""engram.fit: train your own network on your own stream with any engram method, from Python.

    import engram, torch
    stream = engram.stream_from((x_train, y_train), (x_test, y_test), classes_per_task=2)
    result = engram.fit(my_module, stream, "ewc", method_params={"strength": 100},
                        optimizer=lambda params: torch.optim.AdamW(params, 1e-3), epochs=5)
    result.accuracy_matrix, result.forgetting, result.rows

It is `engram run`'s loop, not a copy: the run goes through the harness (one folder, one
results table with the continual columns, resume) and the same per-run body
(engram.experiments.continual.run_through_stream: baseline, training, evaluations,
checkpoints, run_complete). A top-layer module, beside the CLI.

Run ids. A fit's run id hashes what determines its numbers and can be described: the
stream's tensors (a sha256 digest) and task layout, the model's repr and initial weights,
the method and its parameters, the train settings, the seed, `name`, and the *names*
(module and qualified name; an object's repr) of the optimizer, scheduler, loss and metric
callables. Rerunning fit with the same arguments and `out` skips the finished run (or
resumes an interrupted one from its checkpoint). Changing the *body* of a function or
lambda, or a value it closes over, is not detected: give a new `name=` or a new `out`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engram.config import MethodSpec, TrainConfig, parse_method, params_dict, train_identity
from engram.data.lazy import LazyInputs
from engram.data.streams import Stream, TensorSet
from engram.errors import ConfigError
from engram.experiments.continual import RunIdentity, run_through_stream
from engram.experiments.harness import (Job, JobSink, Plan, Report, content_digest,
                                        resolve_device, run_id, run_plan)
from engram.methods.base import (Context, Method, ProblemInfo, refuse_unusable,
                                 refuse_unusable_model)
from engram.metrics import average_accuracy, average_forgetting, backward_transfer
from engram.models import ContinualNet, adapt
from engram.results import COLUMNS, KEY, accuracy_matrices, default_split, read_rows
from engram.schema import parse_dataclass

CHECKPOINT_SECONDS = 10.0  # as `engram run`'s default: a resume checkpoint at most this often
# Metrics every run writes; a user metric may not take one of these names.
OWN_METRICS = ("accuracy", "loss", "train_loss", "train_seconds", "extra_bytes", "run_complete")

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FitResult:
    """What engram.fit measured. accuracy_matrix[i, j]: accuracy on task j+1 after training
    task i+1 (test split, or val when only val was evaluated); rows: the run's rows of the
    results table (a pandas DataFrame as engram.load_results gives, when pandas is installed;
    else a list of dicts of text, as engram.results.read_rows gives); folder: where they are
    (OUT/results.csv); model: the trained network (an engram ContinualNet wrapping yours),
    None when the run was already finished in `out` and nothing was trained; report: the
    harness report (report.skipped == 1 when the run was found finished)."""
    accuracy_matrix: np.ndarray
    rows: Any
    folder: Path
    run_id: str
    model: nn.Module | None
    report: Report

    @property
    def forgetting(self) -> float:
        """Average forgetting (engram.metrics.average_forgetting): > 0 means worse."""
        return average_forgetting(self.accuracy_matrix)

    @property
    def average_accuracy(self) -> float:
        """Mean accuracy over all tasks after the last one (engram.metrics.average_accuracy)."""
        return average_accuracy(self.accuracy_matrix)

    @property
    def backward_transfer(self) -> float:
        """Backward transfer (engram.metrics.backward_transfer): < 0 means forgetting."""
        return backward_transfer(self.accuracy_matrix)


@dataclass
class FitPayload:
    """The fit's one job: everything built and checked, run in this process."""
    ident: RunIdentity
    method: Method
    ctx: Context
    metrics: list[Callable]


def execute_fit(job: Job, sink: JobSink) -> None:
    """The harness's `execute` for engram.fit: the continual runs' body, as is."""
    payload: FitPayload = job.payload
    run_through_stream(payload.ident, payload.method, payload.ctx, sink, CHECKPOINT_SECONDS,
                       payload.metrics)


def fit(model: nn.Module, stream: Stream, method: str | MethodSpec = "naive", *,
        method_params: dict[str, Any] | None = None,
        optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        scheduler_step: str = "epoch", optimizer_policy: str = "fresh",
        loss: Loss | None = None,
        transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        amp: bool = False, channels_last: bool = False,
        epochs: int = TrainConfig.epochs, batch_size: int = TrainConfig.batch_size,
        seed: int = 0, metrics: Sequence[Callable[[torch.Tensor, torch.Tensor], float]] = (),
        eval_splits: Sequence[str] = ("test",), name: str = "fit",
        out: str | Path | None = None, device: str = "cpu", progress: bool = True
        ) -> FitResult:
    """Train `model` through `stream` with a continual-learning method; return a FitResult.

    model: any nn.Module mapping x to logits (adapted with engram.models.adapt for the
        stream's heads), or an engram ContinualNet, used as is. It is not changed: fit
        trains a copy (result.model).
    stream: an engram Stream (engram.stream_from for your own data).
    method: a registered method's name (`engram list`), with its parameters in
        `method_params`, e.g. fit(net, stream, "ewc", method_params={"strength": 100});
        compose takes method_params={"methods": ["ewc", {"name": "replay", ...}]}. Or a
        MethodSpec (engram.config.parse_method), then without method_params.
    optimizer: params -> torch optimizer, e.g. lambda p: torch.optim.AdamW(p, 1e-3)
        (default: SGD, lr 0.05, as `engram run`).
    optimizer_policy: "fresh" (a new optimizer and scheduler for every task: no moments
        cross a task boundary, the schedule restarts) or "carry" (one for the whole run,
        its state kept, also across a resume), as train.optimizer_policy in a config.
    scheduler: optimizer -> LR scheduler (optional), stepped every epoch, or every
        mini-batch with scheduler_step="step"; ReduceLROnPlateau gets the epoch's loss.
    loss: (logits, targets) -> scalar, for training and the evaluation `loss` rows (default
        cross-entropy).
    transform: (x, generator) -> x, applied to every training mini-batch (the task's
        examples and what the method mixes in, e.g. replayed ones), never to evaluation:
        data augmentation on the device; draw its randomness from `generator` (the run's,
        so a run repeats and resumes exactly). A replay buffer keeps the raw examples.
    amp: mixed precision, as train.amp in a config: float16 autocast with one gradient
        scaler for the run on CUDA (bfloat16 autocast elsewhere, slow on a CPU); a step the
        scaler skips skips the method's hooks too. channels_last: the model's 4-d weights and
        4-d inputs in NHWC order (train.channels_last; faster convolutions on recent GPUs).
    epochs, batch_size: per task; seed: model copy's RNG (dropout, widened heads) and the
        run's generator (batch order, method draws).
    metrics: functions (logits, targets) -> float evaluated with accuracy and loss on every
        task and split; each adds rows whose metric is the function's __name__.
    eval_splits: "test" and/or "val" (a stream with a validation split).
    name: the rows' name column (and part of the run id).
    out: a folder for the results (rows, resume checkpoints, config.yaml, the harness's
        records; several fits may share one); None: a new temporary folder (kept, see
        result.folder).
    device: "cpu", "cuda", "cuda:N", "mps" or "auto"; progress: a progress bar (a line in a log).
    Bad arguments raise a one-line ConfigError, before any training or folder.
    """
    spec = _method_spec(method, method_params)
    train_cfg = parse_dataclass(TrainConfig, {
        "epochs": epochs, "batch_size": batch_size, "eval_splits": list(eval_splits),
        "scheduler_step": scheduler_step, "optimizer_policy": optimizer_policy, "amp": amp,
        "channels_last": channels_last}, "fit")
    if not train_cfg.eval_splits:
        raise ConfigError("fit: eval_splits: give at least one of test, val")
    for what, value in (("optimizer", optimizer), ("scheduler", scheduler), ("loss", loss),
                        ("transform", transform)):
        if value is not None and not callable(value):
            raise ConfigError(f"fit: {what}= must be a callable, not {type(value).__name__}")
    metrics = _checked_metrics(metrics)
    if not isinstance(stream, Stream):
        raise ConfigError(f"fit: stream must be an engram Stream (engram.stream_from(...)), "
                          f"not {type(stream).__name__}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"fit: model must be a torch nn.Module, not {type(model).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"fit: seed must be an integer, not {seed!r}")
    run_device = resolve_device(device)
    description = {
        "name": name, "seed": seed, "stream": _describe_stream(stream),
        "model": {"repr": repr(model), "weights": _weights_digest(model)},
        "method": {"name": spec.name, **params_dict(spec.params)},
        "train": train_identity(train_cfg),
        "optimizer": _describe(optimizer), "scheduler": _describe(scheduler),
        "loss": _describe(loss), "metrics": [_describe(metric) for metric in metrics]}
    if transform is not None:  # absent when unused: the run ids of earlier fits stay
        description["transform"] = _describe(transform)
    ident = RunIdentity(run_id(description), name, spec, seed, "user", "user", stream.scenario)

    refuse_unusable(spec, ProblemInfo("your stream", stream.head_dim, classification=True))
    torch.manual_seed(seed)  # a widened head's init, then dropout masks
    net = _engram_net(copy.deepcopy(model), stream).to(run_device)
    refuse_unusable_model(spec, net)
    trainer: Method = _method_class(spec.name)(spec.params)
    ctx = Context(model=net, stream=_on_device(stream, run_device), train_cfg=train_cfg,
                  generator=torch.Generator().manual_seed(seed), device=run_device,
                  loss_fn=loss or F.cross_entropy, make_optimizer=optimizer,
                  make_scheduler=scheduler, transform=transform)
    ctx.model = trainer.prepare_model(net, ctx).to(run_device)  # e.g. a progressive net

    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="engram-fit-"))
    job = Job(ident.run_id, seed, spec.label(), FitPayload(ident, trainer, ctx, metrics),
              size=len(stream) * train_cfg.epochs)
    plan = Plan(command="fit", identity={"runs": [ident.run_id]}, growable=("runs",),
                config={"fit": description}, columns=COLUMNS, key=KEY, jobs=[job],
                execute=execute_fit, device=str(run_device), threads=0, unit="epoch")
    report = run_plan(plan, folder, show_progress=progress)  # threads=0: the caller's torch
    return _result(report, ident.run_id, None if report.skipped else ctx.model)


# ----------------------------------------------------------------------------- arguments

def _method_class(name: str) -> type:
    from engram.registry import METHODS

    return METHODS.get(name)


def _method_spec(method: str | MethodSpec, params: dict[str, Any] | None) -> MethodSpec:
    """The validated MethodSpec of fit's method= and method_params=."""
    if isinstance(method, MethodSpec):
        if params:
            raise ConfigError("fit: method is a MethodSpec, which holds its parameters "
                              "already: drop method_params")
        return method
    if not isinstance(method, str):
        raise ConfigError(f"fit: method must be a method's name (e.g. 'ewc') or a MethodSpec, "
                          f"not {type(method).__name__}; parameters go in method_params")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"fit: method_params must be a dict, not {type(params).__name__}")
    return parse_method(method, dict(params or {}), "fit(method)")


def _checked_metrics(metrics: Sequence[Callable]) -> list[Callable]:
    """The metric functions, each with a usable, unique row name (its __name__)."""
    if callable(metrics):
        metrics = [metrics]
    checked, names = [], set()
    for metric in metrics:
        metric_name = getattr(metric, "__name__", None)
        if not callable(metric) or not isinstance(metric_name, str):
            raise ConfigError(f"fit: metrics must be named functions (logits, targets) -> "
                              f"float; got {type(metric).__name__} (a def, or set __name__)")
        if not metric_name.isidentifier():
            raise ConfigError(f"fit: metric {metric_name!r} needs a name for its rows: define "
                              "it with def, or set its __name__")
        if metric_name in OWN_METRICS or metric_name in names:
            taken = "every run writes" if metric_name in OWN_METRICS else "another metric has"
            raise ConfigError(f"fit: metric name {metric_name!r} is one {taken}; rename it")
        names.add(metric_name)
        checked.append(metric)
    return checked


def _describe(value: Callable | None) -> Any:
    """How a user callable enters the run id: its module and qualified name (a function, a
    lambda, a class), a partial's function and arguments, else its repr (an object such as
    nn.CrossEntropyLoss(label_smoothing=0.1) shows its settings there)."""
    if value is None:
        return None
    if isinstance(value, functools.partial):
        return {"partial": _describe(value.func), "args": repr(value.args),
                "keywords": repr(sorted(value.keywords.items()))}
    if isinstance(value, nn.Module) or not hasattr(value, "__qualname__"):
        return repr(value)
    return f"{getattr(value, '__module__', '')}.{value.__qualname__}"


def _tensor_bytes(tensor: torch.Tensor) -> Iterator[Any]:
    """A tensor's dtype and shape, then its bytes (any dtype: viewed as uint8)."""
    yield f"{tensor.dtype}{tuple(tensor.shape)}".encode()
    yield tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()


def _describe_stream(stream: Stream) -> dict[str, Any]:
    """The stream's layout and a digest of all its tensors (every task's splits)."""
    def parts() -> Iterator[Any]:
        for task in stream.tasks:
            for split in (task.train, task.val, task.test):
                if split is None:
                    yield b"none"
                    continue
                for tensor in split:
                    if isinstance(tensor, LazyInputs):  # streamed: described, not read
                        yield tensor.identity()
                    else:
                        yield from _tensor_bytes(tensor)

    return {"scenario": stream.scenario, "n_heads": stream.n_heads, "head_dim": stream.head_dim,
            "input_shape": list(stream.input_shape),
            "tasks": [[task.name, [int(c) for c in task.classes]] for task in stream.tasks],
            "tensors": content_digest(parts())}


def _weights_digest(model: nn.Module) -> str:
    """A digest of the model's initial state_dict, names included."""
    def parts() -> Iterator[Any]:
        for key, tensor in model.state_dict().items():
            yield key.encode()
            yield from _tensor_bytes(tensor)

    return content_digest(parts())


def _engram_net(model: nn.Module, stream: Stream) -> ContinualNet:
    """An engram ContinualNet as is (its heads must fit the stream), anything else adapted."""
    if not isinstance(model, ContinualNet):
        return adapt(model, n_heads=stream.n_heads, head_dim=stream.head_dim)
    if (model.n_heads, model.head_dim) != (stream.n_heads, stream.head_dim):
        raise ConfigError(f"fit: the model has {model.n_heads} head(s) of {model.head_dim} "
                          f"outputs; this {stream.scenario}-incremental stream needs "
                          f"{stream.n_heads} of {stream.head_dim}")
    return model


def _on_device(stream: Stream, device: torch.device) -> Stream:
    """The stream with every split on `device` (the same tensors when already there)."""
    def moved(split: TensorSet | None) -> TensorSet | None:
        return None if split is None else split.to(device)

    tasks = [dataclasses.replace(task, train=moved(task.train), val=moved(task.val),
                                 test=moved(task.test)) for task in stream.tasks]
    return dataclasses.replace(stream, tasks=tasks)


def _result(report: Report, fit_run_id: str, model: nn.Module | None) -> FitResult:
    """The FitResult of the run `fit_run_id` in the report's folder."""
    records = [row for row in read_rows(report.results) if row["run_id"] == fit_run_id]
    matrix = accuracy_matrices(records, default_split(records))[0].R
    rows: Any = records
    if importlib.util.find_spec("pandas") is not None:  # else the rows as text
        from engram.frames import load_results

        frame = load_results(report.folder)
        rows = frame[frame["run_id"] == fit_run_id].reset_index(drop=True)
    return FitResult(matrix, rows, report.folder, fit_run_id, model, report)
