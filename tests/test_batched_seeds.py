"""batch_seeds: the seeds of a method trained as one stacked network write the rows, under
the same run ids, that running them one at a time writes (engram.experiments.continual: execute_seeds;
engram.batched_training)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from engram.batched_training import SeedGroup, stack_padded
from engram.cli import main
from engram.errors import ConfigError, EngramError
from engram.experiments.continual import run_experiment
from engram.methods.naive import Naive
from engram.registry import METHODS
from engram.results import KEY, read_rows, row_key
from tests.conftest import tiny_config as tiny

SEEDS = [0, 1, 2, 3]
TOLERANCE = 1e-5  # float rounding: a batched matrix product sums in another order
# (relative too: train_loss sums float32 losses, about 9 at most here, whose spacing is 1e-6)
BATCH = 16  # the seeds' tasks then have different numbers of mini-batches (test below)


def tiny_config(**sections):
    """conftest's tiny config with mini-batches of BATCH examples."""
    return tiny(**{**sections, "train": {"batch_size": BATCH, **sections.get("train", {})}})


def rows_by_key(folder):
    return {row_key(row, KEY): row for row in read_rows(folder / "results.csv")}


def one_by_one_and_batched(tmp_path, **sections):
    """The rows of SEEDS run one at a time and batched, by row key."""
    cfg = tiny_config(seeds=SEEDS, **sections)
    run_experiment(cfg, tmp_path / "one", show_progress=False)
    run_experiment(dataclasses.replace(cfg, batch_seeds=True), tmp_path / "batched",
                   show_progress=False)
    return rows_by_key(tmp_path / "one"), rows_by_key(tmp_path / "batched")


def assert_same_rows(one, batched):
    assert_same_rows_of_runs(one, batched, len(SEEDS))


def assert_same_rows_of_runs(one, batched, runs):
    assert one.keys() == batched.keys()  # the same runs (run ids), rows and keys
    assert len({row["run_id"] for row in one.values()}) == runs
    for key, row in one.items():
        other = batched[key]
        assert {c: v for c, v in row.items() if c != "value"} == \
            {c: v for c, v in other.items() if c != "value"}, key
        if row["metric"] != "train_seconds":  # a wall time, the only number not reproduced
            assert float(other["value"]) == pytest.approx(float(row["value"]), rel=TOLERANCE, abs=TOLERANCE), key


