"""The sliding-window memorisation experiment: network, window, shift rule, record."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.errors import ConfigError
from engram.experiments.window import (WindowConfig, WindowRecord, run_window, squared_norm_loss,
                           weight_norm, window_data, window_indices)


def small(**kw) -> WindowConfig:
    base = dict(n_points=30, x_dim=6, y_dim=3, width=6, depth=3, window=5, lr=0.05,
                threshold=1.0, max_steps=200, optimizer="sgd", record_every=1)
    base.update(kw)
    return WindowConfig(**base)


class PlainResidualNet:
    """The network written out on plain tensors (zero init): the second computation the
    nn.Module version (engram.models.residual) is checked against."""

    def __init__(self, cfg: WindowConfig) -> None:
        d, n, m = cfg.depth, cfg.width, cfg.y_dim
        self.w, self.b = torch.zeros(d, n, n), torch.zeros(d, n)
        self.w_out, self.b_out = torch.zeros(m, n), torch.zeros(m)
        for p in self.parameters():
            p.requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.w, self.b, self.w_out, self.b_out]

    def point_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x
        for i in range(self.w.shape[0]):
            h = h + torch.atan(h @ self.w[i].T + self.b[i])
        return (h @ self.w_out.T + self.b_out - y).pow(2).sum(1)

    def weight_norm(self) -> float:
        return math.sqrt(sum(float(p.detach().pow(2).sum()) for p in self.parameters()))


def test_config_checks():
    with pytest.raises(ConfigError, match="width"):
        WindowConfig(width=30)
    with pytest.raises(ConfigError, match="window"):
        WindowConfig(window=600)
    with pytest.raises(ConfigError, match="out of range"):
        WindowConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="activation"):
        WindowConfig(activation="gelu")


def test_zero_init_outputs_zeros():
    cfg = WindowConfig()
    x, _ = window_data(cfg)
    net = cfg.network()
    assert torch.equal(net(x), torch.zeros(cfg.n_points, cfg.y_dim))
    assert weight_norm(net) == 0.0


def test_residual_block_by_hand():
    cfg = WindowConfig(n_points=2, x_dim=2, y_dim=1, width=2, depth=1, window=1)
    net = cfg.network()
    with torch.no_grad():
        net.blocks[0].linear.weight[:] = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
        net.blocks[0].linear.bias[:] = torch.tensor([0.5, 0.0])
        net.head.weight[0] = torch.tensor([1.0, 1.0])
        net.head.bias[0] = 2.0
    x = torch.tensor([[1.0, 1.0]])
    # z = W x + b = (3.5, -1); h = x + atan(z); out = h0 + h1 + 2
    h = [1.0 + math.atan(3.5), 1.0 + math.atan(-1.0)]
    assert net(x).item() == pytest.approx(h[0] + h[1] + 2.0, rel=1e-6)
    y = torch.tensor([[1.0]])
    assert squared_norm_loss(net(x), y).item() == pytest.approx((h[0] + h[1] + 1.0) ** 2,
                                                                rel=1e-6)


@pytest.mark.parametrize("settings,make", [
    ({"optimizer": "adam"}, lambda params: (torch.optim.Adam(params, lr=0.01), None)),
    ({"optimizer": "AdamW", "weight_decay": 0.01, "optimizer_args": {"betas": [0.8, 0.95]},
      "scheduler": "CosineAnnealingLR", "scheduler_args": {"T_max": 300}},
     lambda params: (lambda opt: (opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)))(
         torch.optim.AdamW(params, lr=0.01, weight_decay=0.01, betas=(0.8, 0.95)))),
], ids=["adam", "adamw-cosine"])
def test_an_optimizer_run_equals_a_plain_tensor_loop(settings, make):
    """The default optimizer, and any torch.optim class with a scheduler stepped after every
    update: the run's shifts and weight norms equal a hand-written loop on plain tensors with
    the torch classes (one update per step, on the checked window)."""
    cfg = small(max_steps=300, threshold=2.0, lr=0.01, **settings)
    rec = run_window(cfg)
    x, y = window_data(cfg)
    net = PlainResidualNet(cfg)
    opt, scheduler = make(net.parameters())
    start, shifts, norms = 0, [], [0.0]
    for s in range(cfg.max_steps):
        idx = window_indices(start, cfg.window, cfg.n_points)
        with torch.no_grad():
            if net.point_loss(x[idx], y[idx]).mean().item() < cfg.threshold:
                shifts.append(s)
                start = (start + cfg.shift) % cfg.n_points
                idx = window_indices(start, cfg.window, cfg.n_points)
        opt.zero_grad()
        net.point_loss(x[idx], y[idx]).mean().backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        norms.append(net.weight_norm())
    assert len(shifts) > 5
    assert rec.shift_steps == shifts
    np.testing.assert_allclose(rec.weight_norm, norms, rtol=1e-5)


def test_the_last_step_is_always_recorded():
    rec = run_window(small(max_steps=25, threshold=2.0, record_every=10))
    assert rec.steps.tolist() == [0, 10, 20, 25]


def test_zero_init_blocks_learn():
    """Zero init: the blocks' gradient is zero at step 0 (zero W_out), but W_out learns first
    and from then on every block's weights move."""
    cfg = small(max_steps=3, threshold=0.0)
    rec = run_window(cfg)
    assert rec.weight_norm[0] == 0.0 and rec.weight_norm[1] > 0
    # replay the run's steps by hand to look at the weights
    x, y = window_data(cfg)
    net = PlainResidualNet(cfg)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr)
    idx = window_indices(0, cfg.window, cfg.n_points)
    for step in range(3):
        opt.zero_grad()
        net.point_loss(x[idx], y[idx]).mean().backward()
        if step == 0:
            assert torch.count_nonzero(net.w.grad) == 0 and torch.count_nonzero(net.w_out.grad)
        opt.step()
    for i in range(cfg.depth):
        assert torch.count_nonzero(net.w[i]) > 0 and torch.count_nonzero(net.b[i]) > 0
    assert net.weight_norm() == pytest.approx(rec.weight_norm[-1], rel=1e-5)


