"""Experiment trackers: every experiment's rows, live, in TensorBoard and MLflow.

`--log tensorboard` and `--log mlflow` (either or both) on any experiment command hand
:func:`make_trackers` to the harness (engram.experiments.harness.run_plan, its `Tracker`
protocol). They run in the process that writes results.csv and see exactly its rows, as
they are written: a job skipped on a rerun (finished earlier) logs nothing again, a resumed
one logs only the rows it adds.

What is logged, per job (one run, one seed):

- scalars, from the rows (:func:`scalar_rule`): continual runs and sweeps
  `SPLIT/METRIC/taskJ` (accuracy and loss on each evaluated task) and `train/train_loss`
  (per epoch), `train/train_seconds`, `train/extra_bytes`, at the optimizer step; profile
  `val_loss|val_accuracy/epochE/DIRECTION/SCOPE/AGGREGATION-REDUCER/MEASURE` at the percent
  of groups replaced (the threshold x 100); plasticity and window every metric at its step;
- when a continual job finishes: its accuracy matrix as an image, its final metrics
  (`final/average_accuracy`, `final/average_forgetting`, `final/backward_transfer`,
  `final/forward_transfer`) and its hyper-parameters (label, seed, method and parameters,
  grid point) for TensorBoard's HParams tab;
- a failed job: its error (TensorBoard text `error`; MLflow tag `error`, status FAILED).

TensorBoard: one event directory per job, OUT/tensorboard/LABEL-seedS-RUNID/ (a resumed
job adds an event file there; TensorBoard merges them). MLflow: one experiment per output
folder (named after it), one run per job (named LABEL-seedS, tags run_id, command, label,
seed; params: the method's parameters, seed, grid point; metric names with . for /:
`test.accuracy.task1`), continued when a job resumes,
and one `COMMAND summary` run per invocation that ran something, holding the folder's
files: config.yaml or sweep.yaml, results.csv, failures.jsonl, and the plots once the CLI
has drawn them (:meth:`MlflowTracker.log_artifacts`). The store is MLFLOW_TRACKING_URI
when set, else the local file store OUT/mlruns. MLflow 3 keeps its file store in
maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE=true, which engram sets
for its own process when it uses a file store (the sqlite store MLflow suggests needs
sqlalchemy and alembic, which mlflow-skinny lacks); `mlflow ui` needs the same variable
to read it.

Neither tensorboard nor mlflow is imported unless asked for; a missing package is a
one-line error naming the pip extra. A tracker whose backend fails in mid-run (a tracking
server gone) says so in one line on stderr and stops logging; the experiment goes on.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from engram.config import params_dict
from engram.errors import ConfigError, EngramError

if TYPE_CHECKING:
    from engram.experiments.harness import Job, Plan, Report
    from engram.results import RunMatrix

TRACKERS = ("tensorboard", "mlflow")
FINAL_PREFIX = "final/"  # the tag prefix of a continual job's final metrics

Scalar = tuple[str, float, int]  # (tag, value, step)


def make_trackers(names: Iterable[str]) -> list[Any]:
    """The trackers named (each once, in TRACKERS order); a missing package is a ConfigError
    naming the pip extra, raised here, before anything runs."""
    wanted = set(names)
    unknown = wanted - set(TRACKERS)
    if unknown:
        raise ConfigError(f"--log: unknown tracker {sorted(unknown)[0]!r}; choose from "
                          f"{', '.join(TRACKERS)}")
    kinds = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker}
    return [kinds[name]() for name in TRACKERS if name in wanted]


def _missing(package: str, extra: str) -> ConfigError:
    return ConfigError(f"--log {extra} needs the {package} package: "
                       f"pip install -e \".[{extra}]\"")


# ----------------------------------------------------------------------------- rows to scalars

def _whole(value: Any) -> int | None:
    """A step column's value as an int; None for an empty cell (a run_complete row)."""
    return None if value in ("", None) else int(value)