def test_the_seeds_of_a_tiny_config_have_different_numbers_of_mini_batches():
    """The premise of the tests below: each seed splits the data its own way, so its tasks
    have other sizes, and the batched loop must pad and let seeds sit out steps."""
    from engram.data import build_stream, load_source

    cfg = tiny_config()
    source = load_source(cfg.data.source, cfg.data.path, cfg.data.labels)
    sizes = {tuple(len(t.train) for t in build_stream(source, cfg.data, cfg.stream, seed).tasks)
             for seed in SEEDS}
    batches = {tuple(-(-n // BATCH) for n in per_task) for per_task in sizes}
    assert len(sizes) == len(SEEDS) and len(batches) > 1


def test_batched_naive_writes_the_rows_of_four_one_seed_runs(tmp_path):
    one, batched = one_by_one_and_batched(tmp_path, train={"eval_every": 1, "epochs": 2})
    assert_same_rows(one, batched)


def test_batched_ewc_with_adam_writes_the_rows_of_four_one_seed_runs(tmp_path):
    """EWC's penalty and Fisher per seed; Adam: a seed sitting out a step must not step
    (its moments and step count would move). Adam's eps is raised from 1e-8: with it, a
    weight whose gradient is near 0 moves by about lr whatever the gradient's size, so
    rounding-level differences there became loss differences of up to 8e-4 (found; with
    eps 1e-3 the largest is 5e-7, so the paths agree, and Adam is elementwise per seed)."""
    one, batched = one_by_one_and_batched(
        tmp_path, methods=[{"name": "ewc", "strength": 1000.0}],
        train={"optimizer": "adam", "lr": 0.01, "epochs": 2, "optimizer_args": {"eps": 1e-3}})
    assert_same_rows(one, batched)


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced", "herding"])
def test_batched_replay_with_momentum_writes_the_rows_of_four_one_seed_runs(tmp_path, policy):
    """Replay's memory, sampling and insertion draws per seed (its own generator); the mixed
    batches are longer than the task's. class_balanced inserts one example at a time, drawing
    the slot to replace; herding picks its exemplars at the task's end from the seed's own
    network's features (in eval mode, outside the stacked forward pass)."""
    one, batched = one_by_one_and_batched(
        tmp_path, methods=[{"name": "replay", "memory": 50, "policy": policy}],
        train={"momentum": 0.9, "epochs": 2})
    assert_same_rows(one, batched)


@pytest.mark.parametrize("train", [
    {"scheduler": "steplr", "scheduler_args": {"step_size": 4, "gamma": 0.5},
     "scheduler_step": "step", "momentum": 0.9},  # per step: each seed its own optimizer
    {"scheduler": "steplr", "scheduler_args": {"step_size": 1, "gamma": 0.5},
     "optimizer_policy": "carry", "momentum": 0.9, "epochs": 3},  # one optimizer, kept
], ids=["per-step-schedule", "carried-epoch-schedule"])
def test_batched_schedules_write_the_rows_of_one_seed_runs(tmp_path, train):
    """A schedule stepped per optimizer step differs between seeds taking different numbers
    of steps (each seed then keeps its own optimizer); an epoch schedule is shared."""
    one, batched = one_by_one_and_batched(tmp_path, train=train)
    assert_same_rows(one, batched)


def test_batched_multi_head_cnn_writes_the_rows_of_one_seed_runs(tmp_path):
    """Task-incremental learning (each example's own head, picked inside the stacked
    forward pass) on a convolutional network (4-d weights, stored as they are)."""
    one, batched = one_by_one_and_batched(
        tmp_path, stream={"scenario": "task"}, model={"kind": "cnn", "channels": [4, 8]},
        train={"epochs": 1})
    assert_same_rows(one, batched)


def test_seeds_batched_with_their_neighbours_keep_their_own_numbers(tmp_path):
    """A seed's rows do not depend on which seeds train beside it: seed 2 alone (one-seed
    path) equals seed 2 batched with seeds 0 to 3 (catches seeds sharing a generator or
    parameters)."""
    run_experiment(tiny_config(seeds=[2]), tmp_path / "alone", show_progress=False)
    run_experiment(tiny_config(seeds=SEEDS, batch_seeds=True), tmp_path / "group",
                   show_progress=False)
    alone, group = rows_by_key(tmp_path / "alone"), rows_by_key(tmp_path / "group")
    assert set(alone) < set(group)
    differences = [abs(float(row["value"]) - float(group[key]["value"]))
                   for key, row in alone.items() if row["metric"] != "train_seconds"]
    assert max(differences) < TOLERANCE


def test_a_batched_folder_grows_by_seeds(tmp_path):
    """Seed 0 done batched; the batched rerun with seeds 0 and 1 adds seed 1's rows (seed
    0's re-measured rows are duplicates, skipped) and the folder identity is unchanged."""
    run_experiment(tiny_config(seeds=[0], batch_seeds=True), tmp_path, show_progress=False)
    first = rows_by_key(tmp_path)
    report = run_experiment(tiny_config(seeds=[0, 1], batch_seeds=True), tmp_path,
                            show_progress=False)
    assert report.ok
    rows = list(read_rows(tmp_path / "results.csv"))
    assert len({row_key(row, KEY) for row in rows}) == len(rows)  # no duplicates
    assert {r["seed"] for r in rows if r["metric"] == "run_complete"} == {"0", "1"}
    assert set(first) < {row_key(row, KEY) for row in rows}
    rerun = run_experiment(tiny_config(seeds=[0, 1], batch_seeds=True), tmp_path,
                           show_progress=False)
    assert rerun.skipped == rerun.total == 1  # one group job, already finished


def test_a_sweep_batches_the_seeds_of_each_point_and_method(tmp_path):
    """One group per grid point and method (picklable, for worker processes); the run ids
    and rows are the unbatched sweep's."""
    import pickle

    import yaml

    from engram.config import config_to_dict
    from engram.experiments.sweep import load_sweep, run_sweep

    raw = config_to_dict(tiny_config(seeds=[0, 1], train={"epochs": 1},
                                     methods=["naive", {"name": "ewc", "strength": 10.0}]))
    raw["train"]["lr"] = [0.05, 0.1]  # an axis: two grid points
    plain, batched = tmp_path / "plain.yaml", tmp_path / "batched.yaml"
    plain.write_text(yaml.safe_dump(raw))
    batched.write_text(yaml.safe_dump({**raw, "batch_seeds": True}))
    _, jobs = load_sweep(batched)
    assert len(jobs) == 4 and all(len(job.payload.seeds) == 2 for job in jobs)
    assert pickle.loads(pickle.dumps(jobs[0])).payload.run_ids == jobs[0].payload.run_ids
    run_sweep(plain, tmp_path / "one", show_progress=False)
    report = run_sweep(batched, tmp_path / "group", show_progress=False)
    assert report.ok and report.total == 4
    assert_same_rows_of_runs(rows_by_key(tmp_path / "one"), rows_by_key(tmp_path / "group"), 8)


def test_the_sweep_command_counts_the_runs_of_seed_groups(tmp_path, capsys):
    """`engram sweep --dry-run` calls a group done when all of its seeds are, and both
    summaries count runs, not groups."""
    import yaml

    from engram.config import config_to_dict

    raw = config_to_dict(tiny_config(seeds=[0, 1, 2], train={"epochs": 1}, batch_seeds=True,
                                     methods=["naive", {"name": "ewc", "strength": 10.0}]))
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = ["--out", str(tmp_path / "out")]
    assert main(["sweep", str(path), *out, "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("6 runs, 0 already done")
    assert main(["sweep", str(path), *out, "-q"]) == 0
    assert "sweep: 6 runs in 2 jobs: 0 jobs were already done, 2 finished now; 0 runs " \
        "failed" in capsys.readouterr().out
    assert main(["sweep", str(path), *out, "--dry-run"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[-1].startswith("6 runs, 6 already done")
    assert all("  done  " in line for line in listing[:-1]) and len(listing) == 3


def test_methods_that_cannot_batch_run_their_seeds_one_at_a_time(tmp_path):
    """lwf is not batchable: with batch_seeds its seeds run as one-seed jobs, the same rows."""
    assert not METHODS.get("lwf").batchable
    one, batched = one_by_one_and_batched(tmp_path, methods=["naive", "lwf"])
    assert_same_rows_of_runs(one, batched, 2 * len(SEEDS))
    from engram.experiments.continual import continual_jobs

    cfg = tiny_config(seeds=[0, 1], batch_seeds=True, methods=["naive", "lwf"])
    labels = sorted(job.label for job in continual_jobs([({}, cfg)]))
    assert labels == ["lwf", "lwf", "naive (seeds 0,1 batched)"]


@pytest.mark.parametrize("method", [
    {"name": "online_ewc", "strength": 10.0}, {"name": "mas", "strength": 1.0},
    {"name": "l2", "strength": 1.0}, {"name": "si", "strength": 1.0},
    {"name": "rwalk", "update_every": 3}, {"name": "ewcpp", "update_every": 3},
    {"name": "l2_init", "strength": 0.1}])
def test_batched_quadratic_regularisers_write_the_rows_of_four_one_seed_runs(tmp_path, method):
    """Every method whose penalty is a QuadraticPenalty, with momentum: the importances
    (a Fisher, MAS, SI's path integral from each seed's own gradient, RWalk's intervals)
    are measured on each seed's own network and added to its own gradient."""
    one, batched = one_by_one_and_batched(tmp_path, methods=[method],
                                          train={"momentum": 0.9, "epochs": 2})
    assert_same_rows(one, batched)


def test_configs_that_cannot_batch_are_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="model.dropout"):
        run_experiment(tiny_config(seeds=[0, 1], batch_seeds=True,
                                   model={"kind": "mlp", "hidden": [8], "dropout": 0.1}),
                       tmp_path / "b", show_progress=False)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("kind", ["resnet18", "resnet18_slim"])
def test_engram_run_refuses_batch_norm_networks_before_any_run_starts(tmp_path, capsys, kind):
    """Batch norm's running statistics are buffers the stacked forward pass does not update:
    refused at planning, in one line naming the model kind, before the folder is made."""
    import yaml

    from engram.config import config_to_dict

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(tiny_config(model={"kind": kind}))))
    out = tmp_path / "out"
    assert main(["run", str(config), "seeds=[0,1]", "--batch-seeds", "--out", str(out), "-q"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"model.kind {kind} keeps" in error and "bn1.running_mean" in error
    assert not out.exists()


def test_engram_run_batch_seeds_flag_writes_every_seed(tmp_path, capsys):
    import yaml

    from engram.config import config_to_dict

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(tiny_config(train={"epochs": 1}))))
    out = tmp_path / "out"
    assert main(["run", str(config), "seeds=[0,1]", "--batch-seeds", "--out", str(out), "-q"]) == 0
    rows = read_rows(out / "results.csv")
    assert {r["seed"] for r in rows if r["metric"] == "run_complete"} == {"0", "1"}
    assert yaml.safe_load((out / "config.yaml").read_text())["batch_seeds"] is True


def test_trackers_are_refused_with_batched_seeds(tmp_path):
    with pytest.raises(ConfigError, match="--log follows one run per job"):
        run_experiment(tiny_config(seeds=[0, 1], batch_seeds=True), tmp_path / "a",
                       show_progress=False, trackers=[object()])
    assert not (tmp_path / "a").exists()


def test_list_params_says_which_methods_batch(capsys):
    assert main(["list", "--params"]) == 0
    out = capsys.readouterr().out
    for name in ("naive", "ewc", "replay"):
        assert METHODS.get(name).batchable
    assert out.count("(batch_seeds: yes") == sum(
        METHODS.get(name).batchable for name in METHODS.names())
    assert out.count("(batch_seeds: no") == sum(
        not METHODS.get(name).batchable for name in METHODS.names())


def test_seed_group_runs_each_network_on_its_own_rows_and_hands_each_its_gradient():
    """The stacked forward pass is each network's own on its own rows (padded rows and a
    seed sitting out ignored); each network's parameters are views of its row (an update
    to one shows in the stack), and gets its own gradient, none when it sat out."""
    torch.manual_seed(0)
    from engram.config import ModelConfig
    from engram.models import build_model

    nets = [build_model(ModelConfig(kind="mlp", hidden=[16]), (1, 8, 8), 1, 4) for _ in range(3)]
    copies = [copy.deepcopy(net) for net in nets]  # untouched networks, to compare with
    group = SeedGroup(nets)
    xs = [torch.randn(5, 1, 8, 8), None, torch.randn(3, 1, 8, 8)]
    tasks = [torch.zeros(5, dtype=torch.long), None, torch.zeros(3, dtype=torch.long)]
    out = group(stack_padded(xs), stack_padded(tasks))
    assert out.shape == (3, 5, 4)
    for s in (0, 2):
        torch.testing.assert_close(out[s, :len(xs[s])], copies[s](xs[s], tasks[s]))
        torch.testing.assert_close(nets[s](xs[s], tasks[s]), copies[s](xs[s], tasks[s]))
    (out[0, :5].sum() * 2 + out[2, :3].sum()).backward()
    group.hand_out_gradients([0, 2])
    for s, scale in ((0, 2.0), (2, 1.0)):
        copies[s](xs[s], tasks[s]).sum().mul(scale).backward()
        for mine, theirs in zip(nets[s].parameters(), copies[s].parameters()):
            torch.testing.assert_close(mine.grad, theirs.grad)
    assert all(p.grad is None for p in nets[1].parameters())
    with torch.no_grad():
        nets[2].head.weight.add_(1.0)  # as an optimizer's step does
    torch.testing.assert_close(group.row("head.weight", group.stacked["head.weight"], 2),
                               nets[2].head.weight)


def test_a_folder_is_resumed_only_in_the_mode_it_was_started_in(tmp_path):
    """Batched and one-seed rows agree only up to float rounding, so one folder never holds
    both: switching batch_seeds on a folder is refused, in either direction, for runs and
    sweeps alike (the folder's identity)."""
    cfg = tiny_config(seeds=[0, 1], train={"epochs": 1})
    run_experiment(cfg, tmp_path / "one", show_progress=False)
    with pytest.raises(EngramError, match="holds another experiment \\(batch_seeds"):
        run_experiment(dataclasses.replace(cfg, batch_seeds=True), tmp_path / "one",
                       show_progress=False)
    run_experiment(dataclasses.replace(cfg, batch_seeds=True), tmp_path / "batched",
                   show_progress=False)
    with pytest.raises(EngramError, match="holds another experiment \\(batch_seeds"):
        run_experiment(cfg, tmp_path / "batched", show_progress=False)
    run_experiment(cfg, tmp_path / "one", show_progress=False)  # its own mode resumes


# ----------------------------------------------------------------------------- divergence

@dataclasses.dataclass
class DivergeParams:
    task: int = 2          # the task (1-based) whose training diverges ...
    train_size: int = 0    # ... for the seed whose split gives that task this many examples


class DivergeOnOneSeed(Naive):
    """Test-only: naive, except that its loss is NaN on one task of the seed whose split gives
    that task `train_size` examples, so exactly that seed diverges (on the one-seed path and
    batched alike): its NaN gradient makes its weights NaN, finish_epoch sees a NaN loss."""
    Params = DivergeParams
    batchable = True

    def batch_loss(self, outputs, batch, ctx):
        loss = super().batch_loss(outputs, batch, ctx)
        hit = (ctx.task.index + 1 == self.params.task
               and len(ctx.task.train) == self.params.train_size)
        return loss * float("nan") if hit else loss


@pytest.fixture
def diverge_method(monkeypatch):
    """METHODS with "diverge_on_one_seed" registered, for this test only."""
    METHODS.names()  # filled first, so the copy is complete
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))
    METHODS.add("diverge_on_one_seed", DivergeOnOneSeed, "test only: NaN loss for one seed")


def task_sizes(seeds, **sections):
    """{seed: (number of training examples of each task)} of tiny_config(**sections)."""
    from engram.data import build_stream, load_source

    cfg = tiny_config(**sections)
    source = load_source(cfg.data.source, cfg.data.path, cfg.data.labels)
    return {seed: tuple(len(t.train) for t in build_stream(source, cfg.data, cfg.stream,
                                                           seed).tasks) for seed in seeds}


@pytest.mark.parametrize("train", [
    {"epochs": 2},  # one optimizer for all seeds
    {"epochs": 2, "momentum": 0.9, "scheduler": "steplr", "scheduler_step": "step",
     "scheduler_args": {"step_size": 4, "gamma": 0.5}},  # each seed its own optimizer
], ids=["shared-optimizer", "own-optimizers"])
def test_a_diverging_seed_fails_alone_as_its_one_seed_run_does(tmp_path, capsys, diverge_method,
                                                               train):
    """Seed 1 of 3 diverges on task 2: batched, the other two finish with their one-seed
    rows; seed 1 has the rows its one-seed run has (up to task 1, no run_complete) and the
    same failure, in failures.jsonl and in the end-of-run report (`engram run`'s)."""
    import yaml

    from engram.config import config_to_dict

    seeds = [0, 1, 2]
    sizes = task_sizes(seeds)
    assert [sizes[seed][1] for seed in seeds].count(sizes[1][1]) == 1  # only seed 1 diverges
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(tiny_config(
        seeds=seeds, train=train,
        methods=[{"name": "diverge_on_one_seed", "task": 2, "train_size": sizes[1][1]}]))))
    reports = {}
    for mode, flags in (("one", []), ("batched", ["--batch-seeds"])):
        capsys.readouterr()
        code = main(["run", str(config), "--out", str(tmp_path / mode), "-q", *flags])
        reports[mode] = (code, capsys.readouterr().err.replace(str(tmp_path / mode), "OUT"))
    assert reports["one"] == reports["batched"]
    code, err = reports["one"]
    assert code == 1 and "1 of 3 runs failed (also in OUT/failures.jsonl)" in err
    assert f"diverge_on_one_seed(train_size={sizes[1][1]}) seed 1: DivergenceError: training " \
        "diverged on task 2" in err
    failures = [(tmp_path / mode / "failures.jsonl").read_text() for mode in ("one", "batched")]
    assert failures[0] == failures[1] and len(failures[0].splitlines()) == 1
    one, batched = rows_by_key(tmp_path / "one"), rows_by_key(tmp_path / "batched")
    assert_same_rows_of_runs(one, batched, len(seeds))
    complete = {row["seed"] for row in batched.values() if row["metric"] == "run_complete"}
    assert complete == {"0", "2"}
    assert max(int(row["task_trained"]) for row in batched.values() if row["seed"] == "1") == 1