def test_window_wraps():
    assert window_indices(28, 5, 30).tolist() == [28, 29, 0, 1, 2]
    # threshold above any loss: the window shifts at every step and wraps around
    rec = run_window(small(threshold=1e9, shift=4, max_steps=20))
    assert rec.shift_steps == list(range(20))
    assert rec.window_start.tolist() == [(4 * t) % 30 for t in range(21)]
    assert rec.relearn_steps == [0] + [1] * 19


def test_threshold_zero_never_shifts():
    rec = run_window(small(threshold=0.0, max_steps=50))
    assert rec.shift_steps == [] and set(rec.window_start.tolist()) == {0}


def test_shift_exactly_when_window_mean_below_threshold():
    cfg = small(max_steps=300, threshold=2.0)
    rec = run_window(cfg)
    assert len(rec.shift_steps) > 3
    means = rec.window_mean_loss()  # row t: the loss the step-t check sees
    shifted = set(rec.shift_steps)
    checked = 0
    for t in range(cfg.max_steps):
        if abs(means[t] - cfg.threshold) < 1e-4:  # too close to call in float32
            continue
        assert (t in shifted) == (means[t] < cfg.threshold), t
        checked += 1
        if t in shifted:
            assert rec.window_start[t + 1] == (rec.window_start[t] + cfg.shift) % cfg.n_points
        else:
            assert rec.window_start[t + 1] == rec.window_start[t]
    assert checked > cfg.max_steps - 5


def test_shifts_and_relearn_steps_match_the_recorded_window_positions():
    """Read the shifts off the recorded window position (every step) and count the steps
    each window was trained on: the same as the shift and relearn lists."""
    rec = run_window(small(max_steps=400, threshold=2.0))
    moved = [t for t in range(len(rec.window_start) - 1)
             if rec.window_start[t + 1] != rec.window_start[t]]
    assert rec.shift_steps == moved and len(moved) > 3
    trained_on, previous = [], 0
    for t in moved:
        trained_on.append(t - previous)
        previous = t
    assert rec.relearn_steps == trained_on


