"""Statistics and figures of an importance profile: which measure knows which weights matter?

Input: the profiler's rows (``engram.results.read_rows`` on its CSV: every value a string)
with the columns :data:`PROFILE_COLUMNS`. One *curve* is the validation loss of one
(epoch, measure, aggregation, reducer, scope, direction, seed) against the threshold grid.

* :func:`curve_summaries`: each curve reduced to two numbers, its area under the curve
  (AUC) and its largest safe threshold.
* :func:`ranking_table`: per (epoch, aggregation, reducer, scope), the measures ranked by
  mean AUC over seeds, with 95% t-intervals and a paired t-test against ``random``.
* :func:`format_ranking_table`: that table as text or markdown.
* :func:`write_profile_plots`: loss against threshold per measure, one figure per
  (direction, reducer, scope).

Statistics follow the few-seed advice of the project's reference sheet
(plasticity-importance-metrics.md, section 6): summarise each seed's curve first, then
test those n numbers; t intervals ``mean ± t_{0.975, n-1} * s / sqrt(n)`` rather than ±1
SE (which covers the mean only ~63% of the time at n = 5); seeds paired with the random
baseline (every measure is profiled on the same seeds: same data, initialisation and
training); paired t-test (scipy.stats.ttest_rel) with a t-interval on the mean paired
difference and the count of seeds on which the measure beat random; Holm correction
across the measures compared with random in one table block. With fewer than 2 seeds
there is no interval and no test: they read "n/a".

scipy and matplotlib are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engram.errors import DataError
# The statistics live in engram.stats (shared with every table); imported here, they stay
# part of this module's API.
from engram.stats import CONFIDENCE, holm, paired_test, t_interval  # noqa: F401

if TYPE_CHECKING:  # annotations only: matplotlib stays unimported until a figure is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PROFILE_COLUMNS = ["seed", "epoch", "measure", "aggregation", "reducer", "scope", "direction",
                   "threshold", "fraction_replaced", "train_loss", "val_loss", "val_accuracy",
                   "n_classes"]
CURVE_KEY = ("epoch", "measure", "aggregation", "reducer", "scope", "direction", "seed")
CELL_KEY = ("epoch", "aggregation", "reducer", "scope")  # one block of the ranking table
BASELINE = "random"
# Columns the statistics read; n_classes, train_loss and val_accuracy are for the plots / CSV.
_NEEDED = ("seed", "epoch", "measure", "aggregation", "reducer", "scope", "direction",
           "threshold", "fraction_replaced", "val_loss")


# --------------------------------------------------------------------------- statistics


def trapezoid(x: Sequence[float], y: Sequence[float]) -> float:
    """Area under y(x) by the trapezoid rule: sum_k (x_{k+1} - x_k) * (y_k + y_{k+1}) / 2.
    x must be sorted ascending (a repeated x adds a zero-width piece)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)  # (K,) each
    if len(x) < 2:
        return 0.0
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def max_safe_threshold(thresholds: Sequence[float], losses: Sequence[float],
                       margin: float) -> float:
    """The largest threshold t such that loss(s) <= loss(0) + margin for every s <= t.

    `thresholds` sorted ascending, starting at 0 (the model unchanged); nan when the curve
    has no threshold-0 point, since the baseline loss is then unknown. A curve that never
    rises past the margin gives its last threshold; one that rises at its second point, 0.
    """
    t, loss = np.asarray(thresholds, dtype=float), np.asarray(losses, dtype=float)  # (K,)
    if len(t) == 0 or t[0] != 0:
        return math.nan
    ok = loss <= loss[0] + margin  # (K,) a nan loss counts as a rise
    broken = np.flatnonzero(~ok)
    last = len(t) - 1 if len(broken) == 0 else broken[0] - 1
    return float(t[last])


# --------------------------------------------------------------------------- rows -> curves


def _check_columns(rows: Sequence[dict[str, str]], needed: Sequence[str] = _NEEDED) -> None:
    if rows:
        missing = [c for c in needed if c not in rows[0]]
        if missing:
            raise DataError(f"profile rows lack the columns {missing}; expected the columns "
                            f"{PROFILE_COLUMNS} written by `engram profile`")


def _number(row: dict[str, str], column: str) -> float:
    try:
        return float(row[column])
    except (TypeError, ValueError):
        raise DataError(f"profile row has {column}={row[column]!r}, not a number: {row}") from None