def continual_scalars(row: dict[str, Any]) -> list[Scalar]:
    """A continual row (engram.results.COLUMNS) as a scalar: `SPLIT/METRIC/taskJ` for an
    evaluation, `train/METRIC` for training rows, at the optimizer step."""
    if row["metric"] == "run_complete":
        return []
    step = _whole(row["step"])
    step = _whole(row["task_trained"]) if step is None else step
    task = row["task_eval"]
    tag = f"{row['split'] or 'train'}/{row['metric']}"
    return [(f"{tag}/task{task}" if task not in ("", None) else tag, float(row["value"]), step)]


def profile_scalars(row: dict[str, Any]) -> list[Scalar]:
    """A profile row (one point of one curve) as validation loss and accuracy, one curve per
    epoch, direction, scope, aggregation, reducer and measure; step: percent replaced."""
    curve = (f"epoch{row['epoch']}/{row['direction']}/{row['scope']}/"
             f"{row['aggregation']}-{row['reducer']}/{row['measure']}")
    step = round(float(row["threshold"]) * 100)
    return [(f"{metric}/{curve}", float(row[metric]), step)
            for metric in ("val_loss", "val_accuracy") if row.get(metric) not in ("", None)]


def metric_scalars(row: dict[str, Any]) -> list[Scalar]:
    """A tidy (metric, value) row with a step column (plasticity, window) as `METRIC` at
    its step (or its task, when the step is empty)."""
    step = _whole(row.get("step"))
    step = _whole(row.get("task")) if step is None else step
    if row["metric"] == "run_complete" or step is None:
        return []
    return [(row["metric"], float(row["value"]), step)]


def scalar_rule(columns: list[str]) -> Callable[[dict[str, Any]], list[Scalar]]:
    """How a table's rows become scalars, from its columns: a continual table (task_eval,
    split), the profile's (threshold), a tidy metric/value one with a step (plasticity,
    window); nothing for another table."""
    if {"task_eval", "split", "metric", "value"} <= set(columns):
        return continual_scalars
    if {"threshold", "val_loss"} <= set(columns):
        return profile_scalars
    if {"metric", "value"} <= set(columns) and ({"step", "task"} & set(columns)):
        return metric_scalars
    return lambda row: []


