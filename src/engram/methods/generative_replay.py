"""Deep Generative Replay (Shin, Lee, Kim & Kim, "Continual learning with deep generative
replay", NeurIPS 2017), with a small VAE as the generator (van de Ven & Tolias's DGR setup).

DGR's "scholar" is a generator G plus the solver S (here the live model). From the second
task on, the previous scholar (G_{t-1}, S_{t-1}) is frozen at the task's start, and the
solver learns the new task's real data together with generated inputs that the previous
solver labels (reference sheet, section 17):

    L_S = r * E_{(x,y)~D_t} CE(S(x), y) + (1 - r) * E_{x'~G_{t-1}} CE(S(x'), argmax S_{t-1}(x'))

    x' = sigmoid(dec_{t-1}(z)),  z ~ N(0, I)      (the previous VAE's Bernoulli means)

The replay term is this method's `penalty`: each step draws `replay_batch_size` fresh x'
(64, a constant, so the cost per step does not grow with the number of tasks) and returns
((1 - r) / r) * CE(S(x'), y'). The runner's loss is the real mini-batch's mean CE with weight
1, so the total is L_S / r: the same minimiser and, under Adam without weight decay, nearly
the same steps (Adam is invariant to the loss scale up to its eps; under SGD the step size is
1/r larger). r is `real_fraction`, by default 1/t at task t, van de Ven's
`rnt = 1/context` (each earlier task weighs as much as the new one); the kuc2477 DGR code
uses r = 1/2.

Labels, by scenario (only the previous solver's own outputs, DGR's "S_{t-1}(x')"):
task-incremental, each x' gets an earlier task id drawn uniformly and the argmax of that
task's head; domain-incremental, the argmax of the shared head (the drawn task id is passed
but a one-head model ignores it); class-incremental, the argmax over the columns of the
classes of earlier tasks only. The cross entropy runs over the whole head, as the runner's
does for real data, so replay also pushes x' away from the new classes. With `soft: true`
the target is softmax(S_{t-1}(x') / T) instead (van de Ven's "DGR+distill", no T^2 factor),
zero on class-incremental columns the previous solver never learnt.

The generator is trained as in DGR on the same mix: after every solver step, one Adam step
of its own on r * -ELBO(real mini-batch) + (1 - r) * -ELBO(this step's x'), so the new
generator also reproduces the earlier tasks. The ELBO is that of a VAE with a Bernoulli
decoder on the flattened pixels (inputs are in [0, 1]) and a N(0, I) prior (Kingma &
Welling 2014), as a mean over the rows of

    -ELBO(x) = sum_i BCE(sigmoid(l_i(z)), x_i) + 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2),
    z = mu + sigma * eps,  eps ~ N(0, I).

The VAE's Adam optimiser belongs to this method (the runner's optimizer only ever sees the
solver) and, like the runner's, is made fresh at each task start, so a checkpoint at a task
boundary needs no optimiser state. The VAE is an MLP (D -> vae_hidden -> 2 x latent_dim;
latent_dim -> vae_hidden -> D, ReLU), built at the first task's start from a seed drawn from
ctx.generator (the global random state is left untouched); every eps, z and task id is drawn
from ctx.generator. Defaults (latent_dim 8, vae_hidden 256, vae_lr 0.01, replay_batch_size
64, r = 1/t, hard labels) were chosen on the val split of class-incremental split digits
(5 tasks x 40 epochs of 9 steps): a smaller vae_lr leaves the VAE under-trained in so few
steps, r = 1/2 under-replays four earlier tasks, soft targets did as well as hard ones.

Simplifications against the paper: a VAE instead of a WGAN-GP; the generator takes one step
per solver step on the solver's batches rather than its own schedule; r is a weight, not a
sampling ratio. Memory (extra_bytes, the same tensors as state_dict): the VAE, the frozen
previous VAE and the frozen previous solver (4 bytes per float parameter of each, the last
two from task 2 on), plus class-incremental's two small int64 tables (earlier columns,
column -> task). No training input is ever stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engram.schema import opt
from engram.methods.base import (Batch, Context, Method, ProblemInfo, frozen_copy,
                                 needs_class_scores)


@dataclass
class GenerativeReplayParams:
    latent_dim: int = opt(8, "size of the VAE's latent code z", low=1)
    vae_hidden: int = opt(256, "width of the VAE's one hidden layer (encoder and decoder)", low=1)
    vae_lr: float = opt(0.01, "learning rate of the VAE's own Adam optimiser", low=0.0)
    replay_batch_size: int = opt(64, "generated examples per step", low=1)
    real_fraction: float | None = opt(
        None, "r: share of the real data in the losses; the replay term is weighted (1 - r) / r "
        "against the real cross entropy (null: r = 1/t at task t, van de Ven)", low=0.001, high=1.0)
    soft: bool = opt(False, "distil the previous solver's softened outputs instead of its "
                     "argmax labels (van de Ven's DGR+distill)")
    temperature: float = opt(2.0, "T of the soft targets (soft: true only)", low=0.01)


class VAE(nn.Module):
    """MLP VAE on flattened inputs: encoder (B, D) -> (mu, log sigma^2) (B, L); decoder
    (B, L) -> Bernoulli logits (B, D)."""

    def __init__(self, n_inputs: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(n_inputs, hidden), nn.ReLU())
        self.to_mean = nn.Linear(hidden, latent)
        self.to_logvar = nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(),
                                     nn.Linear(hidden, n_inputs))  # Bernoulli logits
        self.latent = latent

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x.flatten(1))
        return self.to_mean(h), self.to_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


def negative_elbo(vae: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -ELBO(x): Bernoulli reconstruction (summed BCE over the D
    pixels) + KL(N(mu, sigma^2) || N(0, I)), with z = mu + sigma * eps; x (B, ...) in [0, 1],
    eps (B, L) standard normal draws."""
    mean, logvar = vae.encode(x)                                  # (B, L) each
    z = mean + torch.exp(0.5 * logvar) * eps                      # reparameterisation
    logits = vae.decode(z)                                        # (B, D)
    recon = F.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="none").sum(1)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
    return (recon + kl).mean()