def _curve_key(row: dict[str, str]) -> tuple:
    return (int(_number(row, "epoch")), row["measure"], row["aggregation"], row["reducer"],
            row["scope"], row["direction"], int(_number(row, "seed")))


def _curves(rows: Sequence[dict[str, str]]) -> dict[tuple, np.ndarray]:
    """CURVE_KEY tuple -> (K, 3) array of (threshold, fraction_replaced, val_loss) rows,
    sorted by threshold, in first-appearance order of the curves."""
    _check_columns(rows)
    points: dict[tuple, list[tuple[float, float, float]]] = defaultdict(list)
    for r in rows:
        points[_curve_key(r)].append((_number(r, "threshold"), _number(r, "fraction_replaced"),
                                      _number(r, "val_loss")))
    curves = {}
    for key, pts in points.items():
        arr = np.array(sorted(pts), dtype=float)  # (K, 3)
        if len(np.unique(arr[:, 0])) < len(arr):
            raise DataError(f"profile curve {dict(zip(CURVE_KEY, key))} has a threshold twice; "
                            "were two different profiles written into one results file?")
        curves[key] = arr
    return curves


def curve_summaries(rows: Sequence[dict[str, str]], margin: float = 0.1,
                    x: str = "fraction_replaced") -> list[dict[str, Any]]:
    """One summary per curve, i.e. per (epoch, measure, aggregation, reducer, scope,
    direction, seed), in the order the curves first appear in `rows`.

    ``auc``: trapezoid area under val_loss against `x` (default fraction_replaced, the
    fraction of the model's elements actually replaced, which runs from 0 to 1 like the
    threshold: with unit or layer groups of different sizes, or model-wide ordering, the
    threshold counts *groups* while fraction_replaced counts *weights*, so the area does
    not favour a measure that happens to pick small groups first; ``x="threshold"`` uses
    the threshold). Lower AUC = the loss stayed low while more was replaced.
    ``max_safe_threshold``: the largest threshold t with val_loss <= val_loss(t=0) + margin
    at every threshold <= t (nan without a threshold-0 point). Also ``base_loss``
    (val_loss at the first threshold), ``n_points`` and ``complete``: whether the curve has
    every threshold that any curve of its (epoch, aggregation, reducer, scope, direction)
    has, so a curve cut short by an interrupted profile is not compared with whole ones.
    """
    if x not in ("fraction_replaced", "threshold"):
        raise ValueError(f"x must be 'fraction_replaced' or 'threshold', got {x!r}")
    curves = _curves(rows)
    grids: dict[tuple, set[float]] = defaultdict(set)  # (epoch, agg, red, scope, dir) -> thresholds
    for key, arr in curves.items():
        grids[_grid_key(key)].update(arr[:, 0].tolist())
    out = []
    for key, arr in curves.items():
        xs = arr[:, 0] if x == "threshold" else arr[:, 1]  # (K,) sorted: replaced sets are nested
        out.append({**dict(zip(CURVE_KEY, key)),
                    "auc": trapezoid(xs, arr[:, 2]),
                    "max_safe_threshold": max_safe_threshold(arr[:, 0], arr[:, 2], margin),
                    "base_loss": float(arr[0, 2]),
                    "n_points": len(arr),
                    "complete": set(arr[:, 0].tolist()) == grids[_grid_key(key)]})
    return out


def _grid_key(key: tuple) -> tuple:
    """(epoch, aggregation, reducer, scope, direction) of a CURVE_KEY tuple."""
    epoch, _measure, aggregation, reducer, scope, direction, _seed = key
    return epoch, aggregation, reducer, scope, direction


# --------------------------------------------------------------------------- ranking