def test_runs_failed_survives_the_trip_from_a_worker_process():
    """A group's RunsFailed is pickled back to the parent (worker pool, Ray) with its runs."""
    import pickle

    from engram.errors import DivergenceError
    from engram.experiments.jobs import RunsFailed, portable_error

    error = RunsFailed("1 of 2 diverged", [("abc", 1, "naive", DivergenceError("nan"))])
    back = pickle.loads(pickle.dumps(portable_error(error)))
    assert isinstance(back, RunsFailed) and str(back) == "1 of 2 diverged"
    [(run, seed, label, inner)] = back.failures
    assert (run, seed, label, str(inner)) == ("abc", 1, "naive", "nan")
    assert isinstance(inner, DivergenceError)


def test_a_seed_out_of_training_is_never_moved():
    """train_task_seeds with seed 1 not alive: its network and optimizer state are untouched
    (no gradient, no step: one optimizer holds every seed's parameters), seeds 0 and 2
    train."""
    from engram.batched_training import train_task_seeds
    from engram.data import build_stream, load_source
    from engram.experiments.continual import prepare_run

    cfg = tiny_config(seeds=[0, 1, 2], train={"epochs": 1, "momentum": 0.9})
    source = load_source(cfg.data.source, cfg.data.path, cfg.data.labels)
    runs = [prepare_run(cfg, cfg.methods[0], seed,
                        build_stream(source, cfg.data, cfg.stream, seed), torch.device("cpu"))
            for seed in cfg.seeds]
    ctxs, methods = [ctx for _, _, ctx in runs], [method for _, method, _ in runs]
    group = SeedGroup([ctx.model for ctx in ctxs])
    before = [[p.detach().clone() for p in ctx.model.parameters()] for ctx in ctxs]
    for ctx in ctxs:
        ctx.task = ctx.stream.tasks[0]
        ctx.seen_tasks.append(ctx.task)
    epochs = []
    diverged = train_task_seeds(group, ctxs, methods, lambda s, e, loss: epochs.append(s),
                                alive=[0, 2])
    assert diverged == {} and epochs == [0, 2] and ctxs[1].step == 0
    for s, moved in ((0, True), (1, False), (2, True)):
        now = list(ctxs[s].model.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before[s], now)) == moved
    assert all(p.grad is None for p in ctxs[1].model.parameters())
    assert all(p not in group.optimizer.state for p in ctxs[1].model.parameters())