def _plain(value: Any) -> str | int | float | bool:
    """A hyper-parameter value as a scalar TensorBoard and MLflow take (others as JSON)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def job_params(job: "Job") -> dict[str, str | int | float | bool]:
    """What identifies a job to a reader: label, seed, the method and its parameters
    (`method.NAME`, when the job runs one), the grid point's values (a sweep's axes)."""
    params: dict[str, Any] = {"label": job.label, "seed": job.seed}
    method = getattr(job.payload, "method", None)
    if method is not None and hasattr(method, "params"):
        params["method"] = method.name
        params.update({f"method.{k}": _plain(v) for k, v in params_dict(method.params).items()})
    params.update({k: _plain(v) for k, v in job.point.items()})
    return params


def job_name(job: "Job") -> str:
    """A readable, path-safe name of a job: `ewc(strength=100)-seed0-RUNID`."""
    name = f"{job.label}-seed{job.seed}-{job.run_id}"
    return re.sub(r'[\\/:*?"<>|\s]+', "_", name)


def final_matrix(rows: list[dict[str, Any]], folder: Path, run_id: str
                 ) -> tuple["RunMatrix | None", str]:
    """The accuracy matrix of a finished continual job (and the split it is on), from the
    accuracy rows it wrote in this call; a resumed job's earlier rows are read back from
    OUT/results.csv (only then: a matrix with holes)."""
    import numpy as np

    from engram.results import accuracy_matrices, default_split
    from engram.results import read_rows

    def matrix(kept: list[dict[str, Any]]) -> "RunMatrix | None":
        found = accuracy_matrices(kept, split) if kept else []
        return found[0] if found else None

    split = default_split(rows) if rows else "test"
    found = matrix(rows)
    if found is None or np.isnan(found.R[np.tril_indices(len(found.R))]).any() \
            or np.isnan(found.baseline).any():
        table = [r for r in read_rows(folder / "results.csv") if r["run_id"] == run_id]
        split = default_split(table) if table else split
        found = matrix([r for r in table
                        if r["metric"] in ("accuracy", "run_complete")]) or found
    return found, split


def final_metrics(found: "RunMatrix") -> dict[str, float]:
    """The summary metrics of one finished run (engram.reports.tables.SUMMARY_METRICS), the
    finite ones, as `final/NAME`."""
    from engram.reports.tables import SUMMARY_METRICS

    metrics = {}
    for name, compute in SUMMARY_METRICS.items():
        try:
            value = float(compute(found))
        except ValueError:  # a hole in the matrix: no such number
            continue
        if math.isfinite(value):
            metrics[FINAL_PREFIX + name] = value
    return metrics


def matrix_figure(found: "RunMatrix", job: "Job", split: str) -> Any:
    """The accuracy-matrix figure of one run (engram.reports.figures.accuracy_matrix_figure)."""
    from engram.reports.figures import accuracy_matrix_figure

    return accuracy_matrix_figure(found.R, f"{job.label} seed {job.seed}: {split} accuracy")


# ----------------------------------------------------------------------------- shared bookkeeping

@dataclass
class _JobLog:
    """What a tracker keeps of one running job."""
    handle: Any                                  # the backend's: a writer, an MLflow run id
    last_step: int = 0
    kept: list[dict[str, Any]] = field(default_factory=list)  # accuracy rows (continual)


def _stop_on_backend_error(method: Callable) -> Callable:
    """A tracker whose backend fails in mid-run (a disk, a tracking server) says so in one
    line and stops logging: the experiment, hours of it perhaps, goes on."""
    @functools.wraps(method)
    def guarded(self: "_Tracker", *args: Any, **kwargs: Any) -> Any:
        if self.stopped:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - logging must not stop the experiment
            self.stopped = True
            print(f"engram: --log {self.name}: logging stopped: {type(error).__name__}: "
                  f"{str(error).splitlines()[0] if str(error) else ''}", file=sys.stderr)
            return None
    return guarded


class _Tracker:
    """The harness's Tracker protocol (engram.experiments.harness.Tracker) for a backend:
    per-job handles, scalars from rows, a continual job's matrix and final metrics."""
    name = ""

    def __init__(self) -> None:
        self.stopped = False
        self.jobs: dict[tuple[str, ...], _JobLog] = {}
        self.scalars: Callable[[dict[str, Any]], list[Scalar]] = lambda row: []
        self.continual = False
        self.folder = Path(".")
        self.command = ""

    def start(self, plan: "Plan", folder: Path) -> None:
        self.scalars = scalar_rule(plan.columns)
        self.continual = self.scalars is continual_scalars
        self.folder, self.command = Path(folder), plan.command
        self.config_name = plan.config_name
        self.open(plan)

    @_stop_on_backend_error
    def rows(self, job: "Job", rows: list[dict[str, Any]]) -> None:
        if not rows:  # a resumed job's re-measured rows, all in the table already
            return
        log = self._log(job)
        points = [point for row in rows for point in self.scalars(row)]
        if points:
            log.last_step = max(log.last_step, max(step for _, _, step in points))
            self.write(log, points)
        if self.continual:
            log.kept += [row for row in rows if row["metric"] in ("accuracy", "run_complete")]

    @_stop_on_backend_error
    def finished(self, job: "Job", error: str | None) -> None:
        log = self._log(job)
        found, split = None, ""
        if error is None and self.continual:
            found, split = final_matrix(log.kept, self.folder, job.run_id)
        self.end(job, log, error, found, split)
        del self.jobs[job.prefix()]

    def close(self, report: "Report") -> None:
        self.summarise(report)
        self.shutdown()

    def log_artifacts(self, folder: Path) -> None:
        """Called by the CLI once the folder's plots are drawn (after run_plan)."""

    def shutdown(self) -> None:
        """Close whatever is still open (also after an interruption); idempotent."""

    def _log(self, job: "Job") -> _JobLog:
        if (log := self.jobs.get(job.prefix())) is None:
            log = self.jobs[job.prefix()] = _JobLog(self.begin(job))
        return log

    # what a backend implements
    def open(self, plan: "Plan") -> None: ...

    def begin(self, job: "Job") -> Any: ...

    def write(self, log: _JobLog, points: list[Scalar]) -> None: ...

    def end(self, job: "Job", log: _JobLog, error: str | None, found: "RunMatrix | None",
            split: str) -> None: ...

    def summarise(self, report: "Report") -> None: ...