def ranking_table(rows: Sequence[dict[str, str]], margin: float = 0.1,
                  direction: str = "least_first",
                  x: str = "fraction_replaced") -> list[dict[str, Any]]:
    """Measures ranked per (epoch, aggregation, reducer, scope), for one `direction`.

    One flat entry per (block, measure); blocks sorted by epoch, aggregation, reducer,
    scope; within a block, by mean AUC: ascending for ``least_first`` (removing the least
    important first should keep the loss low), descending for ``most_first`` (removing the
    most important first should raise it fast); rank 1 = best. Only complete curves count
    (see :func:`curve_summaries`). Each entry::

        epoch, aggregation, reducer, scope, direction, rank, measure,
        margin, auc_x,               # the arguments the numbers were computed with
        n_seeds, seeds (sorted list),
        auc_mean, auc_ci,            # mean over seeds and 95% t-interval half-width
        safe_mean, safe_ci,          # the same for max_safe_threshold
        n_pairs,                     # seeds shared with `random`
        diff_mean, diff_ci,          # mean of AUC(measure) - AUC(random) over those seeds, t-CI
        n_better,                    # seeds on which the measure beat random (AUC lower
                                     # for least_first, higher for most_first)
        t, p, d_z,                   # paired t-test (scipy.stats.ttest_rel), two-sided
        p_holm                       # p Holm-adjusted across the block's measures

    Half-widths, t, p and d_z are nan with fewer than 2 seeds (pairs); every vs-random
    field is nan (n_pairs 0) for ``random`` itself and when the block has no random curve.
    """
    if direction not in ("least_first", "most_first"):
        raise ValueError(f"direction must be 'least_first' or 'most_first', got {direction!r}")
    blocks: dict[tuple, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for s in curve_summaries(rows, margin, x=x):
        if s["direction"] == direction and s["complete"]:
            blocks[tuple(s[k] for k in CELL_KEY)][s["measure"]][s["seed"]] = s
    sign = 1.0 if direction == "least_first" else -1.0  # sign * AUC: lower is better
    table: list[dict[str, Any]] = []
    for cell in sorted(blocks):
        by_measure = blocks[cell]
        base = by_measure.get(BASELINE, {})
        entries = []
        for measure, seeds in by_measure.items():
            auc_mean, auc_ci = t_interval([seeds[s]["auc"] for s in sorted(seeds)])
            safe_mean, safe_ci = t_interval([seeds[s]["max_safe_threshold"] for s in sorted(seeds)])
            entry = {**dict(zip(CELL_KEY, cell)), "direction": direction, "measure": measure,
                     "margin": margin, "auc_x": x,
                     "n_seeds": len(seeds), "seeds": sorted(seeds), "auc_mean": auc_mean,
                     "auc_ci": auc_ci, "safe_mean": safe_mean, "safe_ci": safe_ci,
                     **_versus(seeds, base if measure != BASELINE else {}, sign)}
            entries.append(entry)
        entries.sort(key=lambda e: (not np.isfinite(e["auc_mean"]), sign * e["auc_mean"],
                                    e["measure"]))
        for e, p_adj in zip(entries, holm([e["p"] for e in entries])):
            e["p_holm"] = p_adj
        for rank, e in enumerate(entries, start=1):
            e["rank"] = rank
        table.extend(entries)
    return table


def _versus(seeds: dict[int, dict], base: dict[int, dict], sign: float) -> dict[str, Any]:
    """The paired comparison of one measure's AUCs with the baseline's on their shared seeds."""
    shared = sorted(set(seeds) & set(base))
    test = paired_test([seeds[s]["auc"] for s in shared], [base[s]["auc"] for s in shared])
    better = test["n_below"] if sign > 0 else test["n_above"]
    return {"n_pairs": test["n"], "diff_mean": test["diff_mean"], "diff_ci": test["diff_ci"],
            "n_better": better, "t": test["t"], "p": test["p"], "d_z": test["d_z"]}


# --------------------------------------------------------------------------- text


def _mean_ci(mean: float, half: float, decimals: int) -> str:
    """'0.812 ± 0.010'; 'n/a' when not measured; '0.812 (CI n/a)' with one seed."""
    if not np.isfinite(mean):
        return "n/a"
    if not np.isfinite(half):
        return f"{mean:.{decimals}f} (CI n/a)"
    return f"{mean:.{decimals}f} ± {half:.{decimals}f}"


def _diff(mean: float, half: float) -> str:
    """'-0.123 [-0.150, -0.096]': mean paired difference and its t-interval."""
    if not np.isfinite(mean):
        return "n/a"
    if not np.isfinite(half):
        return f"{mean:+.3f} [CI n/a]"
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"


def _p(p: float) -> str:
    if not np.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def format_ranking_table(table: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The :func:`ranking_table` as text: one block per (epoch, aggregation, reducer, scope).

    Columns: rank, measure, seeds, AUC and max safe threshold (mean ± 95% t-interval
    half-width), the mean paired AUC difference to random with its 95% t-interval in
    brackets, the sign count (seeds better than random / paired seeds), the paired t-test
    p and its Holm-adjusted value. "n/a" marks what needs 2 or more seeds (or a random
    baseline). `markdown` renders each block as a GitHub pipe table under a bold title.
    """
    from engram.reports.tables import _render_block

    if not table:
        return "no complete profile curves yet"
    blocks: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for e in table:
        blocks[tuple(e[k] for k in (*CELL_KEY, "direction"))].append(e)
    headers = ["rank", "measure", "seeds", "AUC", "max safe threshold",
               "ΔAUC vs random [95% CI]", "better", "p (paired t)", "p (Holm)"]
    out = []
    for (epoch, aggregation, reducer, scope, direction), entries in blocks.items():
        order = ("remove least important first, lower AUC is better"
                 if direction == "least_first"
                 else "remove most important first, higher AUC is better")
        title = (f"epoch {epoch}, {aggregation} aggregation, {reducer} reducer, "
                 f"{scope}-wise thresholds: {order}")
        lines = []
        for e in sorted(entries, key=lambda e: e["rank"]):
            baseline = e["measure"] == BASELINE
            lines.append([
                str(e["rank"]), e["measure"], str(e["n_seeds"]),
                _mean_ci(e["auc_mean"], e["auc_ci"], 3),
                _mean_ci(e["safe_mean"], e["safe_ci"], 2),
                "baseline" if baseline else _diff(e["diff_mean"], e["diff_ci"]),
                "" if baseline else
                (f"{e['n_better']}/{e['n_pairs']}" if e["n_pairs"] else "n/a"),
                "" if baseline else _p(e["p"]),
                "" if baseline else _p(e["p_holm"])])
        out.append(_render_block(title, headers, lines, markdown))
    first = table[0]
    against = ("the fraction of weights replaced" if first["auc_x"] == "fraction_replaced"
               else "the threshold")
    legend = (f"AUC: trapezoid area under validation loss against {against}; max safe "
              "threshold: the largest threshold up to which the loss stays within "
              f"{first['margin']:g} of its unchanged value; ± and [ ]: 95% t-interval over seeds "
              "(t_{0.975,n-1}·s/√n); ΔAUC: AUC(measure) - AUC(random), paired by seed; better: "
              "seeds on which the measure beat random; p: two-sided paired t-test; Holm: "
              "adjusted across the measures of the block; n/a: fewer than 2 seeds (or no "
              "random baseline)")
    return "\n\n".join(out + [legend])


# --------------------------------------------------------------------------- figures


def loss_bands(rows: Sequence[dict[str, str]], epoch: int, aggregation: str, reducer: str,
               scope: str, direction: str) -> dict[str, tuple[np.ndarray, ...]]:
    """Per measure: (thresholds (K,), mean val_loss (K,), t-CI half-width (K,), seeds (K,)),
    the mean over seeds at each threshold of one panel, in first-appearance order of the
    measures. The half-width is nan where fewer than 2 seeds reached the threshold."""
    per: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for key, arr in _curves(rows).items():
        e, measure, agg, red, sc, d, _seed = key
        if (e, agg, red, sc, d) == (epoch, aggregation, reducer, scope, direction):
            for t, _, loss in arr:
                per[measure][float(t)].append(float(loss))
    bands = {}
    for measure, points in per.items():
        ts = sorted(points)
        stats = [t_interval(points[t]) for t in ts]
        bands[measure] = (np.array(ts), np.array([m for m, _ in stats]),
                          np.array([h for _, h in stats]),
                          np.array([len(points[t]) for t in ts]))
    return bands


def _measure_colours(measures: Sequence[str]) -> dict[str, Any]:
    """random in black (the baseline to beat); the others tab10, then tab20, in sorted order,
    so a measure keeps its colour in every panel and figure of one report."""
    from matplotlib import colormaps

    others = sorted(m for m in measures if m != BASELINE)
    cmap = colormaps["tab10" if len(others) <= 10 else "tab20"]
    colours = {m: cmap(i % cmap.N) for i, m in enumerate(others)}
    colours[BASELINE] = "black"
    return colours


def plot_loss_bands(bands: dict[str, tuple[np.ndarray, ...]], ax: "Axes",
                    chance: Sequence[float] = (), colours: dict[str, Any] | None = None,
                    title: str = "") -> "Axes":
    """Mean validation loss against threshold per measure with its 95% t-interval band
    (drawn where 2 or more seeds reached the threshold), and a dashed horizontal line at
    each chance level in `chance` (ln(n_classes): the loss of a uniform prediction)."""
    colours = colours or _measure_colours(list(bands))
    for measure, (ts, mean, half, _n) in bands.items():
        colour = colours.get(measure, "0.5")
        ax.plot(ts, mean, color=colour, marker="o", markersize=2, linewidth=1.3,
                label=measure, zorder=3 if measure == BASELINE else 2)
        has = np.isfinite(half)
        if has.any():
            ax.fill_between(ts, np.where(has, mean - half, np.nan),
                            np.where(has, mean + half, np.nan),
                            color=colour, alpha=0.15, linewidth=0)
    for level in chance:
        ax.axhline(level, color="0.3", linestyle="--", linewidth=1.0,
                   label=f"chance ln({round(math.exp(level))}) = {level:.2f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("threshold t (fraction of groups replaced)")
    ax.set_ylabel("validation loss")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def _figure_keys(rows: Sequence[dict[str, str]]) -> list[tuple[str, str, str]]:
    """(direction, reducer, scope) of every figure, least_first first, then sorted."""
    keys = {(r["direction"], r["reducer"], r["scope"]) for r in rows}
    return sorted(keys, key=lambda k: (k[0] != "least_first", k))


def profile_figure(rows: Sequence[dict[str, str]], direction: str, reducer: str,
                   scope: str) -> "Figure":
    """The loss-vs-threshold figure of one (direction, reducer, scope): one panel per
    (epoch, aggregation), epochs as rows and aggregations as columns (in the order
    AGGREGATIONS lists them, unknown ones after), each panel drawn by
    :func:`plot_loss_bands` with the chance level ln(n_classes) of its rows."""
    from engram.reports.figures import _seeds, new_figure

    _check_columns(rows, (*_NEEDED, "n_classes"))
    picked = [r for r in rows if (r["direction"], r["reducer"], r["scope"])
              == (direction, reducer, scope)]
    if not picked:
        raise DataError(f"no profile rows for direction={direction}, reducer={reducer}, "
                        f"scope={scope}")
    known = ("weight", "unit", "filter", "layer")  # aggregate.AGGREGATIONS, without importing torch
    aggregations = sorted({r["aggregation"] for r in picked},
                          key=lambda a: (known.index(a) if a in known else len(known), a))
    epochs = sorted({int(_number(r, "epoch")) for r in picked})
    colours = _measure_colours(sorted({r["measure"] for r in picked}))
    n_seeds = len({r["seed"] for r in picked})
    fig = new_figure(3.4 * len(aggregations) + 1.8, 2.8 * len(epochs) + 0.6)
    axes = fig.subplots(len(epochs), len(aggregations), squeeze=False,
                        sharey=True)  # (epochs, aggregations) array of Axes
    for i, epoch in enumerate(epochs):
        for j, aggregation in enumerate(aggregations):
            panel = [r for r in picked if int(_number(r, "epoch")) == epoch
                     and r["aggregation"] == aggregation]
            chance = sorted({math.log(_number(r, "n_classes")) for r in panel})
            plot_loss_bands(loss_bands(panel, epoch, aggregation, reducer, scope, direction),
                            axes[i, j], chance, colours, title=f"{aggregation}, epoch {epoch}")
            if i < len(epochs) - 1:
                axes[i, j].set_xlabel("")
            if j > 0:
                axes[i, j].set_ylabel("")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in axes.flat:  # measures missing from the first panel still get a legend entry
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen.keys()), loc="outside right upper", fontsize=8,
               frameon=False)
    order = "least important first" if direction == "least_first" else "most important first"
    fig.suptitle(f"validation loss as weights are replaced, {order}\n{reducer} reducer, "
                 f"{scope}-wise thresholds; mean ± 95% t-interval over {_seeds(n_seeds)}",
                 fontsize=10)
    return fig


def write_profile_plots(rows: Sequence[dict[str, str]], out_dir: str | Path) -> list[Path]:
    """Write ``out_dir/profile_<direction>_<reducer>_<scope>.png`` for every (direction,
    reducer, scope) in `rows` (see :func:`profile_figure`); returns the paths, least_first
    figures first. Creates `out_dir`. DataError when `rows` is empty."""
    from engram.reports.figures import safe_name, save_figure

    if not rows:
        raise DataError("no profile rows to plot; run `engram profile` first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for direction, reducer, scope in _figure_keys(rows):
        fig = profile_figure(rows, direction, reducer, scope)
        name = safe_name(f"profile_{direction}_{reducer}_{scope}")
        written.append(save_figure(fig, out_dir / f"{name}.png"))
    return written
