"""engram.reports.profile: curve summaries, the ranking table's statistics and the profile
figures, on profile rows written by hand (every value a string, as read_rows returns)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from engram.errors import DataError
from engram.reports.profile import (PROFILE_COLUMNS, curve_summaries, format_ranking_table,
                                      holm, max_safe_threshold, paired_test, profile_figure,
                                      ranking_table, t_interval, write_profile_plots)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GRID = [0.0, 0.25, 0.5, 0.75, 1.0]
T_975_4 = 2.776  # t_{0.975, 4}: 5 seeds, from a t table


def curve_rows(measure: str, seed: int, losses, thresholds=GRID, fractions=None, epoch=2,
               aggregation="weight", reducer="mean", scope="layer", direction="least_first",
               n_classes=10) -> list[dict[str, str]]:
    """One profile curve: a row per threshold, all columns of PROFILE_COLUMNS, as strings.
    fraction_replaced defaults to the threshold (the weight aggregation)."""
    fractions = thresholds if fractions is None else fractions
    assert len(losses) == len(thresholds) == len(fractions)
    return [{k: str(v) for k, v in dict(
        seed=seed, epoch=epoch, measure=measure, aggregation=aggregation, reducer=reducer,
        scope=scope, direction=direction, threshold=t, fraction_replaced=f, train_loss=0.1,
        val_loss=loss, val_accuracy=0.5, n_classes=n_classes).items()}
        for t, f, loss in zip(thresholds, fractions, losses)]


def flat(measure: str, seed: int, auc: float, **kw) -> list[dict[str, str]]:
    """A curve whose loss is `auc` at every threshold of 0..1, so its area is `auc`."""
    return curve_rows(measure, seed, [auc] * len(GRID), **kw)


def test_rows_have_the_profile_columns():
    row = curve_rows("random", 0, [1.0] * 5)[0]
    assert list(row) == PROFILE_COLUMNS


# --------------------------------------------------------------------------- curve summaries


def test_auc_is_the_trapezoid_area_under_loss_against_fraction_replaced():
    # Unit-style curve: thresholds count groups, fractions count weights (they differ).
    thresholds = [0.0, 0.5, 0.25, 1.0]           # out of order on purpose
    fractions = [0.0, 0.6, 0.2, 1.0]
    losses = [0.1, 0.5, 0.2, 2.3]
    rows = curve_rows("magnitude", 0, losses, thresholds, fractions, aggregation="unit")
    (s,) = curve_summaries(rows)
    # sorted by threshold: x = (0, .2, .6, 1), y = (.1, .2, .5, 2.3)
    by_hand = 0.2 * (0.1 + 0.2) / 2 + 0.4 * (0.2 + 0.5) / 2 + 0.4 * (0.5 + 2.3) / 2
    assert s["auc"] == pytest.approx(by_hand)  # 0.03 + 0.14 + 0.56 = 0.73
    assert by_hand == pytest.approx(0.73)
    (s_t,) = curve_summaries(rows, x="threshold")  # x = (0, .25, .5, 1)
    assert s_t["auc"] == pytest.approx(0.25 * 0.15 + 0.25 * 0.35 + 0.5 * 1.4)
    assert s["base_loss"] == 0.1 and s["n_points"] == 4 and s["complete"]
    assert (s["epoch"], s["seed"], s["measure"], s["aggregation"]) == (2, 0, "magnitude", "unit")


def test_max_safe_threshold_stops_at_the_first_rise_past_the_margin():
    losses = [1.0, 1.05, 1.09, 1.2, 1.0]  # rises past 1.1 at t=0.75; the later dip does not count
    rows = curve_rows("fisher_exact", 1, losses)
    (s,) = curve_summaries(rows, margin=0.1)
    assert s["max_safe_threshold"] == 0.5
    (s,) = curve_summaries(rows, margin=0.25)  # never rises past 1.25
    assert s["max_safe_threshold"] == 1.0
    (s,) = curve_summaries(rows, margin=0.01)  # rises at the first step
    assert s["max_safe_threshold"] == 0.0


def test_max_safe_threshold_of_a_curve_that_never_rises_is_its_last_threshold():
    assert max_safe_threshold(GRID, [2.0, 1.9, 2.05, 2.1, 2.0], margin=0.1) == 1.0
    assert math.isnan(max_safe_threshold([0.25, 0.5], [1.0, 1.0], margin=0.1))  # no t = 0


def test_a_curve_missing_thresholds_is_marked_incomplete_and_left_out_of_the_ranking():
    rows = (flat("random", 0, 1.0) + flat("magnitude", 0, 0.5)
            + curve_rows("magnitude", 1, [0.5, 0.5, 0.5], GRID[:3]) + flat("random", 1, 1.0))
    summaries = {(s["measure"], s["seed"]): s for s in curve_summaries(rows)}
    assert not summaries[("magnitude", 1)]["complete"]
    assert all(s["complete"] for k, s in summaries.items() if k != ("magnitude", 1))
    table = {e["measure"]: e for e in ranking_table(rows)}
    assert table["magnitude"]["seeds"] == [0] and table["random"]["seeds"] == [0, 1]


def test_a_threshold_written_twice_or_a_missing_column_is_a_data_error():
    rows = flat("random", 0, 1.0)
    with pytest.raises(DataError, match="threshold twice"):
        curve_summaries(rows + rows[:1])
    with pytest.raises(DataError, match="val_loss"):
        curve_summaries([{k: v for k, v in r.items() if k != "val_loss"} for r in rows])
    with pytest.raises(DataError, match="not a number"):
        curve_summaries([dict(rows[0], val_loss="")])


# --------------------------------------------------------------------------- statistics


def test_t_interval_of_five_seeds_matches_the_t_table():
    mean, half = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    s = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + 1 + 4) / 4)  # sample sd, ddof=1
    assert mean == 3.0
    assert half == pytest.approx(T_975_4 * s / math.sqrt(5), abs=1e-3)  # 1.963
    assert half == pytest.approx(1.963, abs=1e-3)
    # not ±1 SE, which is 2.776 times narrower
    assert half > 2.7 * s / math.sqrt(5)


def test_t_interval_is_nan_with_fewer_than_two_values():
    mean, half = t_interval([0.7])
    assert mean == 0.7 and math.isnan(half)
    assert all(math.isnan(v) for v in t_interval([]))


def test_ranking_ci_over_five_seeds_is_computed_by_hand():
    aucs = [0.50, 0.55, 0.45, 0.60, 0.40]
    rows = [r for seed, a in enumerate(aucs) for r in flat("magnitude", seed, a)]
    (entry,) = ranking_table(rows)
    mean = sum(aucs) / 5
    s = math.sqrt(sum((a - mean) ** 2 for a in aucs) / 4)
    assert entry["auc_mean"] == pytest.approx(0.5)
    assert entry["auc_ci"] == pytest.approx(T_975_4 * s / math.sqrt(5), abs=1e-3)
    assert entry["n_seeds"] == 5 and entry["seeds"] == [0, 1, 2, 3, 4]
    # flat curves never rise: every seed's max safe threshold is 1, with no spread
    assert entry["safe_mean"] == 1.0 and entry["safe_ci"] == 0.0


def test_paired_test_against_the_formula():
    a, b = [0.40, 0.35, 0.50, 0.42, 0.38], [1.0, 0.9, 1.1, 1.05, 0.95]
    d = np.subtract(a, b)
    out = paired_test(a, b)
    t_by_hand = d.mean() / (d.std(ddof=1) / math.sqrt(5))
    assert out["t"] == pytest.approx(t_by_hand) and out["t"] < 0
    assert out["diff_mean"] == pytest.approx(d.mean())
    assert out["diff_ci"] == pytest.approx(T_975_4 * d.std(ddof=1) / math.sqrt(5), abs=1e-3)
    assert out["d_z"] == pytest.approx(d.mean() / d.std(ddof=1))
    assert (out["n"], out["n_below"], out["n_above"]) == (5, 5, 0)
    assert out["p"] < 0.001
    one = paired_test([0.4], [1.0])
    assert one["n"] == 1 and math.isnan(one["p"]) and math.isnan(one["diff_ci"])


def test_holm_on_hand_made_p_values():
    # sorted: .005*4 = .02, .01*3 = .03, .03*2 = .06, .04*1 = .04 -> raised to .06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    adjusted = holm([0.02, math.nan, 0.04])  # nan: no test, not counted in m = 2
    assert adjusted[0] == pytest.approx(0.04) and adjusted[2] == pytest.approx(0.04)
    assert math.isnan(adjusted[1])
    assert holm([]) == []


# --------------------------------------------------------------------------- ranking


def three_measures(direction: str = "least_first", n_seeds: int = 5) -> list[dict[str, str]]:
    """magnitude always below random by ~0.3, inverse_magnitude always above by ~0.4; the
    per-seed offsets differ so the differences have a spread."""
    rows = []
    for seed in range(n_seeds):
        base = 1.0 + 0.1 * seed
        rows += flat("random", seed, base, direction=direction)
        rows += flat("magnitude", seed, base - 0.3 - 0.02 * seed, direction=direction)
        rows += flat("inverse_magnitude", seed, base + 0.4 + 0.03 * (seed % 2),
                     direction=direction)
    return rows


def test_ranking_puts_the_consistently_better_measure_first_with_the_right_sign():
    table = ranking_table(three_measures())
    assert [e["measure"] for e in table] == ["magnitude", "random", "inverse_magnitude"]
    assert [e["rank"] for e in table] == [1, 2, 3]
    mag, rnd, inv = table
    assert mag["diff_mean"] < 0 and mag["t"] < 0 and mag["n_better"] == 5 and mag["n_pairs"] == 5
    assert mag["diff_mean"] + mag["diff_ci"] < 0  # the interval excludes 0
    assert mag["p"] < 0.05
    assert inv["diff_mean"] > 0 and inv["t"] > 0 and inv["n_better"] == 0
    assert rnd["n_pairs"] == 0 and math.isnan(rnd["p"]) and math.isnan(rnd["p_holm"])
    # Holm across the two measures compared with random
    assert [mag["p_holm"], inv["p_holm"]] == pytest.approx(holm([mag["p"], inv["p"]]))
    assert mag["p_holm"] >= mag["p"]
    assert all((e["epoch"], e["aggregation"], e["reducer"], e["scope"], e["direction"])
               == (2, "weight", "mean", "layer", "least_first") for e in table)


def test_most_first_ranks_the_highest_auc_first_and_counts_higher_as_better():
    table = ranking_table(three_measures("most_first"), direction="most_first")
    assert [e["measure"] for e in table] == ["inverse_magnitude", "random", "magnitude"]
    inv, _, mag = table
    assert inv["n_better"] == 5 and mag["n_better"] == 0
    assert ranking_table(three_measures("most_first")) == []  # no least_first rows
    with pytest.raises(ValueError, match="direction"):
        ranking_table(three_measures(), direction="sideways")


def test_ranking_pairs_only_the_seeds_shared_with_random():
    rows = three_measures(n_seeds=3) + flat("magnitude", 7, 0.1)  # seed 7: no random curve
    mag = next(e for e in ranking_table(rows) if e["measure"] == "magnitude")
    assert mag["n_seeds"] == 4 and mag["n_pairs"] == 3


def test_blocks_are_separate_per_epoch_aggregation_reducer_and_scope():
    rows = three_measures(n_seeds=2)
    rows += [dict(r, epoch="4") for r in rows] + [dict(r, aggregation="unit") for r in rows]
    blocks = {(e["epoch"], e["aggregation"]) for e in ranking_table(rows)}
    assert blocks == {(2, "weight"), (4, "weight"), (2, "unit")}
    assert len(ranking_table(rows)) == 3 * 3


def test_format_shows_intervals_tests_and_ranks():
    text = format_ranking_table(ranking_table(three_measures()))
    lines = text.splitlines()
    assert lines[0].startswith("epoch 2, weight aggregation, mean reducer, layer-wise")
    assert "lower AUC is better" in lines[0]
    body = [line.split() for line in lines[3:6]]
    assert [cells[1] for cells in body] == ["magnitude", "random", "inverse_magnitude"]
    assert "±" in lines[3] and "5/5" in lines[3] and "baseline" in lines[4]
    assert "t-interval" in text and "Holm" in text and "within 0.1 of" in text
    assert "within 0.25 of" in format_ranking_table(ranking_table(three_measures(), margin=0.25))
    md = format_ranking_table(ranking_table(three_measures()), markdown=True)
    assert md.startswith("**epoch 2") and "| 1 | magnitude | 5 |" in md


def test_format_says_n_a_with_one_seed():
    table = ranking_table(three_measures(n_seeds=1))
    text = format_ranking_table(table)
    mag = next(line for line in text.splitlines() if " magnitude " in line)
    assert "CI n/a" in mag and mag.split()[-2:] == ["n/a", "n/a"]  # p and Holm p
    assert "n/a: fewer than 2 seeds" in text
    assert format_ranking_table([]) == "no complete profile curves yet"


def test_no_random_baseline_gives_n_a_not_an_error():
    rows = [r for r in three_measures() if r["measure"] != "random"]
    table = ranking_table(rows)
    assert all(e["n_pairs"] == 0 and math.isnan(e["p"]) for e in table)
    assert "n/a" in format_ranking_table(table)


# --------------------------------------------------------------------------- figures


def grid_rows() -> list[dict[str, str]]:
    """2 epochs x 3 aggregations x 2 directions x 2 measures x 2 seeds, one reducer and scope."""
    rows = []
    for epoch in (2, 4):
        for aggregation in ("weight", "unit", "layer"):
            for direction in ("least_first", "most_first"):
                for seed in (0, 1):
                    for measure, slope in (("random", 2.0), ("magnitude", 1.0)):
                        losses = [0.2 + slope * t + 0.01 * seed for t in GRID]
                        rows += curve_rows(measure, seed, losses, epoch=epoch,
                                           aggregation=aggregation, direction=direction)
    return rows


def test_write_profile_plots_writes_one_png_per_direction_reducer_and_scope(tmp_path):
    rows = grid_rows()
    rows += [dict(r, scope="model") for r in rows if r["direction"] == "least_first"]
    paths = write_profile_plots(rows, tmp_path / "plots")
    assert [p.name for p in paths] == ["profile_least_first_mean_layer.png",
                                       "profile_least_first_mean_model.png",
                                       "profile_most_first_mean_layer.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)
    with pytest.raises(DataError, match="no profile rows"):
        write_profile_plots([], tmp_path)


def test_profile_figure_has_a_panel_per_aggregation_and_epoch_with_the_chance_line():
    fig = profile_figure(grid_rows(), "least_first", "mean", "layer")
    axes = fig.axes
    assert len(axes) == 2 * 3
    titles = [ax.get_title() for ax in axes]  # epochs as rows, aggregations as columns
    assert titles == ["weight, epoch 2", "unit, epoch 2", "layer, epoch 2",
                      "weight, epoch 4", "unit, epoch 4", "layer, epoch 4"]
    for ax in axes:
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert len(dashed) == 1
        assert np.allclose(dashed[0].get_ydata(), math.log(10))
        curves = {line.get_label(): line for line in ax.get_lines() if line.get_linestyle() == "-"}
        assert set(curves) == {"random", "magnitude"}
        # mean over the two seeds (offsets 0 and 0.01) of 0.2 + t
        assert np.allclose(curves["magnitude"].get_ydata(), [0.205 + t for t in GRID])
        assert len(ax.collections) == 2  # one t-interval band per measure (2 seeds)
    assert "95% t-interval over 2 seeds" in fig.get_suptitle()


def test_one_seed_draws_no_band():
    rows = [r for r in grid_rows() if r["seed"] == "0"]
    fig = profile_figure(rows, "most_first", "mean", "layer")
    assert all(len(ax.collections) == 0 for ax in fig.axes)


def test_importing_the_report_does_not_import_matplotlib():
    code = "import sys, engram.reports.profile; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
