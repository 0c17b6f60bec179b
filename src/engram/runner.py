"""The one training loop, and the code that runs every (method, seed) of a config.

Read `train_task` top to bottom: it is the whole optimisation. Everything else here is
bookkeeping: building data and models, evaluating, writing rows, checkpointing at task
boundaries so that `--resume` continues a killed run exactly where its last finished task
left off (same tensors, same random states: the run's generator and torch's global RNG that
draws dropout masks, so the same numbers).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from engram.config import (MethodSpec, RunConfig, check_device, config_to_dict, params_dict,
                           run_id)
from engram.data.streams import Stream, TensorSet
from engram.errors import ConfigError, DivergenceError, EngramError
from engram.methods.base import Context, Method, ProblemInfo, refuse_unusable
from engram.outdir import OutputFolder
from engram.results import ResultWriter, row_key

EVAL_CHUNK = 4096  # examples per forward pass when evaluating
# Config keys that change how a run is carried out but not its numbers: --resume may differ.
NOT_RESULT_KEYS = ("plots", "threads", "device", "checkpoint_seconds")


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available, else CPU; cpu, cuda, cuda:N and mps must exist here.
    Other torch devices (meta, xpu, ...) are refused by check_device: engram cannot train there."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for CUDA but torch sees no CUDA device; use auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device: {name!r}: torch sees only {torch.cuda.device_count()} CUDA "
                          f"devices (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {name!r}: torch sees no MPS device; use auto or cpu")
    return device


def make_optimizer(model: torch.nn.Module, cfg, foreach: bool | None = None
                   ) -> torch.optim.Optimizer:
    """The optimizer of `cfg` (a TrainConfig) over the model's parameters. foreach=True
    batches the update over all tensors, which on the CPU is faster for many small tensors
    (torch's default there is one tensor at a time)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, foreach=foreach)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            foreach=foreach)


def apply_update(ctx: Context, method: Method, optimizer: torch.optim.Optimizer,
                 loss: torch.Tensor, batch: TensorSet, task_batch: TensorSet) -> None:
    """One optimizer update from the training `loss` of `batch` (what make_batch returned),
    with the method's penalty and hooks in the order every method relies on. `task_batch` is
    what after_step is given: the examples the stream delivers at this step (train_task: the
    mini-batch; the sliding window: the points entering it for the first time, often none).
    Shared by train_task and the sliding-window experiment (engram.window)."""
    ctx.batch = batch  # LwF distils on the batch being trained
    penalty = method.penalty(ctx)  # EWC's quadratic anchor, ...
    total = loss if penalty is None else loss + penalty
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    method.after_backward(ctx)  # gradient projections
    optimizer.step()
    method.correct_update(ctx)  # OGD / A-GEM project the update the optimizer made
    method.after_step(task_batch, ctx)  # buffer updates, path integrals, unit resets
    ctx.step += 1


def train_task(ctx: Context, method: Method, on_epoch: Callable[[int, float], None]) -> None:
    """Train `ctx.model` on `ctx.task` for train.epochs epochs: the loop every method shares.

    `on_epoch(epoch, loss)` gets the epoch's mean over its mini-batches of the loss of each
    mini-batch's own examples (the task's, not the memory examples replay mixes in, nor any
    penalty), computed in the forward pass of the step, before its update: the online error
    of the plasticity runner and `engram run`'s train_loss. The divergence check watches the
    loss actually trained on (replay's mixed batch)."""
    cfg, model = ctx.train_cfg, ctx.model
    model.train()
    method.before_task(ctx)
    # Fresh each task, so no momentum is carried across tasks; made after before_task, which
    # may change which parameters train (progressive nets, PackNet).
    optimizer = make_optimizer(model, cfg)
    data = method.training_data(ctx.task.train, ctx)  # joint training widens this
    n = len(data)
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(n, generator=ctx.generator).to(ctx.device)
        loss_sum = torch.zeros((), device=ctx.device)  # the trained loss, for divergence
        own_loss_sum = torch.zeros((), device=ctx.device)  # the recorded loss (see above)
        correct_sum = torch.zeros((), device=ctx.device)
        for start in range(0, n, cfg.batch_size):
            index = order[start:start + cfg.batch_size]
            task_batch = TensorSet(data.x[index], data.y[index], data.task[index])  # x (B, C, H, W)
            batch = method.make_batch(task_batch, ctx)  # replay appends memory examples here
            outputs = model(batch.x, batch.task)
            loss = ctx.loss_fn(outputs, batch.y)  # cross-entropy unless a problem says else
            # This step's own examples are the first len(index) of the batch (make_batch's
            # contract), measured before the update: the online loss and accuracy.
            own = outputs[:len(index)].detach()
            own_loss_sum += loss.detach() if batch is task_batch else ctx.loss_fn(own, task_batch.y)
            if ctx.count_correct:
                correct_sum += (own.argmax(1) == task_batch.y).sum()
            apply_update(ctx, method, optimizer, loss, batch, task_batch)
            loss_sum += loss.detach()
        n_batches = -(-n // cfg.batch_size)
        mean_loss = float(loss_sum) / n_batches  # one sync per epoch
        ctx.epoch_accuracy = float(correct_sum) / n if ctx.count_correct else None
        if not math.isfinite(mean_loss):
            raise DivergenceError(
                f"training diverged on task {ctx.task.index + 1} ({ctx.task.name}), epoch {epoch}: "
                f"the mean loss is {mean_loss}; lower train.lr (now {cfg.lr}) or the method's strength")
        on_epoch(epoch, float(own_loss_sum) / n_batches)
    method.after_task(ctx)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TensorSet) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on `data`, in eval mode."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0.0, 0.0
    for start in range(0, len(data), EVAL_CHUNK):
        x, y, task = (part[start:start + EVAL_CHUNK] for part in data)
        logits = model(x, task)
        correct += float((logits.argmax(dim=1) == y).sum())
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
    model.train(was_training)
    return correct / len(data), loss_sum / len(data)


@dataclass
class RunIdentity:
    """The columns every row of one run shares."""
    run_id: str
    cfg: RunConfig
    method: MethodSpec
    seed: int

    def row(self, **fields: Any) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "name": self.cfg.name, "seed": self.seed,
            "method": self.method.name, "label": self.method.label(),
            "params": json.dumps(params_dict(self.method.params), sort_keys=True),
            "dataset": self.cfg.data.source, "stream": self.cfg.stream.kind,
            "scenario": self.cfg.stream.scenario, "task_eval": "", "split": "", **fields}