class _MaskedLoss(Naive):
    """A method with its own batch_loss (as ER-ACE has): half the cross-entropy."""

    def batch_loss(self, outputs, batch, ctx):
        return 0.5 * torch.nn.functional.cross_entropy(outputs, batch.y)


@pytest.mark.parametrize("count_correct", [False, True])
@pytest.mark.parametrize("case", ["equal", "padded", "mixed", "own_loss"])
def test_seed_losses_equal_each_seeds_own_loss(case, count_correct):
    """seed_losses (one cross-entropy over every seed's rows) against train_task's per-seed
    computation (batch_loss, then own_loss) on each seed's rows alone: equal mini-batches;
    unequal ones and a seed sitting out (padding); replay-mixed batches (the own examples
    first); and a method with its own batch_loss (the per-seed path)."""
    from types import SimpleNamespace

    from engram.batched_training import seed_losses
    from engram.data.streams import TensorSet
    from engram.training import own_loss

    g = torch.Generator().manual_seed(0)
    lengths = {"equal": [6, 6, 6], "padded": [6, None, 4], "mixed": [6, 6, 3],
               "own_loss": [5, 6, None]}[case]
    task_batches, trained = [], []
    for n in lengths:
        if n is None:
            task_batches.append(None)
            trained.append(None)
            continue
        own = TensorSet(torch.randn(n, 2, generator=g), torch.randint(4, (n,), generator=g),
                        torch.zeros(n, dtype=torch.long))
        task_batches.append(own)
        if case == "mixed":  # two memory examples appended
            extra = torch.randint(4, (2,), generator=g)
            trained.append(TensorSet(torch.cat([own.x, torch.randn(2, 2, generator=g)]),
                                     torch.cat([own.y, extra]), torch.zeros(n + 2, dtype=torch.long)))
        else:
            trained.append(own)
    longest = max(len(b) for b in trained if b is not None)
    outputs = torch.randn(len(lengths), longest, 4, generator=g, requires_grad=True)
    method = _MaskedLoss() if case == "own_loss" else Naive()
    ctxs = [SimpleNamespace(loss_fn=torch.nn.functional.cross_entropy,
                            count_correct=count_correct) for _ in lengths]
    losses, own, correct = seed_losses(outputs, trained, task_batches, ctxs, [method] * 3)
    assert (correct is None) == (not count_correct)
    for s, batch in enumerate(trained):
        if batch is None:  # sitting out: nothing
            assert losses[s] == 0 and own[s] == 0 and (correct is None or correct[s] == 0)
            continue
        out = outputs[s, :len(batch)]
        loss = method.batch_loss(out, batch, ctxs[s])
        expected_own, expected_correct = own_loss(ctxs[s], method, out, loss, task_batches[s],
                                                  batch is not task_batches[s])
        torch.testing.assert_close(losses[s], loss)
        torch.testing.assert_close(own[s], expected_own)
        if count_correct:
            assert correct[s] == float(expected_correct)
        # and the gradient of the summed losses reaches each seed's own rows only
        (grad,) = torch.autograd.grad(losses.sum(), outputs, retain_graph=True)
        (expected,) = torch.autograd.grad(loss, outputs, retain_graph=True)
        torch.testing.assert_close(grad[s], expected[s])