# ----------------------------------------------------------------------------- TensorBoard

class TensorBoardTracker(_Tracker):
    """TensorBoard event files under `log_dir` (default OUT/tensorboard), one directory
    per job. Scalars are queued by torch's SummaryWriter (up to 1000, flushed every 30 s
    and when the job ends), written by its own thread."""
    name = "tensorboard"

    def __init__(self, log_dir: str | Path | None = None) -> None:
        super().__init__()
        try:
            import tensorboard  # noqa: F401 - torch.utils.tensorboard needs it
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        self.writer_class = SummaryWriter
        self.log_dir = None if log_dir is None else Path(log_dir)

    def open(self, plan: "Plan") -> None:
        self.root = self.log_dir or self.folder / "tensorboard"

    def begin(self, job: "Job") -> Any:
        return self.writer_class(log_dir=str(self.root / job_name(job)), max_queue=1000,
                                 flush_secs=30)

    def write(self, log: _JobLog, points: list[Scalar]) -> None:
        for tag, value, step in points:
            log.handle.add_scalar(tag, value, step)

    def end(self, job: "Job", log: _JobLog, error: str | None, found: "RunMatrix | None",
            split: str) -> None:
        writer = log.handle
        try:
            if error is not None:
                writer.add_text("error", f"```\n{error}\n```", log.last_step)
            if found is not None:
                from torch.utils.tensorboard.summary import hparams

                from engram.reports.figures import figure_pixels

                writer.add_image(f"accuracy_matrix/{split}",
                                 figure_pixels(matrix_figure(found, job, split)),
                                 log.last_step, dataformats="HWC")
                metrics = final_metrics(found)
                for summary in hparams(job_params(job), metrics):  # the HParams tab's record
                    writer.file_writer.add_summary(summary, log.last_step)
                for tag, value in metrics.items():
                    writer.add_scalar(tag, value, log.last_step)
        finally:
            writer.close()

    def shutdown(self) -> None:
        for log in self.jobs.values():
            log.handle.close()
        self.jobs.clear()


# ----------------------------------------------------------------------------- MLflow

def metric_key(tag: str) -> str:
    """A tag as an MLflow metric name: `test/accuracy/task1` -> `test.accuracy.task1`. Flat:
    the file store keeps a metric as a file named after it, so `dead_units` and
    `dead_units/layer1` (both plasticity metrics) could not both exist; other characters
    MLflow refuses become _."""
    return re.sub(r"[^\w.\- ]", "_", tag.replace("/", "."))