def test_point_loss_row_equals_direct_computation():
    cfg = small(max_steps=40, threshold=2.0, record_every=7)
    rec = run_window(cfg)
    assert rec.steps.tolist() == [0, 7, 14, 21, 28, 35, 40]
    # replay to step 21 with the recorded windows, then compute every point's loss directly
    x, y = window_data(cfg)
    net = PlainResidualNet(cfg)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr)
    full = run_window(small(max_steps=21, threshold=2.0))
    starts = full.window_start
    shifted = set(full.shift_steps)
    for s in range(21):
        start = starts[s + 1] if s in shifted else starts[s]
        idx = window_indices(int(start), cfg.window, cfg.n_points)
        opt.zero_grad()
        net.point_loss(x[idx], y[idx]).mean().backward()
        opt.step()
    with torch.no_grad():
        direct = net.point_loss(x, y).numpy()
    np.testing.assert_allclose(rec.point_loss[3], direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full.point_loss[-1], direct, rtol=1e-5, atol=1e-6)


def test_npz_round_trip_and_tidy_rows(tmp_path):
    rec = run_window(small(max_steps=100, threshold=2.0, record_every=10))
    path = tmp_path / "window.npz"
    rec.save_npz(path)
    back = WindowRecord.load_npz(path)
    for key in ("steps", "window_start", "weight_norm"):
        np.testing.assert_array_equal(getattr(back, key), getattr(rec, key))
        assert getattr(back, key).dtype == getattr(rec, key).dtype
    # point losses are stored as float16: equal to about 3 significant digits
    np.testing.assert_allclose(back.point_loss, rec.point_loss, rtol=1e-3, atol=1e-4)
    assert back.point_loss.dtype == np.float32
    assert back.shift_steps == rec.shift_steps and back.relearn_steps == rec.relearn_steps
    assert (back.window, back.seed) == (rec.window, rec.seed)
    rows = back.tidy_rows("plain")
    assert set(rows[0]) == {"variant", "seed", "step", "metric", "value"}
    relearn = [r for r in rows if r["metric"] == "relearn_steps"]
    assert [r["step"] for r in relearn] == rec.shift_steps
    assert [r["value"] for r in relearn] == [float(v) for v in rec.relearn_steps]
    norms = [r for r in rows if r["metric"] == "weight_norm"]
    assert [r["step"] for r in norms] == list(range(0, 101, 10))
    assert len([r for r in rows if r["metric"] == "window_mean_loss"]) == 11


def test_default_config_runs_and_weight_norm_grows():
    rec = run_window(WindowConfig(max_steps=300, record_every=1))
    assert rec.point_loss.shape == (301, 500) and rec.point_loss.dtype == np.float32
    assert rec.weight_norm[0] == 0.0
    assert rec.weight_norm[-1] > rec.weight_norm[1] > 0
    assert rec.window_mean_loss()[-1] < rec.window_mean_loss()[0]


# ----------------------------------------------------------------------------- methods ride along

def test_weight_decay_pulls_the_weights_in():
    """L2 (the optimizer's weight decay) changes every update: smaller weights than plain."""
    plain = run_window(small(max_steps=100, threshold=2.0))
    l2 = run_window(small(max_steps=100, threshold=2.0, weight_decay=0.5))
    assert l2.weight_norm[1] == plain.weight_norm[1]  # decay of zero weights is zero
    assert l2.weight_norm[2] < plain.weight_norm[2]
    assert l2.weight_norm[-1] < plain.weight_norm[-1]


def test_dropout_trains_differently_but_checks_and_records_without_dropout():
    plain = run_window(small(max_steps=200, threshold=2.0))
    dropped = run_window(small(max_steps=200, threshold=2.0, dropout=0.5))
    assert not np.allclose(dropped.weight_norm[5:], plain.weight_norm[5:])
    # the shift rule sees the eval-mode window loss, the same numbers that are recorded:
    # it shifts exactly when the recorded window mean is below the threshold
    means = dropped.window_mean_loss()
    shifted = set(dropped.shift_steps)
    assert len(shifted) > 3
    for t in range(200):
        if abs(means[t] - 2.0) > 1e-4:
            assert (t in shifted) == (means[t] < 2.0), t


