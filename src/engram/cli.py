"""The `engram` command. Heavy imports (torch, matplotlib) happen inside the subcommands,
so `engram --help` answers at once and start-up costs only what a command needs."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"

MAIN_HELP = """\
engram: make catastrophic forgetting happen, measure it, and compare the methods that fight it.

Start here:
  engram demo                      split digits, 5 class-incremental tasks, naive vs EWC vs
                                   replay vs joint, 3 seeds; table + plots in runs/demo/
  engram list                      every dataset, stream, model and method engram knows
  engram run configs/X.yaml        run an experiment from a YAML config (see `engram run -h`)
  engram sweep configs/X.yaml      run a grid: any key may list alternatives; resumable,
                                   parallel (--workers N); see `engram sweep -h`
  engram table runs/X              methods x scenarios table (+ PNG) of a run or sweep folder
  engram plot runs/demo            redraw the plots of a run folder from its results.csv
  engram export runs/demo --parquet
                                   typed runs/demo/results.parquet for pandas (or
                                   engram.load_results("runs/demo") in Python)
  engram profile configs/profile/digits.yaml
                                   which importance measure knows which weights matter:
                                   replace the least important weights, watch the loss
  engram profile-report runs/profile_digits
                                   ranking table with intervals and paired tests, plots
  engram plasticity configs/plasticity/bit_flipping.yaml
                                   loss of plasticity on a long changing stream: online
                                   error, dead units, effective rank, weight norm
  engram window --out runs/window  watch forgetting: a network memorising a sliding window
                                   of 500 random points, as a movie and a summary figure
"""

WINDOW_DESCRIPTION = """The sliding-window memorisation experiment. A residual atan network (5 blocks of width 40,
every weight zero at the start) is trained with Adam on a window of 50 of 500 random points
(x, y ~ N(0, 1), widths 40 and 20); when the window's mean loss ||N(x) - y||² falls below 1
the window moves on by one point, wrapping around. Each point's loss drops while it is in
the window and climbs back once it has left; the weights keep growing and relearning slows.

Writes OUT/results.csv (tidy rows run_id, variant, seed, step, metric, value: relearn_steps
per window shift, weight_norm and window_mean_loss every record_every steps),
OUT/runs/VARIANT-seedS-RUNID.npz (every point's loss every record_every steps, window
position, weight norm, shift steps), OUT/plots/summary_VARIANT.png (heatmap, weight norm,
relearn steps), OUT/plots/relearn_comparison.png and the movie OUT/VARIANT.gif. Without a
config: one variant `plain`, seed 0 (under a minute); configs/window/compare.yaml compares
plain, L2, dropout, continual backprop and replay. Finished runs are skipped on a rerun.
"""

WINDOW_EPILOG = """examples:
  engram window --out runs/window                           # the default run and movie
  engram window run.max_steps=10000 run.window=20 --out runs/short
  engram window configs/window/compare.yaml --workers 2     # plain vs L2, dropout, CBP, replay
  engram window configs/window/compare.yaml animation=mp4   # MP4 (needs ffmpeg)
`engram window --help-config` lists every key with its default; a variant is
{name: NAME, method: {name: METHOD, ...}, KEY: VALUE} with run keys such as weight_decay,
dropout, optimizer, activation, init, window, shift, threshold.
"""

PROFILE_DESCRIPTION = """Train a network on one task (digits, all 10 classes, by default) and at the chosen epochs
score every weight with each importance measure; group the scores per weight, unit (a unit's
fan-in weights and bias), conv filter or layer; for each threshold t from 0 to 1 replace the
lowest-scored fraction t of the groups (or the highest, direction most_first) with small random
values and record validation loss and accuracy. The trained network is never changed.
Rows go to OUT/results.csv as they are measured; rerun the same command to resume, or to
extend the grid (more seeds, measures, thresholds) measuring only what is new.
"""

PROFILE_EPILOG = """examples:
  engram profile configs/profile/digits.yaml                       # the default grid
  engram profile configs/profile/digits.yaml seeds=[0,1,2,3,4] profile.epochs=[2,10]
  engram profile configs/profile/digits.yaml task.classes_per_task=2 task.n_tasks=5 task.task=1
  engram profile-report runs/profile_digits --markdown
