"""GEM: gradient episodic memory (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for
Continual Learning", NeurIPS).

An episodic memory keeps M examples of every finished task k. At each step the gradient g
(P,) of the current batch is compared with each earlier task's memory gradient g_k (the
loss gradient on all of task k's memory, at the current weights). If any g . g_k < 0, g is
replaced by the closest vector (in L2) that conflicts with none of them,

    g~ = argmin_z 1/2 ||z - g||^2   s.t.   z . g_k >= 0  for every earlier task k,

through its dual (paper Eq. 10-11), with G the (t, P) matrix of memory gradients:

    v* = argmin_v 1/2 v^T (G G^T + eps I) v + (G g)^T v   s.t.   v >= gamma,
    g~ = G^T v* + g.

`nonnegative_qp` solves this t x t problem exactly (Lawson & Hanson's active-set NNLS
written on the Gram matrix: a finite number of t x t solves; quadprog, the authors'
solver, is not needed). gamma (`margin`) is the paper's "small constant added to v" that
biases the step towards backward transfer: the authors' code bounds v >= gamma
(memory_strength 0.5 in run_experiments.sh, Mammoth's gem.py default gamma 0.5); eps on the
diagonal is Mammoth's 1e-3 (the original code has none; quadprog needs G G^T definite).
With eps > 0 the constraints hold up to eps v_k: g~ . g_k >= -eps v*_k.

Memory: M = `memory_per_task` examples of each task, drawn uniformly at random from the
task's training split when the task ends. The paper keeps the last M examples the stream
showed (a ring buffer per task); under engram's shuffled batches the last M examples seen are
themselves a uniform random M-subset, so the two have the same distribution. The memory is
only used for the constraints, never trained on. 256 per task in the paper's runs.

Under which optimizer (`project`), as for A-GEM (engram.methods.agem): the projection keeps
every memory loss from rising to first order only for a plain SGD step -lr g~. With
`project: update` (default) the update d the optimizer actually made is checked too, and if
any g_k . d > 0 it is replaced by d~ = -project_gem(-d, G, margin 0, eps): the nearest update
with g_k . d~ <= 0 for all k (the margin is dropped there: it is a gradient-scale quantity).
`project: gradient` is the paper's rule alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from engram.schema import opt
from engram.data.streams import TensorSet
from engram.methods.base import (Context, Method, UpdateSnapshot, flat_grad, random_subset,
                                 set_flat_grad)


@dataclass
class GEMParams:
    memory_per_task: int = opt(256, "examples kept of each finished task (256 in the paper)", low=1)
    margin: float = opt(0.5, "gamma: lower bound on the dual variables, biases the step towards "
                        "the memories (authors' memory_strength 0.5)", low=0.0)
    eps: float = opt(1e-3, "added to the diagonal of G G^T (Mammoth's value)", low=0.0)
    project: Literal["update", "gradient"] = opt(
        "update", "update: also project the step the optimizer actually makes (holds under "
        "Adam and momentum too); gradient: the paper's gradient projection only")


def nonnegative_qp(gram: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """argmin_{v >= 0} 1/2 v^T gram v + linear^T v for a symmetric positive semi-definite
    (t, t) `gram`: Lawson & Hanson's active-set NNLS (1974, ch. 23) in its Gram form (Bro &
    de Jong 1997). Exact after finitely many steps: at the end v >= 0 and the KKT conditions
    hold, (gram v + linear)_i = 0 where v_i > 0 and >= 0 where v_i = 0. float64, on the CPU."""
    gram = gram.detach().to("cpu", torch.float64)
    linear = linear.detach().to("cpu", torch.float64)
    t = len(linear)
    # scale-free tolerance: gradients can be tiny (1e-8) or large, their Gram with them
    scale = float(gram.diagonal().abs().max().clamp_min(1e-300))
    gram, linear = gram / scale, linear / scale
    tol = 1e-12 * max(1.0, float(linear.abs().max()))
    v = torch.zeros(t, dtype=torch.float64)
    passive = torch.zeros(t, dtype=torch.bool)  # variables free to be > 0

    def solve_on(passive: torch.Tensor) -> torch.Tensor:
        """The unconstrained minimiser over the passive variables, the others 0."""
        idx = passive.nonzero().flatten()
        s = torch.zeros(t, dtype=torch.float64)
        sub = gram[idx][:, idx]
        s[idx] = torch.linalg.lstsq(sub, -linear[idx].unsqueeze(1)).solution.flatten()
        return s

    for _ in range(3 * t + 10):  # each outer pass adds one variable; few passes in practice
        descent = -(gram @ v + linear)  # minus the gradient
        candidates = torch.where(passive, torch.full_like(descent, -torch.inf), descent)
        if passive.all() or candidates.max() <= tol:
            break
        passive[candidates.argmax()] = True
        for _ in range(3 * t + 10):
            s = solve_on(passive)
            if (s[passive] > tol).all():
                break
            # step from v towards s as far as v stays >= 0, and drop what reaches 0
            blocking = passive & (s <= tol)
            gap = v[blocking] - s[blocking]
            step = torch.where(gap > 0, v[blocking] / gap.clamp_min(1e-300), 0.0).min()
            v = v + step * (s - v)
            passive &= v > tol
            v = torch.where(passive, v, torch.zeros_like(v))
        else:
            s = s.clamp_min(0.0)
        v = torch.where(passive, s, torch.zeros_like(s))
    return v


def project_gem(grad: torch.Tensor, memory_grads: torch.Tensor, margin: float,
                eps: float) -> torch.Tensor:
    """GEM's projection of a flat gradient (P,) against the earlier tasks' memory gradients
    (t, P): `grad` itself when no g . g_k < 0, else G^T v* + g with v* the dual solution (see
    the module docstring). With t = 1, margin 0 it is A-GEM's closed form."""
    dots = memory_grads @ grad  # (t,)
    if bool((dots >= 0).all()):
        return grad
    gram = memory_grads @ memory_grads.T  # (t, t)
    gram = 0.5 * (gram + gram.T) + eps * torch.eye(len(dots), dtype=gram.dtype, device=gram.device)
    # v >= margin: substitute v = u + margin, u >= 0 (the linear term shifts by gram @ margin)
    shift = torch.full_like(dots, margin)
    u = nonnegative_qp(gram, dots + gram @ shift)
    v = (u.to(dots.device, dots.dtype) + shift)
    return grad + v @ memory_grads


