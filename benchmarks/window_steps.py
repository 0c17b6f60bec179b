"""Speed: engram's sliding-window run vs the leanest hand-written loop, in one process.

    python benchmarks/window_steps.py [--steps 10000] [--repeats 5] [--threads 1]

Both do the same work with the default settings of `engram window` (500 points, five
zero-initialised residual atan blocks of width 40, window 50, threshold 1, Adam lr 1e-3):
per step a no-grad check of the window's mean loss, a shift when it is below the threshold,
one forward/backward/Adam step on the window, and every 20 steps every point's loss and the
weight norm recorded.

- engram: engram.experiments.window.run_window (nn.Module network, the runner's apply_update with the
  method hooks of `naive`, Context bookkeeping).
- hand loop: four plain tensors, the forward written out, torch.optim.Adam, nothing else.

The two are alternated; medians and the ratio are printed, and the runs' shift steps are
compared (they must be equal: same data, same arithmetic).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from engram.experiments.window import WindowConfig, run_window, window_data


def hand_loop(cfg: WindowConfig) -> list[int]:
    """The same experiment on plain tensors; returns the shift steps."""
    x, y = window_data(cfg)
    d, n, m = cfg.depth, cfg.width, cfg.y_dim
    w, b = torch.zeros(d, n, n, requires_grad=True), torch.zeros(d, n, requires_grad=True)
    w_out = torch.zeros(m, n, requires_grad=True)
    b_out = torch.zeros(m, requires_grad=True)
    params = [w, b, w_out, b_out]
    optim = torch.optim.Adam(params, lr=cfg.lr, foreach=True)

    def loss_of(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:  # (B,) per point
        h = xs
        for i in range(d):
            h = h + torch.atan(torch.addmm(b[i], h, w[i].T))
        return (torch.addmm(b_out, h, w_out.T) - ys).pow(2).sum(1)

    start, shifts, recorded = 0, [], []
    idx = (torch.arange(cfg.window) + start) % cfg.n_points
    xw, yw = x[idx], y[idx]
    for s in range(cfg.max_steps):
        with torch.no_grad():
            value = loss_of(xw, yw).mean().item()
        if value < cfg.threshold:
            shifts.append(s)
            start = (start + cfg.shift) % cfg.n_points
            idx = (torch.arange(cfg.window) + start) % cfg.n_points
            xw, yw = x[idx], y[idx]
        optim.zero_grad(set_to_none=True)
        loss_of(xw, yw).mean().backward()
        optim.step()
        if (s + 1) % cfg.record_every == 0:
            with torch.no_grad():
                recorded.append(loss_of(x, y).numpy())
                recorded.append(math.sqrt(sum(float(p.pow(2).sum()) for p in params)))
    return shifts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = WindowConfig(max_steps=args.steps)
    times: dict[str, list[float]] = {"engram": [], "hand loop": []}
    shifts: dict[str, list[int]] = {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        shifts["engram"] = run_window(cfg).shift_steps
        times["engram"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        shifts["hand loop"] = hand_loop(cfg)
        times["hand loop"].append(time.perf_counter() - t0)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.steps} steps, {args.repeats} repeats, {args.threads} thread(s)")
    for name, value in median.items():
        print(f"  {name:<10} median {value:.3f} s  ({1e3 * value / args.steps:.3f} ms/step)")
    print(f"  ratio engram / hand loop: {median['engram'] / median['hand loop']:.2f}x")
    same = shifts["engram"] == shifts["hand loop"]
    print(f"  shift steps identical: {same} ({len(shifts['engram'])} shifts)")


if __name__ == "__main__":
    main()
