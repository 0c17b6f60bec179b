"""The importance profiler end to end: rows, resume, purity, chance level, the CLI, and
(slow) the README's ranking on the default digits grid."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engram.schema import parse_dataclass
from engram.errors import EngramError
from engram.experiments.profile import (PROFILE_COLUMNS, PROFILE_KEY, ProfileConfig,
                                       load_profile_config, run_profile)
from engram.results import read_rows

ROOT = Path(__file__).resolve().parents[1]
DIGITS_PROFILE = ROOT / "configs" / "profile" / "digits.yaml"


def tiny(**sections) -> ProfileConfig:
    raw = {"seeds": [0, 1], "data": {"source": "digits", "limit": 300, "val_fraction": 0.2},
           "model": {"kind": "mlp", "hidden": [16]},
           "profile": {"epochs": [1], "measures": ["random", "magnitude"],
                       "aggregations": ["weight", "unit", "layer"], "thresholds": [0.0, 0.5, 1.0],
                       "importance_examples": 64}}
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    return parse_dataclass(ProfileConfig, raw)


def values(rows):
    return {tuple(r[k] for k in PROFILE_KEY): (r["fraction_replaced"], r["val_loss"],
                                               r["val_accuracy"]) for r in rows}


def test_every_curve_point_is_a_row_and_a_rerun_measures_nothing(tmp_path):
    cfg = tiny()
    report = run_profile(cfg, tmp_path, show_progress=False)
    rows = read_rows(tmp_path / "results.csv", PROFILE_COLUMNS, PROFILE_KEY)
    # 2 seeds x 1 epoch x 2 measures x (weight, unit: 2 directions; layer: model scope, 2) x 3
    assert report.rows_written == len(rows) == 2 * 2 * 6 * 3
    assert list(rows[0]) == PROFILE_COLUMNS
    assert {r["direction"] for r in rows} == {"least_first", "most_first"}
    assert {(r["aggregation"], r["scope"]) for r in rows} == {
        ("weight", "layer"), ("unit", "layer"), ("layer", "model")}
    for r in rows:
        t, f = float(r["threshold"]), float(r["fraction_replaced"])
        assert (t == 0) == (f == 0) and (t == 1) == (f == 1)
        assert r["n_classes"] == "10"
    again = run_profile(cfg, tmp_path, show_progress=False)
    assert again.rows_written == 0 and again.rows_skipped == len(rows)


def test_an_interrupted_grid_resumes_to_the_same_numbers_without_duplicates(tmp_path):
    cfg = tiny()
    run_profile(cfg, tmp_path / "whole", show_progress=False)
    whole = read_rows(tmp_path / "whole" / "results.csv", PROFILE_COLUMNS, PROFILE_KEY)
    cut = tmp_path / "cut"
    run_profile(cfg, cut, show_progress=False)
    lines = (cut / "results.csv").read_text().splitlines(keepends=True)
    (cut / "results.csv").write_text("".join(lines[:31]) + lines[31][:20])  # killed mid-row
    report = run_profile(cfg, cut, show_progress=False)
    resumed = read_rows(cut / "results.csv", PROFILE_COLUMNS, PROFILE_KEY)
    assert report.rows_written == len(whole) - 30
    assert len(resumed) == len(whole) and values(resumed) == values(whole)


def test_a_grown_grid_measures_only_what_is_new(tmp_path):
    run_profile(tiny(), tmp_path, show_progress=False)
    bigger = tiny(seeds=[0, 1, 2])
    report = run_profile(bigger, tmp_path, show_progress=False)
    assert report.rows_written == 2 * 6 * 3  # the third seed only


def test_another_setting_in_the_same_folder_is_refused(tmp_path):
    run_profile(tiny(seeds=[0]), tmp_path, show_progress=False)
    with pytest.raises(EngramError, match=r"holds another experiment \(model.hidden: \[16\] "
                                          r"there, \[8\] here\); .*only seeds, profile"):
        run_profile(tiny(seeds=[0], model={"hidden": [8]}), tmp_path, show_progress=False)


def test_profiling_leaves_the_trained_network_untouched():
    from engram.data import DATASETS, build_stream
    from engram.config import StreamConfig
    from engram.experiments.profile import TrajectoryRecorder
    from engram.experiments.harness import JobSink
    from engram.experiments.profile import profile_network, profile_id
    from engram.methods.base import Context
    from engram.models import build_model
    from engram.training import evaluate, train_task
    from engram.config import TrainConfig

    cfg = tiny(seeds=[0], profile={"measures": ["magnitude", "fisher_exact", "si", "snip"]})
    stream = build_stream(DATASETS.get("digits")(None), cfg.data,
                          StreamConfig(scenario="domain", n_tasks=1, classes_per_task=10), 0)
    task = stream.tasks[0]
    torch.manual_seed(0)
    model = build_model(cfg.model, stream.input_shape, 1, stream.head_dim)
    ctx = Context(model=model, stream=stream, train_cfg=TrainConfig(epochs=1, lr=0.1),
                  generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                  task=task, seen_tasks=[task])
    recorder = TrajectoryRecorder()
    train_task(ctx, recorder, lambda e, loss: None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]  # left by the last training step
    model.train()
    rows, reported = [], []
    sink = JobSink(rows.extend, reported.append, recorded=set(), folder=Path("unused"))
    profile_network(cfg, profile_id(cfg), 0, 1, model, task, recorder, 0.0, sink)
    assert len(rows) == sum(reported) == 4 * 6 * 3  # measures x curves x thresholds
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    # threshold 0 is the unchanged network: its loss is the plain evaluation's
    _, loss = evaluate(model, task.val)
    for r in rows:
        if float(r["threshold"]) == 0:
            assert float(r["val_loss"]) == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("classes_per_task, n_tasks", [(10, 1), (2, 5)])
def test_replacing_every_weight_gives_chance_level_loss(tmp_path, classes_per_task, n_tasks):
    """The issue's check: at threshold 1 with the default replacement, validation loss is
    within 0.1 of ln(classes); on all 10 digits and on the '0s vs 1s' subtask."""
    cfg = load_profile_config(DIGITS_PROFILE, [
        "seeds=[0]", "profile.measures=[random]", "profile.thresholds=[0.0, 1.0]",
        "profile.aggregations=[weight]", "profile.directions=[least_first]",
        f"task.classes_per_task={classes_per_task}", f"task.n_tasks={n_tasks}", "task.task=1"])
    run_profile(cfg, tmp_path, show_progress=False)
    rows = read_rows(tmp_path / "results.csv", PROFILE_COLUMNS, PROFILE_KEY)
    (last,) = [r for r in rows if float(r["threshold"]) == 1.0]
    assert int(last["n_classes"]) == classes_per_task
    assert abs(float(last["val_loss"]) - math.log(classes_per_task)) < 0.1
    (first,) = [r for r in rows if float(r["threshold"]) == 0.0]
    assert float(first["val_loss"]) < math.log(classes_per_task) - 0.5  # it did learn


def test_cli_profile_then_report(tmp_path, capsys):
    from engram.cli import main

    config = tmp_path / "p.yaml"
    config.write_text("seeds: [0, 1]\ndata: {source: digits, limit: 300, val_fraction: 0.2}\n"
                      "model: {hidden: [16]}\nprofile: {epochs: [1], thresholds: [0.0, 0.5, 1.0],"
                      " measures: [random, magnitude, inverse_magnitude], aggregations: [weight]}\n")
    out = tmp_path / "out"
    assert main(["profile", str(config), "--out", str(out), "-q"]) == 0
    assert "rows measured" in capsys.readouterr().out
    assert main(["profile-report", str(out), "--markdown"]) == 0
    text = capsys.readouterr().out
    assert "| random |" in text and "| magnitude |" in text and "baseline" in text
    assert (out / "plots" / "profile_least_first_mean_layer.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["profile", "--help-config"]) == 0
    assert "profile.measures" in capsys.readouterr().out
    assert main(["profile", str(config), "profile.measures=[nonsense]", "--out", str(out)]) == 2
    assert "profile.measures[0]: unknown importance measure 'nonsense'" in capsys.readouterr().err


@pytest.mark.slow
def test_default_digits_grid_ranks_fisher_and_magnitude_above_random(tmp_path):
    """The README's claim, on the default grid (3 seeds, about 15 s): removing the least
    important weights first, Fisher and magnitude beat random with non-overlapping t-intervals
    of the area under the loss curve, and inverse magnitude is worse than random."""
    from engram.reports.profile import ranking_table

    report = run_profile(load_profile_config(DIGITS_PROFILE), tmp_path, show_progress=False)
    assert report.rows_written >= 8 * 3 * 21 * 2 * 3
    rows = read_rows(tmp_path / "results.csv", PROFILE_COLUMNS, PROFILE_KEY)
    table = [e for e in ranking_table(rows) if e["aggregation"] == "weight"]
    auc = {e["measure"]: (e["auc_mean"], e["auc_ci"]) for e in table}
    random_low = auc["random"][0] - auc["random"][1]
    for measure in ("fisher_exact", "fisher_empirical", "magnitude"):
        assert auc[measure][0] + auc[measure][1] < random_low, measure
    assert auc["inverse_magnitude"][0] > auc["random"][0]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "profile").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_profile_configs_validate(path):
    cfg = load_profile_config(path)
    assert len(cfg.profile.measures) >= 8 and cfg.profile.thresholds[0] == 0.0


def test_a_later_epoch_added_retrains_the_same_network(tmp_path):
    """Profiling at a new epoch retrains the seed from scratch: the rows already measured at
    epoch 1 would be measured again identically (they are skipped, not duplicated)."""
    run_profile(tiny(), tmp_path / "one", show_progress=False)
    report = run_profile(tiny(profile={"epochs": [1, 2]}), tmp_path / "one", show_progress=False)
    assert report.rows_written == 2 * 2 * 6 * 3 and report.rows_skipped == 2 * 2 * 6 * 3
    run_profile(tiny(profile={"epochs": [1, 2]}), tmp_path / "both", show_progress=False)
    rows = [read_rows(tmp_path / d / "results.csv", PROFILE_COLUMNS, PROFILE_KEY)
            for d in ("one", "both")]
    assert values(rows[0]) == values(rows[1])


def test_the_profile_id_is_the_harness_run_id_of_the_same_content_as_before():
    """Folders profiled before the harness keep their rows' ids: the id of the shipped digits
    grid as the earlier hashing computed it (sha256 of the same canonical JSON)."""
    from engram.experiments.profile import profile_id

    assert profile_id(load_profile_config(DIGITS_PROFILE)) == "fc4301e334fc"


def test_seeds_in_worker_processes_give_the_same_rows_and_counts(tmp_path):
    cfg = tiny()
    run_profile(cfg, tmp_path / "one", show_progress=False)
    report = run_profile(cfg, tmp_path / "two", workers=2, show_progress=False)
    rows = [read_rows(tmp_path / d / "results.csv", PROFILE_COLUMNS, PROFILE_KEY)
            for d in ("one", "two")]
    assert report.rows_written == len(rows[1]) == 2 * 2 * 6 * 3 and report.rows_skipped == 0
    assert report.total == 2 and report.completed == 2 and not report.failures
    assert values(rows[0]) == values(rows[1])
    again = run_profile(cfg, tmp_path / "two", workers=2, show_progress=False)
    assert again.rows_written == 0 and again.skipped == 2 and again.rows_skipped == len(rows[1])


def test_a_failing_seed_is_listed_and_the_others_rows_are_kept(tmp_path, monkeypatch, capsys):
    from engram.cli import main
    from engram.experiments import profile

    real = profile._profile_seed

    def seed_one_fails(cfg, pid, seed, *args):
        if seed == 1:
            raise RuntimeError("seed 1 diverged")
        return real(cfg, pid, seed, *args)

    monkeypatch.setattr(profile, "_profile_seed", seed_one_fails)
    report = run_profile(tiny(), tmp_path, show_progress=False, raise_failures=False)
    assert [f["seed"] for f in report.failures] == [1] and report.completed == 1
    rows = read_rows(tmp_path / "results.csv", PROFILE_COLUMNS, PROFILE_KEY)
    assert {r["seed"] for r in rows} == {"0"} and report.rows_written == len(rows) == 2 * 6 * 3
    with pytest.raises(RuntimeError, match="seed 1 diverged"):
        run_profile(tiny(), tmp_path, show_progress=False)
    config = tmp_path / "p.yaml"
    config.write_text("seeds: [0, 1]\ndata: {source: digits, limit: 300, val_fraction: 0.2}\n"
                      "model: {hidden: [16]}\nprofile: {epochs: [1], thresholds: [0.0, 1.0],"
                      " measures: [random], aggregations: [weight]}\n")
    assert main(["profile", str(config), "--out", str(tmp_path / "cli"), "-q"]) == 1
    assert "1 of 2 runs failed" in capsys.readouterr().err


def test_profile_optimizer_any_torch_class_with_a_schedule(tmp_path):
    """The profiler trains with any torch.optim class and scheduler (the runner's one
    construction); adam keeps ignoring the (default sgd) momentum as before; optimizer
    settings at their defaults leave the profile id alone."""
    import dataclasses

    from engram.errors import ConfigError
    from engram.experiments.profile import ProfileTrain, profile_id

    assert ProfileTrain(optimizer="adam").train_config(2).momentum == 0.0
    assert ProfileTrain(optimizer="sgd").train_config(2).momentum == 0.9
    with pytest.raises(ConfigError, match="train.optimizer: unknown optimizer 'adamx'"):
        ProfileTrain(optimizer="adamx")
    plain = load_profile_config(DIGITS_PROFILE)
    spelled = load_profile_config(DIGITS_PROFILE, ["train.optimizer_args={}",
                                                   "train.scheduler=null"])
    assert profile_id(spelled) == profile_id(plain) == "fc4301e334fc"

    adamw = ProfileTrain(optimizer="AdamW", lr=0.01, weight_decay=0.1, scheduler="StepLR",
                         scheduler_args={"step_size": 2, "gamma": 0.5}, scheduler_step="step")
    run_profile(dataclasses.replace(tiny(seeds=[0]), train=adamw), tmp_path / "adamw",
                show_progress=False)
    run_profile(dataclasses.replace(tiny(seeds=[0]), train=ProfileTrain(optimizer="adam",
                                                                       lr=0.01)),
                tmp_path / "adam", show_progress=False)
    adamw = values(read_rows(tmp_path / "adamw" / "results.csv", PROFILE_COLUMNS, PROFILE_KEY))
    adam = values(read_rows(tmp_path / "adam" / "results.csv", PROFILE_COLUMNS, PROFILE_KEY))
    adamw, adam = ({key[1:]: v for key, v in rows.items()} for rows in (adamw, adam))  # no id
    assert adamw.keys() == adam.keys() and adamw != adam  # the same grid, other training