def test_a_registered_method_takes_part_in_every_step():
    from engram.config import parse_method

    cfg = small(max_steps=300, threshold=2.0)
    plain = run_window(cfg)
    cbp = run_window(cfg, parse_method("continual_backprop", {
        "replacement_rate": 0.2, "maturity": 5, "init": "default"}, "m"))
    assert not np.allclose(cbp.weight_norm, plain.weight_norm)
    replay = run_window(cfg, parse_method("replay", {"memory": 10, "replay_batch_size": 4},
                                          "m"))
    assert not np.allclose(replay.weight_norm, plain.weight_norm)
    # naive is plain: the default method changes nothing
    naive = run_window(cfg, parse_method("naive", {}, "m"))
    np.testing.assert_array_equal(naive.point_loss, plain.point_loss)


def test_relearn_by_pass_means_each_complete_pass():
    from engram.reports.window import relearn_by_pass

    rec = WindowRecord(steps=np.zeros(1, np.int64), point_loss=np.zeros((1, 4), np.float32),
                       window_start=np.zeros(1, np.int64), weight_norm=np.zeros(1),
                       relearn_steps=[153, 2, 4, 6, 0, 1, 1, 1, 1, 9], window=2)
    # the first count (the first window learned from scratch) is left out
    np.testing.assert_allclose(relearn_by_pass(rec, n_points=4, shift=1), [3.0, 1.0])
    # shift 3 on 4 points: a pass is ceil(4 / 3) = 2 shifts
    np.testing.assert_allclose(relearn_by_pass(rec, n_points=4, shift=3), [3, 3, 1, 1])


# ----------------------------------------------------------------------------- experiments

def test_experiment_defaults_and_variants():
    from engram.experiments.window import load_window_experiment, parse_window_experiment

    default = load_window_experiment(None)
    assert [v.name for v in default.variants] == ["plain"]
    assert default.variants[0].config == WindowConfig()
    assert default.variants[0].method.name == "naive"
    exp = parse_window_experiment({
        "seeds": [0, 1], "run": {"max_steps": 100, "window": 20},
        "variants": ["plain", {"name": "l2", "weight_decay": 0.01},
                     {"name": "cbp", "method": {"name": "continual_backprop", "init": "zeros"}}]})
    plain, l2, cbp = exp.variants
    assert plain.config == WindowConfig(max_steps=100, window=20)
    assert l2.config == WindowConfig(max_steps=100, window=20, weight_decay=0.01)
    assert cbp.method.name == "continual_backprop" and cbp.method.params.init == "zeros"
    over = load_window_experiment(None, ["run.max_steps=7", "variants=[plain, {name: d, "
                                         "dropout: 0.2}]"])
    assert [v.config.max_steps for v in over.variants] == [7, 7]
    assert over.variants[1].config.dropout == 0.2


@pytest.mark.parametrize("raw, message", [
    ({"variants": [{"name": "a"}, {"name": "a"}]}, "used twice"),
    ({"variants": [{"name": "a b"}]}, "names files"),
    ({"variants": [{"weight_decay": 1}]}, "needs a name"),
    ({"variants": [{"name": "a", "wieght_decay": 1}]}, "wieght_decay"),
    ({"variants": [{"name": "a", "method": {"name": "nope"}}]}, "nope"),
    ({"run": {"seed": 3}}, "seeds"),
    ({"run": {"window": 900}}, "window"),
    ({"animate": ["b"]}, "no variant named 'b'"),
    ({"seeds": []}, "seeds"),
    ({"seeds": [1, 1]}, "repeats a seed"),
    ({"variants": [{"name": "r", "method": {"name": "replay", "policy": "herding"}}]},
     "reservoir"),
])
def test_experiment_config_errors_name_the_problem(raw, message):
    from engram.experiments.window import parse_window_experiment

    with pytest.raises(ConfigError, match=message):
        parse_window_experiment(raw)


def _tiny_experiment_raw() -> dict:
    return {"seeds": [0, 1], "frames": 5,
            "run": {"n_points": 30, "x_dim": 6, "y_dim": 3, "width": 6, "depth": 2,
                    "window": 5, "threshold": 2.0, "lr": 0.01, "max_steps": 150,
                    "record_every": 10},
            "variants": ["plain", {"name": "l2", "weight_decay": 0.1}]}