`engram profile --help-config` lists every key; `engram list` the measures.
"""

RUN_EPILOG = """\
examples:
  engram run configs/demo.yaml --out runs/split
  engram run configs/demo.yaml train.epochs=5 seeds=[0,1,2] stream.scenario=task
  engram run configs/demo.yaml --out runs/split            # again: finishes a killed run
  engram run configs/demo.yaml seeds=[0,1,2,3] --workers 2  # runs in 2 processes

Overrides are dotted keys with YAML values; list entries by index (methods.1.strength=10).
Results: OUT/results.csv (one tidy row per measured number, appended as measured),
OUT/config.yaml (the resolved config), OUT/plots/*.png. A killed run keeps every row it
wrote; the same command again continues from the last finished task of each run with no
duplicates (a folder holding another experiment is refused). A failing run (diverged, bad
data) is listed with its seed and error, in OUT/failures.jsonl too, and the other runs go
on; the exit status is then 1.
`engram run --help-config` lists every config key with its default; `engram list
--params` lists each method's parameters.
"""


SWEEP_DESCRIPTION = """\
Run every point of a grid. SWEEP.yaml is an ordinary config (`engram run --help-config`)
in which any key may list alternatives; the grid is their Cartesian product, and each
point runs every method with every seed:

  stream: {scenario: [task, domain, class]}            3 alternatives
  train: {lr: [0.01, 0.1]}                             x 2
  model: {hidden: [[64], [256, 256]]}                  list-valued key: a list of lists
  methods: [naive, {name: ewc, strength: [10, 100]}]   method parameters too
  seeds: [0, 1, 2, 3, 4]

Each run is keyed by the hash of its canonical config: run the same command again to
resume an interrupted sweep; add seeds or alternatives and only the new runs run.
A failing run (diverged, bad data) is reported with its point and error, in
OUT/failures.jsonl too, and the other runs go on; the exit status is then 1.
"""

SWEEP_EPILOG = """\
examples:
  engram sweep configs/three_scenarios_digits.yaml --workers 2
  engram sweep my_grid.yaml --out runs/grid --dry-run      # what would run
  engram sweep configs/three_scenarios_digits.yaml seeds=[0] train.epochs=2 --out runs/quick
  engram table runs/three_scenarios_digits                  # the table of the results
  engram sweep my_grid.yaml --backend ray --workers 8 --log tensorboard   # on Ray, logged
"""


def at_least_one(text: str) -> int:
    """argparse type of --seeds and --workers: a whole number >= 1 (0 would run nothing, or
    in `demo` silently the default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_imports(parser: argparse.ArgumentParser) -> None:
    """--import MODULE (repeatable): the plugin modules of every command that reads a config
    or lists the registries; `main` loads them (engram.plugins) before the command runs."""
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE",
                        help="import this plugin module first (repeatable): a dotted module "
                             "name on the Python path, or a .py file; its registrations "
                             "(MODELS.add, METHODS.add, ...) can then be named in configs, "
                             "and every worker imports it too")


def _add_workers(parser: argparse.ArgumentParser) -> None:
    """--workers, --backend, --address, --log, -q and --import: every experiment command
    runs its jobs on the one harness (engram.experiments.harness); `_run_options` reads them
    back."""
    _add_imports(parser)
    parser.add_argument("--workers", type=at_least_one, default=1, metavar="N",
                        help="jobs at once (default: 1): parallel local processes, or Ray "
                             "tasks in flight; each uses the config's `threads` torch "
                             "threads, so N x threads should not exceed your cores; only "
                             "this process writes the results")
    parser.add_argument("--backend", choices=["local", "ray"], default="local",
                        help="where jobs run: local processes (default) or Ray tasks (a "
                             "local Ray instance, or the cluster at --address; needs "
                             "pip install -e \".[ray]\")")
    parser.add_argument("--address", default=None, metavar="HOST:PORT",
                        help="join this running Ray cluster (with --backend ray), e.g. "
                             "auto or ray://head:10001; default: start a local Ray instance")
    parser.add_argument("--log", action="append", choices=["tensorboard", "mlflow"],
                        default=[], metavar="{tensorboard,mlflow}",
                        help="also log every run's metrics as they are measured (repeat for "
                             "both): tensorboard writes OUT/tensorboard/ (needs pip install "
                             "-e \".[tensorboard]\"); mlflow logs to MLFLOW_TRACKING_URI, or "
                             "else OUT/mlruns (needs pip install -e \".[mlflow]\")")
    _add_quiet(parser)


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The harness's keyword arguments from an experiment command's flags (`_add_workers`);
    failures are listed by the CLI (`_report_failures`), not raised. The trackers of --log
    (engram.reports.tracking, imported only then) are made here: a missing package stops
    the command before anything runs."""
    trackers = []
    if args.log:
        from engram.reports.tracking import make_trackers
        trackers = make_trackers(args.log)
    return {"workers": args.workers, "show_progress": not args.quiet, "raise_failures": False,
            "backend": args.backend, "address": args.address, "trackers": trackers,
            "imports": args.plugins}


@contextlib.contextmanager
def _tracked(args: argparse.Namespace, out: Path) -> Iterator[dict[str, Any]]:
    """`_run_options(args)` for the body, which runs the experiment and draws its plots;
    then each --log tracker logs the folder's files (plots included), and is shut also when
    the body fails or is interrupted (an open run is marked killed, queued events written).
    Entered before the folder's lock (`_holding`): a missing package stops the command
    before the folder is made; the files are logged (read) just after the lock is let go."""
    options = _run_options(args)
    try:
        yield options
        for tracker in options["trackers"]:
            tracker.log_artifacts(out)
    finally:
        for tracker in options["trackers"]:
            tracker.shutdown()


def _add_folders(parser: argparse.ArgumentParser, more: str,
                 first: str = "a folder holding results.csv") -> None:
    """RUN_DIR [MORE_DIR ...]: the folders `table`, `summary`, `plot` and `export` read."""
    parser.add_argument("run_dir", help=first)
    parser.add_argument("more_dirs", nargs="*", metavar="MORE_DIR", help=more)


def _add_experiment_args(parser: argparse.ArgumentParser, kind: str, config_help: str,
                         override_example: str) -> None:
    """CONFIG, KEY=VALUE overrides, --out and --help-config: the arguments every experiment
    command with its own config schema (profile, plasticity, window) takes."""
    parser.add_argument("config", nargs="?", help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"dotted overrides, e.g. {override_example}")
    parser.add_argument("--out", help="folder (default: runs/<the config's name>)")
    parser.add_argument("--help-config", action="store_true",
                        help=f"list every {kind} config key with its default, then exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram", description=MAIN_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"engram {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="watch catastrophic forgetting on handwritten digits (about a minute)",
        description="Split digits into 5 class-incremental tasks (0/1, 2/3, ...), train naive "
                    "fine-tuning, EWC, replay and joint training with 3 seeds each, print the "
                    "comparison and write results.csv and plots. Runs offline on the CPU. "
                    "Run it again to see the finished table without retraining.")
    demo.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    demo.add_argument("--seeds", type=at_least_one, default=None, metavar="N",
                      help="number of seeds (default: 3)")
    _add_workers(demo)

    run = commands.add_parser(
        "run", help="run an experiment from a YAML config",
        description="Run every method x seed of a YAML config; print a summary table; write "
                    "results.csv and plots into --out.",
        epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("config", nargs="?", help="YAML config file (see configs/)")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="dotted config overrides, e.g. train.epochs=5")
    run.add_argument("--out", help="run folder (default: runs/<config file name>)")
    run.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)  # the default now
    run.add_argument("--help-config", action="store_true",
                     help="list every config key with its default and meaning, then exit")
    run.add_argument("--smoke", action="store_true",
                     help="apply the config's smoke: overrides first, a quick CPU-sized run of "
                          "the same pipeline (default --out runs/<config name>-smoke)")
    run.add_argument("--batch-seeds", action="store_true",
                     help="train the seeds of each method together as one stacked network "
                          "(the config's batch_seeds: true; same rows and run ids)")
    _add_workers(run)

    sweep = commands.add_parser(
        "sweep", help="run a grid of configs (any key may list alternatives), resumable and parallel",
        description=SWEEP_DESCRIPTION, epilog=SWEEP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("sweep_file", metavar="SWEEP.yaml", help="a config whose keys may hold lists")
    sweep.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted overrides, e.g. seeds=[0,1] or train.lr=[0.01,0.1]")
    sweep.add_argument("--out", help="sweep folder (default: runs/<sweep file name>)")
    sweep.add_argument("--dry-run", action="store_true",
                       help="list the grid's runs and which are already done; run nothing")
    _add_workers(sweep)

    profile = commands.add_parser(
        "profile", help="rank weight-importance measures by replacing the weights they call "
                        "unimportant", description=PROFILE_DESCRIPTION, epilog=PROFILE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_experiment_args(profile, "profile", "profile YAML (see configs/profile/digits.yaml)",
                         "seeds=[0,1,2] profile.epochs=[2,5]")
    _add_workers(profile)

    profile_report = commands.add_parser(
        "profile-report", help="ranking table and plots of a profile folder",
        description="Read DIR/results.csv of `engram profile`; per (epoch, aggregation, reducer, "
                    "scope): the area under each measure's validation-loss curve and the largest "
                    "threshold before the loss rises by --margin, mean and t-interval over seeds, "
                    "paired t-tests against the random measure (Holm-corrected); plots of loss "
                    "against threshold with bands and the chance level ln(classes) in DIR/plots/.")
    profile_report.add_argument("run_dir", help="a folder written by engram profile")
    profile_report.add_argument("--margin", type=float, default=0.1,
                                help="loss rise that ends the 'safe' thresholds (default 0.1)")
    profile_report.add_argument("--direction", choices=["least_first", "most_first"],
                                default="least_first", help="which curves to rank")
    profile_report.add_argument("--markdown", action="store_true", help="GitHub-markdown tables")
    profile_report.add_argument("--no-png", action="store_true", help="do not write plots")

    plasticity = commands.add_parser(
        "plasticity", help="loss of plasticity: learn a long non-stationary stream online and "
                           "record online error and diagnostics",
        description="Train each method x seed of a plasticity config on a long non-stationary "
                    "problem (bit_flipping: slowly-changing regression; permuted_digits: a new "
                    "pixel permutation per task), one example per step. Rows in OUT/results.csv "
                    "per task: online_loss (and online_accuracy), and at each task's start dead "
                    "and dormant units, effective and stable rank, weight and gradient "
                    "magnitude per layer; OUT/plots/plasticity.png. Finished runs are skipped on "
                    "a rerun.")
    _add_experiment_args(plasticity, "plasticity", "plasticity YAML (configs/plasticity/)",
                         "seeds=[0] problem.n_tasks=20")
    _add_workers(plasticity)

    window = commands.add_parser(
        "window", help="watch forgetting: memorise a sliding window of random points; movie, "
                       "summary figure, relearn steps per shift",
        description=WINDOW_DESCRIPTION, epilog=WINDOW_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_experiment_args(window, "window", "window YAML (configs/window/); default: the "
                         "experiment as first described", "run.max_steps=10000 seeds=[0,1]")
    window.add_argument("--no-animation", action="store_true",
                        help="skip the movie (the figures are still drawn)")
    _add_workers(window)

    ci_help = ("also print the 95%% t-interval of each mean, mean ± t_{0.975,n-1}·SE, in "
               "brackets (with few seeds it is much wider than ± SE)")
    scenario_table = commands.add_parser(
        "table", help="methods x scenarios table of a run or sweep folder, and its PNG",
        description="Read RUN_DIR/results.csv and print, per method (rows) and scenario "
                    "(columns: task-, domain-, class-incremental), the final average accuracy, "
                    "forgetting and backward transfer as mean ± standard error over seeds, the "
                    "wall time of training and the extra memory the method keeps (anchors, "
                    "importances, buffers, stored gradients, stored data). Writes "
                    "RUN_DIR/plots/scenario_table.png. More folders (e.g. a second sweep of "
                    "baselines) join the same table; rows then read 'experiment / method'.")
    _add_folders(scenario_table, "further folders whose runs join the table")
    scenario_table.add_argument("--markdown", action="store_true",
                                help="print GitHub-markdown tables (for a README)")
    scenario_table.add_argument("--split", choices=["test", "val"], default=None,
                                help="which evaluation split to tabulate (default: test when "
                                     "measured, else val); choose strengths on val, report test")
    scenario_table.add_argument("--no-png", action="store_true", help="do not write the PNG")
    scenario_table.add_argument("--ci", action="store_true",
                                help=ci_help + "; the PNG's error bars become the interval")

    plot = commands.add_parser(
        "plot", help="redraw a run folder's plots from its results.csv",
        description="Read RUN_DIR/results.csv and (re)write RUN_DIR/plots/*.png: the accuracy "
                    "matrix of each method, each task's accuracy over training, and the method "
                    "comparison with standard-error bars over seeds. Needs only the CSV. More "
                    "folders join the same plots, as in `engram table` (methods of other "
                    "experiments read 'experiment / method'); the plots still go to "
                    "RUN_DIR/plots/, or to --out.")
    _add_folders(plot, "further folders whose runs join the plots")
    plot.add_argument("--out", metavar="FOLDER",
                      help="write the PNG files into FOLDER (default: RUN_DIR/plots)")

    table = commands.add_parser(
        "summary", help="print the comparison table of a run folder",
        description="Read RUN_DIR/results.csv and print average accuracy, forgetting, backward "
                    "and forward transfer per method: mean ± standard error over seeds. More "
                    "folders join the same table, as in `engram table` (rows of other "
                    "experiments read 'experiment / method').")
    _add_folders(table, "further folders whose runs join the table")
    table.add_argument("--ci", action="store_true", help=ci_help)

    export = commands.add_parser(
        "export", help="write a folder's results as a typed Parquet file (pandas, pyarrow)",
        description="Write RUN_DIR/results.csv as RUN_DIR/results.parquet with its column "
                    "types (integers, floats, strings), for pandas, polars, DuckDB or R; "
                    "`engram.load_results(RUN_DIR)` reads either. Works for every table engram "
                    "writes (run, demo, sweep, profile, plasticity, window). Each further "
                    "folder gets its own results.parquet; with --out, all the folders' rows "
                    "(tables of one kind) go into that one file. Needs the `results` extra: "
                    "pip install -e \".[results]\".")
    _add_folders(export, "further folders to export", "a folder holding results.csv (or a "
                 "results.csv)")
    export.add_argument("--parquet", action="store_true", required=True,
                        help="the format: Apache Parquet (the only one so far)")
    export.add_argument("--out", metavar="PATH",
                        help="one file for all the rows (default: FOLDER/results.parquet each)")

    listing = commands.add_parser(
        "list", help="list registered datasets, streams, models and methods",
        description="Print every registered dataset, stream, model and method, one per line: "
                    "its registry name, a space, and a one-line description.")
    listing.add_argument("--params", action="store_true",
                         help="also list each method's parameters with defaults")
    _add_imports(listing)
    return parser


def _version() -> str:
    from engram.version import __version__
    return __version__


def cmd_list(args: argparse.Namespace) -> None:
    import dataclasses

    from engram.registry import DATASETS, STREAMS
    from engram.registry import MEASURES
    from engram.registry import METHODS
    from engram.registry import MODELS
    from engram.registry import PROBLEMS

    for registry in (DATASETS, STREAMS, MODELS, METHODS, MEASURES, PROBLEMS):
        print(f"{registry.kind}s:")  # a header per registry: `mas` is a method and a measure
        for entry in registry.entries():
            print(f"  {entry.name} {entry.description}")
            if args.params and registry is METHODS:
                for f in dataclasses.fields(entry.obj.Params):
                    default = getattr(entry.obj, "default_methods", None) \
                        if f.default is dataclasses.MISSING else f.default
                    print(f"      {f.name} = {default!r}: {f.metadata.get('doc', '')}")
                if args.params and registry is METHODS:  # batch_seeds: which may, which not
                    batched = ("yes: its seeds may train as one stacked network"
                               if getattr(entry.obj, "batchable", False)
                               else "no: its seeds run one at a time")
                    print(f"      (batch_seeds: {batched})")


def _finish(out: Path, plots: bool) -> None:
    """Print the summary table and draw the plots of a finished run folder."""
    from engram.results import read_rows
    from engram.reports.tables import format_table, summary_table

    rows = read_rows(out / "results.csv")
    print(format_table(summary_table(rows)))
    print(f"\nresults: {out / 'results.csv'}")
    # No accuracy row yet (every run failed before its first evaluation): nothing to draw,
    # and the failures, listed next, say why.
    if plots and any(row["metric"] == "accuracy" for row in rows):
        from engram.reports.figures import write_plots
        written = write_plots(out)
        print(f"plots:   {out / 'plots'}/ ({len(written)} PNG files)")


def _report_failures(report: Any) -> int:
    """List a harness report's failed jobs (point, seed, the error's last line) on stderr;
    the exit status: 1 when any failed, else 0. The same for every experiment command."""
    if not report.failures:
        return 0
    print(f"\n{len(report.failures)} of {report.runs} runs failed (also in "
          f"{report.folder / 'failures.jsonl'}); the others' results were kept:", file=sys.stderr)
    for failure in report.failures:
        where = ", ".join(f"{k}={v}" for k, v in failure["point"].items())
        last_line = failure["error"].splitlines()[-1]
        print(f"  {failure['label']} seed {failure['seed']}" + (f" [{where}]" if where else "")
              + f": {last_line}", file=sys.stderr)
    print("fix the cause and rerun the same command: only the failed runs run again",
          file=sys.stderr)
    return 1


def _holding(out: Path, command: str):
    """The lock of `out` for a whole command: the experiment function takes it again inside
    (nested in one process), and the summary and plots drawn afterwards stay under it."""
    from engram.experiments.outdir import OutputFolder
    return OutputFolder(out, command)


def cmd_run(args: argparse.Namespace) -> int:
    from engram.config import RunConfig, load_config
    from engram.schema import describe_fields
    from engram.errors import ConfigError

    if args.help_config:
        print("\n".join(describe_fields(RunConfig)))
        return
    if args.config is None:
        raise SystemExit("engram run: error: a CONFIG file is required (see configs/)")
    try:
        overrides = list(args.overrides) + ["batch_seeds=true"] * args.batch_seeds
        cfg = load_config(args.config, overrides, smoke=args.smoke)
    except ConfigError as err:
        raise ConfigError(f"{err}{_sweep_hint(args.config, args.overrides)}") from None
    default_out = Path(args.config).stem + ("-smoke" if args.smoke else "")
    out = Path(args.out) if args.out else Path("runs") / default_out
    from engram.experiments.continual import run_experiment

    with _tracked(args, out) as options, _holding(out, "run"):  # summary, plots under the lock
        report = run_experiment(cfg, out, **options)
        _finish(out, cfg.plots)
    return _report_failures(report)


def _sweep_hint(config: str, overrides: list[str]) -> str:
    """A hint when a config that `engram run` rejects is a valid sweep (lists alternatives)."""
    from engram.experiments.sweep import load_sweep

    try:
        _, jobs = load_sweep(config, overrides)
    except Exception:  # noqa: BLE001 - not a valid sweep either: the original error stands
        return ""
    return (f"\n{config} lists alternatives ({len(jobs)} runs): run it with "
            f"`engram sweep {config}`")


def cmd_demo(args: argparse.Namespace) -> int:
    from engram.config import load_config
    from engram.experiments.continual import run_experiment

    overrides = [f"seeds={list(range(args.seeds))}"] if args.seeds is not None else []
    cfg = load_config(DEMO_CONFIG, overrides)
    out = Path(args.out)
    print(f"engram demo: {len(cfg.methods)} methods x {len(cfg.seeds)} seeds on split digits, "
          f"{cfg.stream.n_tasks} class-incremental tasks -> {out}/")
    with _tracked(args, out) as options, _holding(out, "run"):
        report = run_experiment(cfg, out, **options)
        _finish(out, cfg.plots)
    if _report_failures(report):
        return 1
    print("\nNaive fine-tuning keeps only the last task (about 1/5 of all digits right); replay "
          "keeps much more with 200 stored examples; joint training on everything is the ceiling.")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from engram.experiments.sweep import load_sweep, run_sweep

    out = Path(args.out) if args.out else Path("runs") / Path(args.sweep_file).stem
    if args.dry_run:
        from engram.results import read_rows

        _, jobs = load_sweep(args.sweep_file, args.overrides)
        done: set[str] = set()
        if (out / "results.csv").is_file():  # read only: another process may be writing it
            done = {row["run_id"] for row in read_rows(out / "results.csv")
                    if row["metric"] == "run_complete"}

        def finished(job) -> bool:  # a group of batched seeds: when each of its runs is
            return all(run in done for run in job.run_ids or (job.run_id,))

        for job in jobs:
            print(f"{job.run_id}  {'done' if finished(job) else 'todo'}  {job.describe()}")
        print(f"{sum(job.runs for job in jobs)} runs, "
              f"{sum(job.runs for job in jobs if finished(job))} already done in {out}")
        return 0
    with _tracked(args, out) as options, _holding(out, "sweep"):  # summary, plots: locked too
        report = run_sweep(args.sweep_file, out, overrides=args.overrides, **options)
        if report.runs == report.total:  # one run per job
            print(f"sweep: {report.total} runs: {report.skipped} were already done, "
                  f"{report.completed} finished now, {len(report.failures)} failed")
        else:  # groups of batched seeds: jobs of several runs each
            print(f"sweep: {report.runs} runs in {report.total} jobs: {report.skipped} jobs "
                  f"were already done, {report.completed} finished now; "
                  f"{len(report.failures)} runs failed")
        _print_scenario_table(out, png=True)
    return _report_failures(report)


def _print_scenario_table(run_dir: Path, png: bool, markdown: bool = False,
                          split: str | None = None, more_dirs: list[str] = (),
                          ci: bool = False) -> None:
    from engram.results import read_folders
    from engram.reports.tables import format_scenario_table, scenario_table

    table = scenario_table(read_folders([run_dir, *more_dirs]), split)
    print(format_scenario_table(table, markdown=markdown, ci=ci))
    if png and table:
        from engram.reports.figures import write_table_png
        print(f"\ntable plot: {write_table_png(run_dir, split, more_dirs, ci=ci)}")


def cmd_table(args: argparse.Namespace) -> None:
    _print_scenario_table(Path(args.run_dir), png=not args.no_png, markdown=args.markdown,
                          split=args.split, more_dirs=args.more_dirs, ci=args.ci)


def cmd_plot(args: argparse.Namespace) -> None:
    from engram.reports.figures import write_plots

    for path in write_plots(args.run_dir, args.more_dirs, out=args.out):
        print(path)


def cmd_summary(args: argparse.Namespace) -> None:
    from engram.results import read_folders
    from engram.reports.tables import format_table, summary_table

    rows = read_folders([args.run_dir, *args.more_dirs])
    print(format_table(summary_table(rows), ci=args.ci))


def cmd_export(args: argparse.Namespace) -> None:
    from engram.frames import export_parquet

    for path in export_parquet([args.run_dir, *args.more_dirs], args.out):
        print(path)


def cmd_profile(args: argparse.Namespace) -> int:
    from engram.schema import describe_fields
    from engram.experiments.profile import ProfileConfig, load_profile_config, run_profile

    if args.help_config:
        print("\n".join(describe_fields(ProfileConfig)))
        return 0
    if not args.config:
        raise SystemExit("engram profile: give a profile config, e.g. configs/profile/digits.yaml")
    cfg = load_profile_config(args.config, args.overrides)
    out = Path(args.out or Path("runs") / cfg.name)
    with _tracked(args, out) as options:
        report = run_profile(cfg, out, **options)
    print(f"{report.rows_written} rows measured, {report.rows_skipped} already there, "
          f"in {report.seconds:.1f} s")
    print(f"results: {out / 'results.csv'}\nnext: engram profile-report {out}")
    return _report_failures(report)


def cmd_plasticity(args: argparse.Namespace) -> int:
    from engram.schema import describe_fields
    from engram.experiments.plasticity import (PLASTICITY_COLUMNS, PLASTICITY_KEY, PlasticityConfig,
                                               load_plasticity_config, run_plasticity)
    from engram.reports.plasticity import (format_plasticity_summary, plasticity_summary,
                                           write_plasticity_plots)
    from engram.results import read_rows

    if args.help_config:
        print("\n".join(describe_fields(PlasticityConfig)))
        return 0
    if not args.config:
        raise SystemExit("engram plasticity: give a config, e.g. "
                         "configs/plasticity/bit_flipping.yaml")
    cfg = load_plasticity_config(args.config, args.overrides)
    out = Path(args.out or Path("runs") / cfg.name)
    with _tracked(args, out) as options, _holding(out, "plasticity"):  # plots locked too
        report = run_plasticity(cfg, out, **options)
        print(f"{report.completed} runs done, {report.skipped} already there, "
              f"in {report.seconds:.1f} s")
        rows = read_rows(out / "results.csv", PLASTICITY_COLUMNS, PLASTICITY_KEY)
        measured = any(r["task"] for r in rows)  # none when every run failed on its first task
        if measured:
            print(format_plasticity_summary(plasticity_summary(rows)))
        print(f"results: {out / 'results.csv'}")
        if measured:
            print(f"plot: {write_plasticity_plots(rows, out / 'plots')}")
    return _report_failures(report)


def cmd_window(args: argparse.Namespace) -> int:
    from engram.schema import describe_fields
    from engram.experiments.window import (WindowExperiment, load_window_experiment,
                                           run_window_experiment)
    from engram.reports.window import (format_window_summary, window_summary,
                                       write_window_pictures)

    if args.help_config:
        print("\n".join(describe_fields(WindowExperiment)))
        return 0
    overrides = list(args.overrides)
    config = args.config
    if config is not None and "=" in config and not Path(config).is_file():
        overrides.insert(0, config)  # `engram window run.max_steps=100`: no config file
        config = None
    experiment = load_window_experiment(config, overrides)
    if experiment.animation != "none" and not args.no_animation:
        from engram.reports.window import animation_writer
        animation_writer(experiment.animation, experiment.fps)  # no ffmpeg: say so now
    out = Path(args.out or Path("runs") / experiment.name)
    with _tracked(args, out) as options, _holding(out, "window"):  # pictures locked too
        report = run_window_experiment(experiment, out, **options)
        print(f"{report.completed} runs done, {report.skipped} already there, "
              f"in {report.seconds:.1f} s")
        if report.records:  # the finished runs, also when others failed
            print(format_window_summary(window_summary(experiment, report.records)))
            print(f"results: {out / 'results.csv'}")
            for path in write_window_pictures(experiment, report.records, out,
                                              animate=not args.no_animation):
                print(f"wrote: {path}")
    return _report_failures(report)


def cmd_profile_report(args: argparse.Namespace) -> int:
    from engram.errors import DataError
    from engram.experiments.profile import PROFILE_COLUMNS, PROFILE_KEY
    from engram.reports.profile import format_ranking_table, ranking_table, write_profile_plots
    from engram.results import read_rows

    path = Path(args.run_dir) / "results.csv"
    if not path.is_file():
        raise DataError(f"{path} does not exist; point at a folder written by `engram profile`")
    rows = read_rows(path, PROFILE_COLUMNS, PROFILE_KEY)
    if not rows:
        raise DataError(f"{path} has no rows yet; let `engram profile` measure some")
    table = ranking_table(rows, margin=args.margin, direction=args.direction)
    print(format_ranking_table(table, markdown=args.markdown))
    if not args.no_png:
        for plot in write_profile_plots(rows, Path(args.run_dir) / "plots"):
            print(f"plot: {plot}")
    return 0


def _os_problem(err: OSError) -> str:
    """An operating-system error as `cannot access PATH: REASON` (the path when known)."""
    reason = err.strerror or str(err)
    return f"cannot access {err.filename}: {reason}" if err.filename else reason


def _load_plugins(args: argparse.Namespace) -> list[str]:
    """Load the installed `engram.plugins` entry points, then the command's --import
    modules, before any config is read; the list the workers load too (engram.plugins)."""
    from engram.plugins import entry_point_plugins, load_plugins

    return entry_point_plugins() + load_plugins(getattr(args, "imports", []))


COMMANDS = {"demo": cmd_demo, "run": cmd_run, "sweep": cmd_sweep, "table": cmd_table,
            "plot": cmd_plot, "summary": cmd_summary, "export": cmd_export, "list": cmd_list,
            "profile": cmd_profile, "profile-report": cmd_profile_report,
            "plasticity": cmd_plasticity, "window": cmd_window}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow options (`engram sweep X.yaml --workers 2 seeds=[0]`), which
    # argparse alone does not accept after the positionals were read.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    from engram.errors import EngramError

    try:
        args.plugins = _load_plugins(args)
        status = COMMANDS[args.command](args)
    except EngramError as err:
        notes = "".join(f"\n{note}" for note in getattr(err, "__notes__", ()))
        print(f"engram: error: {err}{notes}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`engram table DIR | head`): stop quietly. Point stdout at
        # devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # read-only or full disk, --out under a file, a too-long path, ...
        # Only OSError: any other exception is a bug in engram and keeps its traceback.
        print(f"engram: error: {_os_problem(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nengram: interrupted; every row measured so far is in results.csv. "
              "Rerun the same command to finish.",
              file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