class MlflowTracker(_Tracker):
    """MLflow runs through MlflowClient (no global active run: jobs finish in any order).
    Metrics are sent in batches (log_batch): each call's rows at once, at most 1000 each."""
    name = "mlflow"
    BATCH = 1000  # MLflow's limit of metrics per log_batch

    def __init__(self, tracking_uri: str | None = None) -> None:
        super().__init__()
        try:
            import mlflow  # noqa: F401 - the package itself: its submodules may be cached
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow", "mlflow") from None
        self.client_class, self.Metric, self.Param = MlflowClient, Metric, Param
        self.tracking_uri = tracking_uri
        self.client: Any = None
        self.summary_run: str | None = None

    def open(self, plan: "Plan") -> None:
        from mlflow.exceptions import MlflowException

        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") \
            or (self.folder / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:  # MLflow 3 refuses it unless allowed
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        name = self.folder.resolve().name
        try:
            self.client = self.client_class(uri)
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                self.experiment = self.client.create_experiment(
                    name, tags={"engram.folder": str(self.folder.resolve()),
                                "engram.command": plan.command})
            else:
                self.experiment = experiment.experiment_id
                if experiment.lifecycle_stage == "deleted":
                    self.client.restore_experiment(self.experiment)
            self.unfinished = self._unfinished_runs()
        except MlflowException as error:
            raise EngramError(f"--log mlflow: tracking store {uri}: "
                              f"{str(error).splitlines()[0]}") from None

    def _unfinished_runs(self) -> dict[str, str]:
        """engram job key -> MLflow run id of the runs a killed or failed call left, read
        once: a resumed job continues its run (one search, not one per job)."""
        found: dict[str, str] = {}
        token = None
        while True:
            page = self.client.search_runs([self.experiment],
                                           "attributes.status != 'FINISHED'",
                                           max_results=1000, page_token=token,
                                           order_by=["attributes.start_time ASC"])
            for run in page:
                if "engram.job" in run.data.tags:
                    found[run.data.tags["engram.job"]] = run.info.run_id
            token = page.token
            if not token:
                return found

    def begin(self, job: "Job") -> Any:
        key = "/".join(job.prefix())
        if (run_id := self.unfinished.pop(key, None)) is not None:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        tags = {"engram.job": key, "run_id": job.run_id, "command": self.command,
                "label": job.label, "seed": str(job.seed)}
        run = self.client.create_run(self.experiment, run_name=f"{job.label}-seed{job.seed}",
                                     tags=tags)
        params = [self.Param(k, str(v)) for k, v in job_params(job).items()]
        for start in range(0, len(params), 100):  # MLflow's limit of params per batch
            self.client.log_batch(run.info.run_id, params=params[start:start + 100])
        return run.info.run_id

    def write(self, log: _JobLog, points: list[Scalar]) -> None:
        now = int(time.time() * 1000)
        metrics = [self.Metric(metric_key(tag), value, now, step) for tag, value, step in points]
        for start in range(0, len(metrics), self.BATCH):
            self.client.log_batch(log.handle, metrics=metrics[start:start + self.BATCH])

    def end(self, job: "Job", log: _JobLog, error: str | None, found: "RunMatrix | None",
            split: str) -> None:
        run_id = log.handle
        if error is not None:
            self.client.set_tag(run_id, "error", error[-4000:])
        if found is not None:
            self.write(log, [(tag, value, log.last_step)
                             for tag, value in final_metrics(found).items()])
            self.client.log_figure(run_id, matrix_figure(found, job, split),
                                   f"accuracy_matrix_{split}.png")
        self.client.set_terminated(run_id, "FINISHED" if error is None else "FAILED")

    def summarise(self, report: "Report") -> None:
        """The invocation's summary run: its counts, and the folder's config, results and
        failures (the plots follow in log_artifacts); none when every job was done before
        this call (a rerun logs nothing again)."""
        if self.stopped or (report.completed == 0 and not report.failures):
            return
        try:
            run = self.client.create_run(self.experiment, run_name=f"{self.command} summary",
                                         tags={"engram.summary": "true",
                                               "command": self.command})
            self.summary_run = run.info.run_id
            now = int(time.time() * 1000)
            counts = {"jobs": report.total, "skipped": report.skipped,
                      "completed": report.completed, "failed": len(report.failures),
                      "rows_written": report.rows_written, "seconds": report.seconds}
            self.client.log_batch(self.summary_run, metrics=[
                self.Metric(k, float(v), now, 0) for k, v in counts.items()])
            for name in (self.config_name, "results.csv", "failures.jsonl"):
                if (self.folder / name).is_file():
                    self.client.log_artifact(self.summary_run, str(self.folder / name))
            self.client.set_terminated(self.summary_run)
        except Exception as error:  # noqa: BLE001 - as _stop_on_backend_error
            self.stopped = True
            print(f"engram: --log mlflow: summary not logged: {type(error).__name__}: "
                  f"{str(error).splitlines()[0] if str(error) else ''}", file=sys.stderr)

    @_stop_on_backend_error
    def log_artifacts(self, folder: Path) -> None:
        """The plots (OUT/plots/) and movies (OUT/*.gif, *.mp4) into the summary run."""
        if self.summary_run is None:
            return
        folder = Path(folder)
        if (folder / "plots").is_dir():
            self.client.log_artifacts(self.summary_run, str(folder / "plots"), "plots")
        for movie in sorted([*folder.glob("*.gif"), *folder.glob("*.mp4")]):
            self.client.log_artifact(self.summary_run, str(movie))

    def shutdown(self) -> None:
        """Runs still open (an interrupted call) end as KILLED: the next call continues them."""
        if self.client is not None:
            for log in self.jobs.values():
                try:
                    self.client.set_terminated(log.handle, "KILLED")
                except Exception:  # noqa: BLE001 - shutting down anyway
                    break
        self.jobs.clear()