class GEM(Method):
    """Project each gradient so that no earlier task's memory loss rises."""

    Params = GEMParams
    rewrites_gradients = True  # see Method.rewrites_gradients

    def __init__(self, params: GEMParams | None = None) -> None:
        super().__init__(params)
        self.memories: list[TensorSet] = []  # one per finished task, in task order
        self.snapshot = UpdateSnapshot()
        self.references: torch.Tensor | None = None  # (t, P) memory gradients of this step

    def memory_gradients(self, ctx: Context, params: list[torch.Tensor]) -> torch.Tensor:
        """(t, P): each earlier task's loss gradient on its whole memory, in `params` order."""
        rows = []
        for memory in self.memories:
            loss = ctx.loss_fn(ctx.model(memory.x, memory.task), memory.y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)  # e.g. another head
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                   for g, p in zip(grads, params)]))
        return torch.stack(rows)

    def after_backward(self, ctx: Context) -> None:
        if not self.memories:
            return
        params = [p for p in ctx.model.parameters() if p.grad is not None]  # the trainable ones
        grad = flat_grad(params)
        if not bool(torch.isfinite(grad).all()):
            return  # a diverging step: no QP to solve; the runner's divergence check names it
        references = self.memory_gradients(ctx, params)
        set_flat_grad(params, project_gem(grad, references, self.params.margin,
                                          self.params.eps))
        if self.params.project == "update":
            self.references = references
            self.snapshot.take(params)

    def correct_update(self, ctx: Context) -> None:
        if not self.snapshot.taken:
            return
        update = self.snapshot.update()
        if bool((self.references @ update > 0).any()):  # would raise some memory loss
            self.snapshot.replace(-project_gem(-update, self.references, 0.0, self.params.eps))
        else:
            self.snapshot.forget()
        self.references = None

    def after_task(self, ctx: Context) -> None:
        self.memories.append(random_subset(ctx.task.train, self.params.memory_per_task,
                                           ctx.generator))

    def state_dict(self) -> dict[str, Any]:
        return {"memories": [list(memory) for memory in self.memories]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memories = [TensorSet(*memory) for memory in state["memories"]]
