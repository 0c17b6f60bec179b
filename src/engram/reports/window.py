"""Reports of the sliding-window experiment: the summary table, the movie, the still
summary, the comparison.

All of them read `WindowRecord`s (engram.experiments.window), never the network, so they can
be redrawn from the NPZ files of a finished run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engram.errors import ConfigError
from engram.experiments.window import WindowExperiment, WindowRecord
from engram.reports.figures import new_figure, save_figure
from engram.reports.tables import count_seeds, format_stat, spread_note, text_table
from engram.stats import mean_se

IN_WINDOW, OUTSIDE = "#1f77b4", "#d62728"  # blue: trained on now; red: not


# ----------------------------------------------------------------------------- summaries

def relearn_by_pass(record: WindowRecord, n_points: int, shift: int) -> np.ndarray:
    """Mean relearn steps per shift in each complete pass over the points, shape (passes,).
    A pass is ceil(n_points / shift) shifts: the window has moved once around. The first
    shift is left out: its count is the first window learned from scratch (153 steps in the
    default run), not a relearning; pass 1 is the shifts after it."""
    per_pass = -(-n_points // shift)
    relearn = np.asarray(record.relearn_steps[1:], np.float64)
    n = len(relearn) // per_pass
    return relearn[:n * per_pass].reshape(n, per_pass).mean(1)


def window_summary(experiment: WindowExperiment, records: dict[str, list[WindowRecord]]
                   ) -> list[dict]:
    """Per variant with records: mean relearn steps per shift in the first, second and last
    complete pass (mean over seeds, and the seeds' standard error,
    :func:`engram.stats.mean_se`), shifts, final weight norm, seconds. ``seeds`` counts
    distinct seeds; two records of one variant on one seed raise DataError
    (:func:`engram.reports.tables.count_seeds`)."""
    table = []
    for variant in experiment.variants:
        runs = records.get(variant.name)
        if not runs:  # every seed of it failed: nothing to summarise
            continue
        seeds = count_seeds([(str(i), r.seed) for i, r in enumerate(runs)],
                            f"variant {variant.name!r}")
        passes = [relearn_by_pass(r, variant.config.n_points, variant.config.shift)
                  for r in runs]
        n = min(len(p) for p in passes)
        row = {"variant": variant.name, "seeds": seeds, "passes": n,
               "shifts": float(np.mean([len(r.shift_steps) for r in runs])),
               "weight_norm": float(np.mean([r.weight_norm[-1] for r in runs])),
               "seconds": float(np.mean([r.seconds for r in runs]))}
        for key, index in (("pass_1", 0), ("pass_2", 1), ("last_pass", n - 1)):
            values = [p[index] for p in passes] if 0 <= index < n else []
            row[key], row[key + "_se"] = mean_se(values)
        table.append(row)
    return table


def format_window_summary(table: list[dict]) -> str:
    """The summary as a text table: relearn steps per shift, "mean ± SE [95% t-interval]"
    over seeds (a mean alone with one seed; n/a: no such pass)."""
    headers = ["variant", "seeds", "passes", "pass 1", "pass 2", "last pass", "|w| end",
               "s/run"]
    lines = [[row["variant"], str(row["seeds"]), str(row["passes"]),
              *(format_stat(row[key], row[key + "_se"], decimals=2, n=row["seeds"])
                for key in ("pass_1", "pass_2", "last_pass")),
              f"{row['weight_norm']:.1f}", f"{row['seconds']:.1f}"] for row in table]
    return "\n".join(["relearn steps per shift, mean over each complete pass of the window"]
                     + text_table(headers, lines)
                     + [spread_note([row["seeds"] for row in table], ci=True)])


# ----------------------------------------------------------------------------- pictures

def _in_window(record: WindowRecord, row: int) -> np.ndarray:
    """(n_points,) bool: the points of the window that recorded row `row` checks."""
    n = record.point_loss.shape[1]
    mask = np.zeros(n, bool)
    mask[(record.window_start[row] + np.arange(record.window)) % n] = True
    return mask


def _loss_ceiling(record: WindowRecord) -> float:
    """A fixed y-limit for the movie: the 99.5th percentile of all recorded losses."""
    return float(np.percentile(record.point_loss, 99.5)) * 1.1


def plot_window_summary(record: WindowRecord, title: str, path: str | Path,
                        n_points: int, shift: int) -> Path:
    """Still summary: per-point loss as a time x point heatmap, the weight norm over time,
    and the relearn steps of every shift with the mean of each pass over the points."""
    from matplotlib.colors import LogNorm

    fig = new_figure(8.0, 8.0)
    heat, norm_ax, relearn_ax = fig.subplots(3, 1, height_ratios=[2.2, 1, 1.2], sharex=True)
    loss = np.clip(record.point_loss.T, 1e-3, None)  # (n_points, rows)
    top = float(np.percentile(loss, 99.5))
    image = heat.imshow(loss, aspect="auto", interpolation="nearest", cmap="magma",
                        norm=LogNorm(vmin=max(1e-2, top / 1e4), vmax=top),
                        extent=(0, record.steps[-1], loss.shape[0], 0))
    fig.colorbar(image, ax=heat, label="loss ||N(x) - y||²")
    heat.set_ylabel("point")
    heat.set_title(f"{title}: each point's loss over time (dark band: the training window)")
    norm_ax.plot(record.steps, record.weight_norm, color="black", lw=1)
    norm_ax.set_ylabel("norm of all weights")
    shifts = np.asarray(record.shift_steps)
    relearn = np.asarray(record.relearn_steps)
    if len(shifts):
        relearn_ax.scatter(shifts[1:], relearn[1:], s=2, alpha=0.3, color="grey",
                           linewidths=0, label="one shift")
        span = min(100, len(relearn) - 1)
        if span >= 2:  # running mean over `span` shifts
            running = np.convolve(relearn[1:], np.ones(span) / span, mode="valid")
            relearn_ax.plot(shifts[span:], running, color="black", lw=1,
                            label=f"mean of the last {span} shifts")
        passes = relearn_by_pass(record, n_points, shift)
        per_pass = -(-n_points // shift)
        if len(passes):
            ends = shifts[np.arange(1, len(passes) + 1) * per_pass]  # first shift left out
            relearn_ax.plot(ends, passes, "o-", color=IN_WINDOW, ms=3,
                            label="mean of each pass over the points")
        hi = np.percentile(relearn[1:], 99) if len(relearn) > 1 else 1
        relearn_ax.set_ylim(0, max(hi * 1.2, 1))
        relearn_ax.legend(loc="upper left", fontsize="small")
    relearn_ax.set_ylabel("steps to relearn\nper window shift")
    relearn_ax.set_xlabel("training step")
    return save_figure(fig, Path(path))


def plot_relearn_comparison(records: dict[str, list[WindowRecord]], n_points: dict[str, int],
                            shift: dict[str, int], path: str | Path) -> Path:
    """Relearn steps per shift, mean of each pass (± standard error over seeds), and the
    weight norm over time (mean over seeds), one line per variant."""
    fig = new_figure(9.0, 4.2)
    relearn_ax, norm_ax = fig.subplots(1, 2)
    for i, (name, runs) in enumerate(records.items()):
        color = f"C{i}"
        passes = [relearn_by_pass(r, n_points[name], shift[name]) for r in runs]
        n = min(len(p) for p in passes)
        if n:
            values = np.array([p[:n] for p in passes])  # (seeds, passes)
            mean, se = mean_se(values)
            # x: the step each pass ended at (mean over seeds), so variants that move the
            # window faster (more passes) share the axis with the others
            per_pass = -(-n_points[name] // shift[name])
            ends = np.arange(1, n + 1) * per_pass  # the first shift is left out
            x = np.mean([np.asarray(r.shift_steps)[ends] for r in runs], 0)
            relearn_ax.plot(x, mean, "o-", ms=3, color=color, label=name)
            if len(runs) > 1:
                relearn_ax.fill_between(x, mean - se, mean + se, color=color, alpha=0.2)
        steps = runs[0].steps
        norm_ax.plot(steps, np.mean([r.weight_norm for r in runs], 0), color=color, label=name)
    seeds = len(next(iter(records.values())))
    band = f" (± SE over {seeds} seeds)" if seeds > 1 else ""
    relearn_ax.set_title(f"steps to relearn per window shift{band}", fontsize="medium")
    relearn_ax.set_xlabel("training step (end of each pass over the points)")
    relearn_ax.set_ylabel("mean steps per shift in the pass")
    means = [float(v) for line in relearn_ax.lines for v in line.get_ydata()]
    if means and max(means) > 4 * max(min(means), 0.5):  # far apart: a log axis shows all
        from matplotlib.ticker import FormatStrFormatter, LogLocator

        relearn_ax.set_yscale("log")
        relearn_ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        relearn_ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    else:
        relearn_ax.set_ylim(bottom=0)
    if relearn_ax.lines:
        relearn_ax.legend(fontsize="small")
    else:
        relearn_ax.text(0.5, 0.5, "no complete pass yet", ha="center",
                        transform=relearn_ax.transAxes)
    norm_ax.set_title("norm of all weights", fontsize="medium")
    norm_ax.set_xlabel("training step")
    return save_figure(fig, Path(path))


def animation_writer(fmt: str, fps: int):
    """A matplotlib movie writer: gif by pillow (always there), mp4 by ffmpeg (when found)."""
    from matplotlib import animation

    if fmt == "gif":
        return animation.PillowWriter(fps=fps)
    if fmt == "mp4":
        if not animation.writers.is_available("ffmpeg"):
            raise ConfigError("animation: mp4 needs the ffmpeg program on PATH (matplotlib "
                              "writes MP4 through it); install ffmpeg or use animation: gif")
        return animation.FFMpegWriter(fps=fps, bitrate=1800)
    raise ConfigError(f"animation: unknown format {fmt!r}; choose gif, mp4 or none")


def write_animation(record: WindowRecord, title: str, path: str | Path, *, frames: int = 240,
                    fps: int = 20, fmt: str = "gif", dpi: int = 80) -> Path:
    """The movie: each point's loss (blue: in the training window, red: not), the step
    counter and the weight norm on every frame, and the weight norm's curve so far below.
    `frames` evenly spaced recorded rows. The layout is computed once and frozen; each
    frame updates the artists' data and costs one draw."""
    path = Path(path)
    writer = animation_writer(fmt, fps)
    fig = new_figure(6.4, 4.4)
    loss_ax, norm_ax = fig.subplots(2, 1, height_ratios=[3, 1])
    n = record.point_loss.shape[1]
    rows = np.unique(np.linspace(0, len(record.steps) - 1, frames).round().astype(int))
    index = np.arange(n)
    dots = loss_ax.scatter(index, record.point_loss[0], s=6, linewidths=0)
    loss_ax.set_xlim(-1, n)
    loss_ax.set_ylim(0, _loss_ceiling(record))
    loss_ax.set_xlabel("point", labelpad=1)
    loss_ax.set_ylabel("loss ||N(x) - y||²")
    loss_ax.set_title(f"{title}: blue = in the training window, red = not", fontsize="medium")
    label = loss_ax.text(0.01, 0.97, "", transform=loss_ax.transAxes, va="top",
                         family="monospace", fontsize="small")
    norm_ax.plot(record.steps, record.weight_norm, color="0.85", lw=1)
    (so_far,) = norm_ax.plot([], [], color="black", lw=1.2)
    (now,) = norm_ax.plot([], [], "o", color="black", ms=3)
    norm_ax.set_xlim(0, record.steps[-1])
    norm_ax.set_ylim(0, float(record.weight_norm.max()) * 1.05 or 1.0)
    norm_ax.set_ylabel("|weights|")
    norm_ax.set_xlabel("training step", labelpad=1)
    colors = np.array([[0.839, 0.153, 0.157, 1.0], [0.122, 0.467, 0.706, 1.0]])  # red, blue
    fig.canvas.draw()  # lay the figure out once, then freeze it: every frame is one draw
    fig.set_layout_engine("none")
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    try:
        with writer.saving(fig, str(tmp), dpi):
            for row in rows:
                dots.set_offsets(np.column_stack([index, record.point_loss[row]]))
                dots.set_facecolor(colors[_in_window(record, row).astype(int)])
                label.set_text(f"step {record.steps[row]:>7,}   "
                               f"weight norm {record.weight_norm[row]:6.2f}")
                so_far.set_data(record.steps[:row + 1], record.weight_norm[:row + 1])
                now.set_data([record.steps[row]], [record.weight_norm[row]])
                writer.grab_frame()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        fig.clear()
    return path