def _tiny_experiment():
    from engram.experiments.window import parse_window_experiment

    return parse_window_experiment(_tiny_experiment_raw())


def test_experiment_writes_rows_and_npz_and_resumes_without_duplicates(tmp_path):
    from engram.results import read_rows
    from engram.experiments.window import (WINDOW_COLUMNS, WINDOW_KEY, record_path,
                               run_window_experiment, window_run_id)

    exp = _tiny_experiment()
    report = run_window_experiment(exp, tmp_path, show_progress=False)
    assert (report.completed, report.skipped) == (4, 0)
    csv = tmp_path / "results.csv"
    rows = read_rows(csv, WINDOW_COLUMNS, WINDOW_KEY)
    assert set(WINDOW_COLUMNS) <= set(rows[0]) and {"variant", "seed", "step", "metric",
                                                    "value"} <= set(rows[0])
    for variant in exp.variants:
        for seed in exp.seeds:
            rec = report.records[variant.name][seed]
            mine = [r for r in rows if r["run_id"] == window_run_id(variant, seed)]
            relearn = [r for r in mine if r["metric"] == "relearn_steps"]
            assert [int(r["step"]) for r in relearn] == rec.shift_steps
            assert len([r for r in mine if r["metric"] == "weight_norm"]) == 16
            assert record_path(tmp_path, variant, seed).is_file()
    again = run_window_experiment(exp, tmp_path, show_progress=False)
    assert (again.completed, again.skipped) == (0, 4)
    # a killed run: cut the table in the middle of the last run's rows
    lines = csv.read_text().splitlines(keepends=True)
    csv.write_text("".join(lines[:len(lines) - 40]))
    resumed = run_window_experiment(exp, tmp_path, show_progress=False)
    assert (resumed.completed, resumed.skipped) == (1, 3)
    assert csv.read_text().splitlines() == [line.rstrip("\n") for line in lines]


def test_parallel_workers_give_the_same_rows(tmp_path):
    from engram.experiments.window import run_window_experiment

    exp = _tiny_experiment()
    run_window_experiment(exp, tmp_path / "one", show_progress=False)
    # with the progress bar: worker processes report steps through a queue
    run_window_experiment(exp, tmp_path / "two", workers=2, show_progress=True)
    one = sorted((tmp_path / "one" / "results.csv").read_text().splitlines())
    two = sorted((tmp_path / "two" / "results.csv").read_text().splitlines())
    assert one == two