def _evaluation_rows(ident: RunIdentity, ctx: Context, method: Method, task_trained: int,
                     epoch: int) -> list[dict]:
    rows = []
    net = method.eval_model(ctx)  # the live model unless the method picks weights per task
    for task in ctx.stream.tasks:
        for split in ctx.train_cfg.eval_splits:
            data = task.val if split == "val" else task.test
            if data is None or len(data) == 0:
                continue
            accuracy, loss = evaluate(net, data)
            common = dict(task_trained=task_trained, epoch=epoch, step=ctx.step,
                          task_eval=task.index + 1, split=split)
            rows.append(ident.row(metric="accuracy", value=accuracy, **common))
            rows.append(ident.row(metric="loss", value=loss, **common))
    return rows


def task_end_recorded(keys: set, run_id: str, task: int, epochs: int) -> bool:
    """Whether the results hold the rows written at the end of `task` (1-based) of a run:
    its extra_bytes row, the last of that batch, so the batch before it is complete too."""
    marker = {"run_id": run_id, "task_trained": task, "epoch": epochs, "task_eval": "",
              "split": "", "metric": "extra_bytes"}
    return task == 0 or row_key(marker) in keys


def global_random_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's global RNG states: the CPU one and, on CUDA, the run device's. Dropout draws
    its masks from them (the run's own generator, ctx.generator, draws everything else), so
    a checkpoint must carry them for a resumed run to draw the masks an uninterrupted one
    would; torch.manual_seed(seed) at the run's start sets both."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_global_random_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what global_random_state saved (the tensors may have been moved to `device` by
    torch.load's map_location; the setters want CPU byte tensors)."""
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:  # absent: saved by a CPU run
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the old checkpoint or the new one


# What _save_checkpoint writes, and the type of each entry.
CHECKPOINT_ENTRIES = {"model": dict, "method": dict, "generator": torch.Tensor, "step": int,
                      "tasks_done": int}


def _unusable(path: Path, reason: str) -> EngramError:
    return EngramError(f"checkpoint {path} cannot be read ({reason}); delete it to restart "
                       "this run from its first task")


def _load_checkpoint(path: Path, device: torch.device, n_tasks: int) -> dict:
    """A resume checkpoint, checked to hold CHECKPOINT_ENTRIES with tasks_done in
    [0, n_tasks]; EngramError naming the file otherwise (it would fail deep inside run_one)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise _unusable(path, f"not a torch file: {first_line[:120]}") from None
    if not isinstance(state, dict):
        raise _unusable(path, f"it holds a {type(state).__name__}, not an engram checkpoint")
    for key, kind in CHECKPOINT_ENTRIES.items():
        if not isinstance(state.get(key), kind):
            raise _unusable(path, f"entry {key!r} is missing or not a {kind.__name__}")
    if not 0 <= state["tasks_done"] <= n_tasks:
        raise _unusable(path, f"tasks_done is {state['tasks_done']}; this run has {n_tasks} "
                              "tasks")
    return state


def run_one(cfg: RunConfig, spec: MethodSpec, seed: int, stream: Stream, writer: ResultWriter,
            checkpoint_dir: Path, device: torch.device, progress: Any = None) -> str:
    """Train one method with one seed through the whole stream; return its run id."""
    from engram.methods import METHODS
    from engram.models import build_model

    ident = RunIdentity(run_id(cfg, spec, seed), cfg, spec, seed)
    if ident.run_id in writer.completed_runs:
        return ident.run_id
    # before any training: a method that could not act on this stream is refused, not run
    refuse_unusable(spec, ProblemInfo(f"{cfg.data.source} ({cfg.stream.kind} stream)",
                                      stream.head_dim, classification=True))
    torch.manual_seed(seed)  # model init and dropout masks; every other draw uses ctx.generator
    model = build_model(cfg.model, stream.input_shape, stream.n_heads, stream.head_dim).to(device)
    method: Method = METHODS.get(spec.name)(spec.params)
    ctx = Context(model=model, stream=stream, train_cfg=cfg.train,
                  generator=torch.Generator().manual_seed(seed), device=device)
    ctx.model = model = method.prepare_model(model, ctx).to(device)  # e.g. a progressive net
    checkpoint = checkpoint_dir / f"{ident.run_id}.pt"
    tasks_done = 0
    state = None
    if checkpoint.exists():
        state = _load_checkpoint(checkpoint, device, len(stream))
        if "global_rng" not in state or not task_end_recorded(
                writer.keys, ident.run_id, state["tasks_done"], cfg.train.epochs):
            # The checkpoint is ahead of the results (rows lost with a killed sweep parent, or
            # a results file cut short): resuming would leave tasks without rows. Or it is
            # from an engram that did not save the global RNG, so dropout masks would differ.
            # Start over; the rows already there are re-measured identically and skipped.
            checkpoint.unlink()
            state = None
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            method.load_state_dict(state["method"])
            ctx.generator.set_state(state["generator"].cpu())  # map_location moved it
            set_global_random_state(state["global_rng"], device)  # dropout masks
        except (KeyError, ValueError, TypeError, RuntimeError) as err:  # wrong shapes or keys
            raise _unusable(checkpoint, f"it does not fit this run: "
                                        f"{' '.join(str(err).split())[:200]}") from None
        ctx.step, tasks_done = state["step"], state["tasks_done"]
    else:
        writer.write(_evaluation_rows(ident, ctx, method, task_trained=0, epoch=0))  # the untrained baseline

    epochs = cfg.train.epochs
    if progress is not None:
        progress.reset(total=len(stream) * epochs)
        progress.set_description(f"{spec.label()} seed {seed}")
        progress.update(tasks_done * epochs)
    ctx.seen_tasks = list(stream.tasks[:tasks_done])
    last_checkpoint = time.perf_counter()
    for task in stream.tasks[tasks_done:]:
        ctx.task = task
        ctx.seen_tasks.append(task)
        started = time.perf_counter()
        number = task.index + 1

        def on_epoch(epoch: int, mean_loss: float) -> None:
            writer.write([ident.row(task_trained=number, epoch=epoch, step=ctx.step, split="train",
                                    metric="train_loss", value=mean_loss)])
            if cfg.train.eval_every and epoch % cfg.train.eval_every == 0 and epoch < epochs:
                writer.write(_evaluation_rows(ident, ctx, method, number, epoch))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(task=f"{number}/{len(stream)}", loss=f"{mean_loss:.3f}")

        train_task(ctx, method, on_epoch)
        seconds = time.perf_counter() - started
        rows = _evaluation_rows(ident, ctx, method, number, epochs)
        rows.append(ident.row(task_trained=number, epoch=epochs, step=ctx.step, split="train",
                              metric="train_seconds", value=seconds))
        # What the method keeps beyond the live model after this task: the memory bill.
        rows.append(ident.row(task_trained=number, epoch=epochs, step=ctx.step,
                              metric="extra_bytes", value=method.extra_bytes()))
        writer.write(rows)
        # A checkpoint costs milliseconds; on short tasks that is a visible share of the run,
        # so save one only when enough work would otherwise be lost. A run killed without one
        # resumes from its previous checkpoint (or its start): the same numbers, re-measured.
        due = time.perf_counter() - last_checkpoint >= cfg.checkpoint_seconds
        if due and number < len(stream):
            _save_checkpoint(checkpoint, {
                "model": model.state_dict(), "method": method.state_dict(),
                "generator": ctx.generator.get_state(), "global_rng": global_random_state(device),
                "step": ctx.step, "tasks_done": number})
            last_checkpoint = time.perf_counter()
    writer.write([ident.row(task_trained=len(stream), epoch=epochs, step=ctx.step,
                            metric="run_complete", value=1)])
    writer.completed_runs.add(ident.run_id)
    checkpoint.unlink(missing_ok=True)
    return ident.run_id


def prepare_out_dir(cfg: RunConfig, folder: OutputFolder, resume: bool, device: str = "") -> None:
    """Claim the locked run folder for `cfg` (engram.outdir: a folder holding another
    experiment, another command's results or another engram version's is refused; more
    seeds may be added) and write its config.yaml. Results there need --resume."""
    import yaml

    if folder.holds_results() and not resume:
        raise EngramError(f"{folder.path} already holds results; pass --resume to finish that "
                          "run, or choose another --out")
    wanted = config_to_dict(cfg)
    folder.claim({k: v for k, v in wanted.items() if k not in NOT_RESULT_KEYS}, ("seeds",),
                 device)
    (folder.path / "config.yaml").write_text(yaml.safe_dump(wanted, sort_keys=False))


def run_experiment(cfg: RunConfig, out: str | Path, *, resume: bool = False,
                   show_progress: bool = True) -> Path:
    """Run every method x seed of `cfg` into `out/results.csv`; return the CSV path. The
    folder is locked for the whole call: a second writer is refused (engram.outdir)."""
    device = resolve_device(cfg.device)  # a bad device stops before the folder is made
    with OutputFolder(out, "run") as folder:
        return _run_experiment_in(cfg, folder, device, resume, show_progress)


def _run_experiment_in(cfg: RunConfig, folder: OutputFolder, device: torch.device,
                       resume: bool, show_progress: bool) -> Path:
    from engram.data import DATASETS, build_stream

    out = folder.path
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    prepare_out_dir(cfg, folder, resume, str(device))
    source = DATASETS.get(cfg.data.source)(cfg.data.path)
    checkpoint_dir = out / "checkpoints"
    if not resume and checkpoint_dir.exists():
        # Left by a run whose results are gone: continuing from them would skip tasks.
        for stale in checkpoint_dir.glob("*.pt"):
            stale.unlink()
    checkpoint_dir.mkdir(exist_ok=True)
    progress = None
    if show_progress:
        from tqdm.auto import tqdm
        # disable=None: no bar when stderr is not a terminal (CI logs, pipes)
        progress = tqdm(total=0, unit="epoch", dynamic_ncols=True, leave=False, disable=None)
    try:
        with ResultWriter(out / "results.csv") as writer:
            for seed in cfg.seeds:
                stream = build_stream(source, cfg.data, cfg.stream, seed, device)
                for spec in cfg.methods:
                    run_one(cfg, spec, seed, stream, writer, checkpoint_dir, device, progress)
    finally:
        if progress is not None:
            progress.close()
    if not any(checkpoint_dir.iterdir()):
        checkpoint_dir.rmdir()
    return out / "results.csv"