class GenerativeReplay(Method):
    """DGR: a VAE generates earlier tasks' inputs, the previous solver labels them."""

    Params = GenerativeReplayParams

    def __init__(self, params: GenerativeReplayParams | None = None) -> None:
        super().__init__(params)
        self.vae: VAE | None = None
        self.old_vae: VAE | None = None
        self.old_solver: nn.Module | None = None
        self._loaded_solver: dict | None = None  # old solver weights waiting for a model
        self.optimizer: torch.optim.Optimizer | None = None
        self.n_old_tasks = 0
        self.old_columns: torch.Tensor | None = None  # class-IL: earlier classes' columns
        self.column_task: torch.Tensor | None = None  # class-IL: column -> task that owns it
        self._replay_x: torch.Tensor | None = None  # this step's generated x', for the VAE step
        self.vae_loss: torch.Tensor | None = None   # the last generator loss (detached)

    # ------------------------------------------------------------------ task boundaries

    def before_task(self, ctx: Context) -> None:
        if self.vae is None:
            self.vae = self._new_vae(math.prod(ctx.stream.input_shape), ctx).to(ctx.device)
        self.optimizer = torch.optim.Adam(self.vae.parameters(), lr=self.params.vae_lr)
        if ctx.task.index == 0:
            return
        # At a task start the model and VAE are the previous task's final ones (also after a
        # resume, which restarts from a task boundary): freeze the previous scholar.
        self.old_solver = frozen_copy(ctx.model)
        self._loaded_solver = None
        self.old_vae = frozen_copy(self.vae)
        earlier = ctx.seen_tasks[:-1]
        self.n_old_tasks = len(earlier)
        if ctx.stream.scenario == "class":
            self.old_columns = torch.unique(torch.cat([t.train.y for t in earlier]))
            owner = torch.full((ctx.stream.head_dim,), -1, dtype=torch.long, device=ctx.device)
            for t in earlier:
                owner[t.train.y] = t.index
            self.column_task = owner

    def _new_vae(self, n_inputs: int, ctx: Context) -> VAE:
        """A VAE initialised from a seed drawn from ctx.generator; the global CPU random
        state is restored afterwards, and no CUDA state is touched."""
        seed = int(torch.randint(2**62, (1,), generator=ctx.generator))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return VAE(n_inputs, self.params.vae_hidden, self.params.latent_dim)

    # ------------------------------------------------------------------ every step

    def real_fraction(self) -> float:
        """r: the given value, else 1/t at task t (t - 1 = the earlier tasks)."""
        return self.params.real_fraction or 1.0 / (self.n_old_tasks + 1)

    @torch.no_grad()
    def generate(self, n: int, ctx: Context) -> torch.Tensor:
        """n inputs x' = sigmoid(dec(z)), z ~ N(0, I), from the previous VAE: (n, *input_shape)."""
        z = torch.randn(n, self.old_vae.latent, generator=ctx.generator).to(ctx.device)
        return torch.sigmoid(self.old_vae.decode(z)).view(n, *ctx.stream.input_shape)

    @torch.no_grad()
    def previous_outputs(self, x: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """The previous solver's logits for x' (n, K) and each x's task tag (n,). Class-IL:
        the columns of classes not yet seen by it are -inf, so its argmax is an earlier class
        and its softened targets give them probability 0."""
        n = len(x)
        if ctx.stream.scenario == "class":
            logits = torch.full((n, ctx.stream.head_dim), -math.inf, device=x.device)
            logits[:, self.old_columns] = self.old_solver(x)[:, self.old_columns]
            return logits, self.column_task[logits.argmax(dim=1)]
        task = torch.randint(self.n_old_tasks, (n,), generator=ctx.generator).to(ctx.device)
        return self.old_solver(x, task), task  # task-IL: that task's head; domain: ignored

    def unusable_reason(self, problem: ProblemInfo) -> str | None:
        return needs_class_scores(problem, "labels its generated inputs by the previous model's "
                                           "argmax (or softmax) over the outputs")

    def replay_loss(self, old_logits: torch.Tensor, new_logits: torch.Tensor,
                    ctx: Context) -> torch.Tensor:
        """Hard: the training loss (ctx.loss_fn, cross-entropy: classification only, see
        unusable_reason) of new against argmax old (DGR). Soft: -sum_j softmax(old/T)_j
        log softmax(new/T)_j."""
        if not self.params.soft:
            return ctx.loss_fn(new_logits, old_logits.argmax(dim=1))
        t = self.params.temperature
        targets = F.softmax(old_logits / t, dim=1)  # exactly 0 on -inf columns
        return -(targets * F.log_softmax(new_logits / t, dim=1)).sum(1).mean()

    def penalty(self, ctx: Context) -> torch.Tensor | None:
        """((1 - r) / r) * replay loss on replay_batch_size fresh x' from the previous VAE."""
        self._materialise_old_solver(ctx)
        if self.old_vae is None:
            return None
        x = self.generate(self.params.replay_batch_size, ctx)  # (R, *input_shape)
        old_logits, task = self.previous_outputs(x, ctx)
        self._replay_x = x  # the generator trains on them too, in after_step
        r = self.real_fraction()
        return (1 - r) / r * self.replay_loss(old_logits, ctx.model(x, task), ctx)

    def after_step(self, batch: Batch, ctx: Context) -> None:
        """One Adam step of the VAE on r * -ELBO(real batch) + (1 - r) * -ELBO(this step's x')."""
        replay, self._replay_x = self._replay_x, None
        x = batch.x if replay is None else torch.cat([batch.x, replay])
        eps = torch.randn(len(x), self.vae.latent, generator=ctx.generator).to(ctx.device)
        b = len(batch.x)
        loss = negative_elbo(self.vae, x[:b], eps[:b])
        if replay is not None:
            r = self.real_fraction()
            loss = r * loss + (1 - r) * negative_elbo(self.vae, x[b:], eps[b:])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.vae_loss = loss.detach()

    def after_task(self, ctx: Context) -> None:
        self.optimizer = None  # the VAE's Adam moments: rebuilt at the next task start, not kept

    def _materialise_old_solver(self, ctx: Context) -> None:
        if self.old_solver is None and self._loaded_solver is not None:  # from a state dict
            self.old_solver = frozen_copy(ctx.model, self._loaded_solver)
            self._loaded_solver = None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        def weights(module):
            return None if module is None else module.state_dict()
        solver = weights(self.old_solver) if self.old_solver is not None else self._loaded_solver
        n_inputs = None if self.vae is None else self.vae.decoder[-1].out_features
        return {"vae": weights(self.vae), "old_vae": weights(self.old_vae), "old_solver": solver,
                "n_inputs": n_inputs, "n_old_tasks": self.n_old_tasks,
                "old_columns": self.old_columns, "column_task": self.column_task}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def vae_from(weights):
            if weights is None:
                return None
            with torch.random.fork_rng(devices=[]):  # the init is overwritten: draw nothing
                vae = VAE(state["n_inputs"], self.params.vae_hidden, self.params.latent_dim)
            vae.load_state_dict(weights)
            device = next(iter(weights.values())).device
            return vae.to(device)
        self.vae = vae_from(state["vae"])
        self.old_vae = vae_from(state["old_vae"])
        if self.old_vae is not None:
            self.old_vae.eval().requires_grad_(False)
        self.old_solver, self._loaded_solver = None, state["old_solver"]
        self.optimizer, self._replay_x = None, None
        self.n_old_tasks = int(state["n_old_tasks"])
        self.old_columns, self.column_task = state["old_columns"], state["column_task"]