def _stop_group_in_task(monkeypatch, index: int, calls: list | None = None) -> None:
    """Make train_task_seeds raise KeyboardInterrupt when it reaches task `index` (0-based):
    a kill in that task, after the group's checkpoint of the task before it. With `calls`,
    record the task index of every call."""
    import engram.batched_training as batched
    real = batched.train_task_seeds

    def stop(group, ctxs, methods, on_epoch, alive=None):
        task = ctxs[0].task.index
        if calls is not None:
            calls.append(task)
        if task == index:
            raise KeyboardInterrupt
        return real(group, ctxs, methods, on_epoch, alive)

    monkeypatch.setattr(batched, "train_task_seeds", stop)


def _comparable_rows(folder):
    return {key: row["value"] for key, row in rows_by_key(folder).items()
            if row["metric"] != "train_seconds"}


@pytest.mark.parametrize("method,train", [
    ("ewc", {}),
    ("replay", {"optimizer": "adam", "lr": 0.01, "optimizer_policy": "carry"}),
    ("naive", {"momentum": 0.9, "optimizer_policy": "carry", "scheduler": "steplr",
               "scheduler_step": "step", "scheduler_args": {"step_size": 4, "gamma": 0.5}}),
], ids=["ewc", "carry-one-optimizer", "carry-own-optimizers"])
def test_a_killed_group_resumes_from_its_checkpoint_to_the_uninterrupted_rows(
        tmp_path, monkeypatch, method, train):
    """A group killed in task 3 resumes from its checkpoint after task 2: only task 3 is
    trained again, and the rows equal an uninterrupted batched run's, bit for bit (the
    group's optimizer state too under optimizer_policy carry); the checkpoint is gone at
    the end."""
    cfg = tiny_config(seeds=SEEDS, batch_seeds=True, checkpoint_seconds=0.0,
                      stream={"n_tasks": 3}, methods=[method], train=train)
    run_experiment(cfg, tmp_path / "full", show_progress=False)
    _stop_group_in_task(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", show_progress=False)
    monkeypatch.undo()
    (checkpoint,) = (tmp_path / "cut" / "checkpoints").glob("*.pt")
    state = torch.load(checkpoint, weights_only=True)
    assert state["tasks_done"] == 2 and len(state["seeds"]) == len(SEEDS)
    calls = []
    _stop_group_in_task(monkeypatch, -1, calls)
    run_experiment(cfg, tmp_path / "cut", show_progress=False)
    assert calls == [2]  # tasks 1 and 2 came from the checkpoint
    assert _comparable_rows(tmp_path / "cut") == _comparable_rows(tmp_path / "full")
    assert not (tmp_path / "cut" / "checkpoints").exists()


def test_a_group_checkpoint_of_other_seeds_or_ahead_of_the_rows_is_not_resumed(
        tmp_path, monkeypatch):
    """A group checkpoint whose seeds are not this group's, or whose tasks have no rows,
    is deleted and the group starts over, to the same rows."""
    cfg = tiny_config(seeds=SEEDS, batch_seeds=True, checkpoint_seconds=0.0,
                      stream={"n_tasks": 3})
    run_experiment(cfg, tmp_path / "full", show_progress=False)
    for case in ("other-seeds", "no-rows"):
        folder = tmp_path / case
        _stop_group_in_task(monkeypatch, 2)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(cfg, folder, show_progress=False)
        monkeypatch.undo()
        (checkpoint,) = (folder / "checkpoints").glob("*.pt")
        state = torch.load(checkpoint, weights_only=True)
        if case == "other-seeds":
            state["group"] = state["group"][::-1]
        else:
            state["tasks_done"] = 3  # task 3 has no rows
        torch.save(state, checkpoint)
        calls = []
        _stop_group_in_task(monkeypatch, -1, calls)
        run_experiment(cfg, folder, show_progress=False)
        monkeypatch.undo()
        assert calls == [0, 1, 2], case  # started over
        assert _comparable_rows(folder) == _comparable_rows(tmp_path / "full"), case


def test_a_corrupt_group_checkpoint_is_named_in_one_line(tmp_path, monkeypatch):
    cfg = tiny_config(seeds=SEEDS, batch_seeds=True, checkpoint_seconds=0.0,
                      stream={"n_tasks": 3})
    _stop_group_in_task(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", show_progress=False)
    monkeypatch.undo()
    (checkpoint,) = (tmp_path / "cut" / "checkpoints").glob("*.pt")
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(EngramError, match=r"checkpoint .* cannot be read \(not a torch file"):
        run_experiment(cfg, tmp_path / "cut", show_progress=False, raise_failures=True)


def test_a_seed_that_diverged_before_the_kill_fails_again_after_the_resume(
        tmp_path, diverge_method):
    """Seed 1 diverges in task 2, the group is killed in task 3 and resumed from its
    checkpoint: the same rows and the same failure as the uninterrupted group."""
    seeds = [0, 1, 2]
    sizes = task_sizes(seeds, stream={"n_tasks": 3})
    assert [sizes[seed][1] for seed in seeds].count(sizes[1][1]) == 1  # only seed 1 diverges
    cfg = tiny_config(seeds=seeds, batch_seeds=True, checkpoint_seconds=0.0,
                      stream={"n_tasks": 3}, methods=[
                          {"name": "diverge_on_one_seed", "task": 2,
                           "train_size": sizes[1][1]}])
    run_experiment(cfg, tmp_path / "full", show_progress=False, raise_failures=False)
    with pytest.MonkeyPatch.context() as patch:  # (monkeypatch holds the method's registration)
        _stop_group_in_task(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(cfg, tmp_path / "cut", show_progress=False)
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        _stop_group_in_task(patch, -1, calls)
        report = run_experiment(cfg, tmp_path / "cut", show_progress=False,
                                raise_failures=False)
    assert len(report.failures) == 1
    assert calls == [2]
    assert _comparable_rows(tmp_path / "cut") == _comparable_rows(tmp_path / "full")
    failures = [(tmp_path / mode / "failures.jsonl").read_text() for mode in ("full", "cut")]
    assert failures[0] == failures[1] and "diverged on task 2" in failures[0]


def test_a_seed_begun_on_the_one_seed_path_goes_on_alone_from_its_checkpoint(tmp_path):
    """A batch_seeds folder written while a method could not batch holds its seeds'
    one-seed checkpoints; once the method batches, those seeds go on alone from them, so
    every row of a run comes from one path: seed 0 (killed in task 3) ends exactly as an
    uninterrupted one-seed run; seed 1 (not begun) trains batched."""
    from engram.methods.si import SI

    cfg = tiny_config(seeds=[0, 1], batch_seeds=True, checkpoint_seconds=0.0,
                      stream={"n_tasks": 3}, methods=["si"])
    with pytest.MonkeyPatch.context() as patch:  # as before si could batch
        patch.setattr(SI, "batchable", False)
        run_experiment(cfg, tmp_path / "one", show_progress=False)
        import engram.experiments.continual as runner
        real = runner.train_task

        def stop(ctx, method, on_epoch):
            if ctx.task.index == 2:
                raise KeyboardInterrupt
            real(ctx, method, on_epoch)

        patch.setattr(runner, "train_task", stop)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(cfg, tmp_path / "cut", show_progress=False)
    assert len(list((tmp_path / "cut" / "checkpoints").glob("*.pt"))) == 1  # seed 0's
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        _stop_group_in_task(patch, -1, calls)
        run_experiment(cfg, tmp_path / "cut", show_progress=False)
    assert calls == [0, 1, 2]  # seed 1 (no checkpoint, no rows yet) trained in the group
    cut, one = _comparable_rows(tmp_path / "cut"), _comparable_rows(tmp_path / "one")
    seed_0 = {row["run_id"] for row in rows_by_key(tmp_path / "one").values()
              if row["seed"] == "0"}
    assert {k: v for k, v in cut.items() if k[0] in seed_0} == \
        {k: v for k, v in one.items() if k[0] in seed_0}  # the one-seed path's, exactly
    assert_same_rows_of_runs(rows_by_key(tmp_path / "one"), rows_by_key(tmp_path / "cut"), 2)
    assert not (tmp_path / "cut" / "checkpoints").exists()


def test_the_checkpoint_of_a_group_of_other_seeds_is_removed(tmp_path, monkeypatch):
    """A group killed with seeds [0, 1], rerun with seeds [0, 1, 2] (the folder grows by
    seeds): the new group finds the old group's checkpoint, starts over, and leaves no
    checkpoint behind."""
    small = tiny_config(seeds=[0, 1], batch_seeds=True, checkpoint_seconds=0.0,
                        stream={"n_tasks": 3})
    _stop_group_in_task(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(small, tmp_path, show_progress=False)
    monkeypatch.undo()
    assert len(list((tmp_path / "checkpoints").glob("group-*.pt"))) == 1
    calls = []
    _stop_group_in_task(monkeypatch, -1, calls)
    run_experiment(dataclasses.replace(small, seeds=[0, 1, 2]), tmp_path, show_progress=False)
    assert calls == [0, 1, 2]
    assert not (tmp_path / "checkpoints").exists()