def write_window_pictures(experiment: WindowExperiment, records: dict[str, list[WindowRecord]],
                          out: str | Path, *, animate: bool = True) -> list[Path]:
    """Everything `engram window` draws into `out`: plots/summary_<variant>.png (first seed),
    plots/relearn_comparison.png and, unless animation is none, <variant>.gif (or .mp4) for
    the variants in `animate` (default: the first). Variants without records (every run of
    them failed) are left out."""
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    by_name = {v.name: v for v in experiment.variants}
    written = []
    for name, runs in records.items():
        cfg = by_name[name].config
        written.append(plot_window_summary(runs[0], f"{name}, seed {runs[0].seed}",
                                           out / "plots" / f"summary_{name}.png",
                                           cfg.n_points, cfg.shift))
    written.append(plot_relearn_comparison(
        records, {n: by_name[n].config.n_points for n in records},
        {n: by_name[n].config.shift for n in records}, out / "plots" / "relearn_comparison.png"))
    if animate and experiment.animation != "none":
        for name in experiment.animate or [experiment.variants[0].name]:
            if name not in records:
                continue
            written.append(write_animation(records[name][0], name,
                                           out / f"{name}.{experiment.animation}",
                                           frames=experiment.frames, fps=experiment.fps,
                                           fmt=experiment.animation))
    return written