def test_pictures_are_written(tmp_path):
    from PIL import Image

    from engram.experiments.window import run_window_experiment
    from engram.reports.window import write_window_pictures

    exp = _tiny_experiment()
    report = run_window_experiment(exp, tmp_path, show_progress=False)
    written = write_window_pictures(exp, report.records, tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["plain.gif", "relearn_comparison.png", "summary_l2.png",
                     "summary_plain.png"]
    with Image.open(tmp_path / "plain.gif") as gif:
        assert gif.n_frames == exp.frames


def test_mp4_without_ffmpeg_is_a_clear_error(monkeypatch):
    from matplotlib import animation

    from engram.reports.window import animation_writer

    monkeypatch.setattr(animation.writers, "is_available", lambda name: False)
    with pytest.raises(ConfigError, match="ffmpeg"):
        animation_writer("mp4", 10)


def test_cli_window_runs_and_prints_the_summary(tmp_path, capsys):
    from engram.cli import main

    out = tmp_path / "w"
    assert main(["window", "run.max_steps=120", "run.n_points=40", "run.window=10",
                 "run.record_every=10", "--out", str(out), "--no-animation", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "relearn steps per shift" in printed and "plain" in printed
    assert (out / "plots" / "summary_plain.png").is_file()
    assert not (out / "plain.gif").exists()


def test_shipped_window_configs_validate_and_run_short(tmp_path):
    from engram.experiments.window import load_window_experiment, run_window_experiment

    root = Path(__file__).resolve().parents[1] / "configs" / "window"
    paths = sorted(root.glob("*.yaml"))
    assert paths
    for path in paths:
        exp = load_window_experiment(path, ["run.max_steps=30", "seeds=[0]"])
        report = run_window_experiment(exp, tmp_path / path.stem, show_progress=False)
        assert report.completed == len(exp.variants)


def test_a_diverging_variant_is_named(tmp_path):
    from engram.errors import DivergenceError
    from engram.experiments.window import parse_window_experiment, run_window_experiment

    exp = parse_window_experiment({"run": {"n_points": 20, "x_dim": 4, "y_dim": 2, "width": 4,
                                           "window": 5, "optimizer": "sgd", "lr": 100.0,
                                           "max_steps": 200},
                                   "variants": [{"name": "hot"}]})
    with pytest.raises(DivergenceError, match="hot seed 0: .*diverged"):
        run_window_experiment(exp, tmp_path, show_progress=False)
    assert not list((tmp_path / "runs").glob("hot-seed0*"))


def _hot_and_plain_raw() -> dict:
    """Two variants: plain learns, hot (lr 100 with sgd) diverges on every seed."""
    return {"seeds": [0, 1], "run": {"n_points": 20, "x_dim": 4, "y_dim": 2, "width": 4,
                                     "window": 5, "optimizer": "sgd", "lr": 0.05,
                                     "max_steps": 100, "record_every": 10},
            "variants": ["plain", {"name": "hot", "lr": 100.0}]}


def test_a_diverging_variant_fails_alone(tmp_path):
    """raise_failures=False: the diverging runs are in the report and failures.jsonl, named
    by variant and seed; the other variant's runs finish and their records are returned."""
    import json

    from engram.experiments.window import parse_window_experiment, run_window_experiment

    exp = parse_window_experiment(_hot_and_plain_raw())
    report = run_window_experiment(exp, tmp_path, show_progress=False, raise_failures=False)
    assert (report.total, report.completed, report.skipped) == (4, 2, 0)
    assert sorted((f["label"], f["seed"]) for f in report.failures) == [("hot", 0), ("hot", 1)]
    assert all(f["error"].startswith("DivergenceError: window run diverged")
               for f in report.failures)
    assert list(report.records) == ["plain"] and len(report.records["plain"]) == 2
    listed = (tmp_path / "failures.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["seed"] for line in listed) == [0, 1]


def test_cli_window_lists_a_diverging_variant_and_summarises_the_rest(tmp_path, capsys):
    import yaml

    from engram.cli import main

    config = tmp_path / "hot.yaml"
    config.write_text(yaml.safe_dump(_hot_and_plain_raw()))
    out = tmp_path / "w"
    assert main(["window", str(config), "--out", str(out), "--no-animation", "-q"]) == 1
    printed = capsys.readouterr()
    assert "2 runs done, 0 already there" in printed.out
    assert "relearn steps per shift" in printed.out and "\nplain " in printed.out
    assert "2 of 4 runs failed" in printed.err
    assert "hot seed 0: DivergenceError: window run diverged" in printed.err
    assert (out / "plots" / "summary_plain.png").is_file()
    assert not (out / "plots" / "summary_hot.png").exists()


def test_run_ids_are_unchanged():
    """The run id hashes the same description as before the harness (variant name, the
    run's settings with the seed, the method and its parameters), so folders written
    before keep their ids and a rerun skips their runs."""
    from engram.experiments.window import parse_window_experiment, window_run_id

    exp = parse_window_experiment({"run": {"n_points": 30, "window": 5, "max_steps": 150},
                                   "variants": ["plain", {"name": "replay", "dropout": 0.1,
                                                          "method": {"name": "replay",
                                                                     "memory": 20}}]})
    plain, replay = exp.variants
    assert [window_run_id(plain, 0), window_run_id(plain, 3)] == ["f592f61ae6e9",
                                                                  "b4eb70855eaa"]
    assert [window_run_id(replay, 0), window_run_id(replay, 3)] == ["4b196f1262bb",
                                                                    "97ab33266aef"]


def test_a_changed_config_is_refused_and_twin_variants_both_run(tmp_path):
    from engram.errors import EngramError
    from engram.results import read_rows
    from engram.experiments.window import (WINDOW_COLUMNS, WINDOW_KEY, parse_window_experiment,
                               run_window_experiment)

    raw = _tiny_experiment_raw()
    first = run_window_experiment(parse_window_experiment(raw), tmp_path, show_progress=False)
    raw["run"]["max_steps"] = 50
    with pytest.raises(EngramError, match=r"another experiment \(run.max_steps: 150 there, 50 "):
        run_window_experiment(parse_window_experiment(raw), tmp_path, show_progress=False)
    raw["run"]["max_steps"] = 150
    again = run_window_experiment(parse_window_experiment(raw), tmp_path, show_progress=False)
    assert again.skipped == 4 and again.records["plain"][0].steps[-1] == 150
    np.testing.assert_array_equal(again.records["plain"][0].weight_norm,
                                  first.records["plain"][0].weight_norm)
    # two variants with the same settings are two runs, each with its rows
    twins = {**raw, "seeds": [0], "variants": ["plain", {"name": "baseline",
                                                         "weight_decay": 0.0}]}
    report = run_window_experiment(parse_window_experiment(twins), tmp_path / "twins",
                                   show_progress=False)
    assert report.completed == 2
    rows = read_rows(tmp_path / "twins" / "results.csv", WINDOW_COLUMNS, WINDOW_KEY)
    done = {r["variant"] for r in rows if r["metric"] == "run_complete"}
    assert done == {"plain", "baseline"}


def test_adaptable_contribution_on_zero_rows_is_not_nan():
    from engram.config import parse_method

    cfg = small(max_steps=150, threshold=2.0)
    rec = run_window(cfg, parse_method("continual_backprop", {
        "utility": "adaptable_contribution", "init": "zeros", "maturity": 5,
        "replacement_rate": 0.1}, "m"))
    assert np.isfinite(rec.weight_norm).all()


@pytest.mark.parametrize("memory,steps", [(20, 25), (20, 300), (100, 300)])
def test_replay_memory_holds_distinct_points(monkeypatch, memory, steps):
    """Each point is offered to the reservoir once, when it is first in a window trained on,
    so the memory holds min(memory, points seen) distinct points, all of them points seen.
    threshold 1e9: the window moves on every step (300 steps: ten passes over 30 points)."""
    from engram.config import parse_method
    from engram.methods.replay import Replay

    learners = []
    real_make_batch = Replay.make_batch

    def keep(self, batch, ctx):
        learners.append(self)
        return real_make_batch(self, batch, ctx)

    monkeypatch.setattr(Replay, "make_batch", keep)
    cfg = small(threshold=1e9, max_steps=steps)
    record = run_window(cfg, parse_method("replay", {"memory": memory, "replay_batch_size": 4},
                                          "m"))
    # step s trains on the window the check after it sees: window_start[s + 1]
    seen = torch.cat([window_indices(int(start), cfg.window, cfg.n_points)
                      for start in record.window_start[1:]]).unique()
    replay = learners[-1]
    stored = replay.buffer.x[:replay.n_filled]
    assert len(torch.unique(stored, dim=0)) == len(stored) == min(memory, len(seen))
    x, _ = window_data(cfg)
    assert all(any(torch.equal(row, p) for p in x[seen]) for row in stored)


@pytest.mark.parametrize("settings,needle", [
    ({"optimizer": "adamx"}, "optimizer: unknown optimizer 'adamx'"),
    ({"optimizer": "adam", "optimizer_args": {"nesterov": True}},
     "optimizer_args.nesterov: Adam takes no argument 'nesterov'"),
    ({"scheduler": "steplr"}, "scheduler_args: StepLR needs step_size"),
])
def test_a_bad_window_optimizer_setting_names_the_key(settings, needle):
    with pytest.raises(ConfigError, match=needle):
        small(**settings)


def test_window_optimizer_settings_at_their_defaults_keep_the_run_id():
    from engram.config import MethodSpec
    from engram.experiments.window import WindowVariant, window_run_id

    plain = WindowVariant("plain", small(), MethodSpec("naive", None))
    spelled = WindowVariant("plain", small(optimizer_args={}, scheduler=None, scheduler_args={}),
                            MethodSpec("naive", None))
    changed = WindowVariant("plain", small(optimizer_args={"nesterov": True, "momentum": 0.9}),
                            MethodSpec("naive", None))
    assert window_run_id(spelled, 0) == window_run_id(plain, 0) != window_run_id(changed, 0)
