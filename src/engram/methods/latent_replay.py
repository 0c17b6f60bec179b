"""Latent replay in the style of REMIND (Hayes et al., ECCV 2020, "REMIND your neural network
to prevent catastrophic forgetting"; reference sheet, section 18).

The network's body is cut in two: the lower part G (the first `frozen_layers` blocks, a block
being Linear + activation (+ dropout) for the mlp body or conv + activation (+ pool, dropout)
for the cnn body) and the upper part F (the rest of the body and the head). The algorithm:

1. Base initialisation: the first task trains the whole network as usual.
2. At the end of the first task, a product quantiser (Jegou et al. 2011) is fitted on G's
   features of that task's training set: each feature vector z (d floats, a cnn feature map
   flattened) is cut into M = `subvectors` sub-vectors of s = d / M floats (default: s = 4),
   and each subspace m gets a codebook C_m of K = `codebook_size` centroids by k-means
   (Lloyd's iterations, `kmeans_iterations` of them, all M subspaces at once):

       code_m(z) = argmin_k || z_m - C_m[k] ||^2,     decode(code) = [C_1[code_1], ..., C_M[code_M]]

   Codes are uint8 (K <= 256), so an example costs M bytes plus its target and task id.
3. G is frozen from the second task on: its parameters stop requiring gradients, so the
   runner's optimizer skips them (no update, no weight decay, no moments, any optimizer).
4. At the end of every task (the first included) the task's training examples are encoded
   (G in eval mode, then PQ) and offered to a memory of `memory` codes kept by a `policy`
   taken from `engram.methods.replay`: a reservoir sample of everything offered, or REMIND's
   class-balanced buffer (when full, evict a random example of the largest class).
5. From the second task on, each step adds a replay loss on `replay_batch_size` stored codes
   drawn uniformly with replacement (ctx.generator), decoded and passed through F only:

       L = CE(F(q(G(x))), y)  +  CE(F(decode(c_r)), y_r)     (each term a mean over its batch)

   so the current and the replayed mini-batch weigh the same whatever their sizes (REMIND
   takes the mean over the concatenation [new + replays], which weighs them by their sizes).
   q = decode(encode(.)) when `quantise_live` (the default, as REMIND: new examples are
   trained and test examples predicted through the quantiser, "so features are in the same
   space as training data", REMINDModel.predict); it is a forward hook on G's last layer,
   active once the codebooks exist, so evaluation of the live model is quantised too. With
   `quantise_live: false`, q is the identity: F then sees exact features for the current
   task and at test time, reconstructed ones for replays.
   Task-incremental streams: the stored task id picks the head; domain- and class-
   incremental streams have one head and the stored targets are the scenario's targets.

Simplifications against the paper, all because engram trains tasks in mini-batch epochs
through its one loop rather than one example at a time:
- REMIND streams each example once, encodes it, trains one SGD step on [decoded new example +
  50 decoded replays] and then stores it. Here each task is trained for train.epochs epochs
  of mini-batches and its examples enter the memory at the task's end; replays are of
  earlier tasks only.
- No augmentation of the replayed features (REMIND's random-resized crops of the 7x7 map and
  mixup) and no per-class learning-rate schedule: the runner's optimizer is used.
- The cnn feature map is quantised as one flattened vector, not as one d-vector per spatial
  position as REMIND does with ResNet-18's 7x7x512 maps.
- k-means is plain Lloyd's (random distinct training vectors as the first centroids; an empty
  cluster keeps its centroid), not faiss's. With fewer base vectors N than K, the extra
  centroids are copies of drawn vectors, so some codes are never used.
- The base initialisation is one task of the stream (split digits: two classes), not 100
  ImageNet classes, so G's features and the codebooks know little of later classes.

Defaults (chosen on the validation split of split digits, class-incremental, Adam lr 0.01,
mlp [256, 256], seeds 0-2): K = 64 and s = 4 (M = 64 for d = 256) gave 0.87 +- 0.03; M = 32,
K in {16, 64, 256} and K = 256 with M = 64 did worse (0.50 to 0.73) and varied a lot between
seeds. The cause of the variance: under Adam at lr 0.01, F's hidden ReLU units die (silent
on every task's training data: about half after task 1, 95% from task 3 on, with the
defaults, seed 0), and with G frozen they cannot come back; at lr 0.001 the same method
keeps 64% dead and reaches 0.95 (validation, seed 0).

Memory bill (`extra_bytes`): codes N*M bytes (uint8) + targets and task ids N*2*2 bytes
(int16) + codebooks M*K*s*4 = K*d*4 bytes (float32), N being the filled memory slots (the
sum of the state's tensors). The frozen G is part of the live model and is not billed.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from engram.schema import opt
from engram.data.streams import TensorSet
from engram.errors import ConfigError
from engram.methods.base import Context, Method, ProblemInfo
from engram.methods.replay import Replay, ReplayParams
from engram.models.protocol import require_structure

LABEL_DTYPE = torch.int16  # stored targets and task ids: 2 bytes each is enough for any stream
ENCODE_CHUNK = 1024  # vectors per distance computation: bounds memory at M * chunk * K floats


@dataclass
class LatentReplayParams:
    frozen_layers: int = opt(1, "blocks of the body (Linear or conv + activation) in the frozen "
                                "lower part G; the rest of the body and the head stay plastic",
                             low=1)
    subvectors: int | None = opt(None, "M: the product quantiser cuts G's d features into M "
                                       "sub-vectors (M must divide d); each stored example costs "
                                       "M bytes. null: d / 4, sub-vectors of 4 floats", low=1)
    codebook_size: int = opt(64, "K: centroids per subspace (K <= 256, codes are uint8)",
                             low=1, high=256)
    kmeans_iterations: int = opt(25, "Lloyd iterations fitting the codebooks", low=1)
    memory: int = opt(2000, "stored codes (fixed budget; codes are small)", low=1)
    replay_batch_size: int | None = opt(None, "stored codes replayed per step "
                                              "(null: train.batch_size)", low=1)
    quantise_live: bool = opt(True, "after the base task, quantise G's output in every forward "
                                    "pass too (the current batch, evaluation), as REMIND does, "
                                    "so F only sees reconstructed features; false: exact features")
    policy: Literal["reservoir", "class_balanced"] = opt(
        "reservoir", "what the memory keeps: a uniform sample of everything offered, or "
        "REMIND's equal shares per class (evict from the largest class)")


# ----------------------------------------------------------------------------- quantiser

def squared_distances(vectors: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """|| v_m - C_m[k] ||^2 for each subspace m: vectors (M, N, s), codebooks (M, K, s) ->
    (M, N, K). Expanded as |v|^2 - 2 v.c + |c|^2 (one batched matmul)."""
    cross = torch.bmm(vectors, codebooks.transpose(1, 2))                    # (M, N, K)
    return (vectors.pow(2).sum(-1, keepdim=True) - 2 * cross
            + codebooks.pow(2).sum(-1).unsqueeze(1)).clamp_min(0)


def resolve_subvectors(d: int, subvectors: int | None) -> int:
    """M for d features: `subvectors` if it divides d (equal sub-vectors), else a ConfigError;
    None gives sub-vectors of 4 floats (of gcd(d, 4) when 4 does not divide d)."""
    if subvectors is None:
        return d // math.gcd(d, 4)
    if d % subvectors:
        divisors = [k for k in range(1, d + 1) if d % k == 0]
        raise ConfigError(f"latent_replay: subvectors={subvectors} does not divide the {d} "
                          f"features of the frozen part G (set by frozen_layers); choose one "
                          f"of {divisors}")
    return subvectors


def split_subvectors(features: torch.Tensor, subvectors: int) -> torch.Tensor:
    """Features (N, d) -> (M, N, d / M): subspace m holds columns m*s .. (m+1)*s - 1."""
    n, d = features.shape
    return features.reshape(n, subvectors, d // subvectors).transpose(0, 1)


def pq_encode(features: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Codes (N, M) uint8: per subspace, the index of the nearest centroid. features (N, d)."""
    m = codebooks.shape[0]
    codes = []
    for start in range(0, len(features), ENCODE_CHUNK):
        parts = split_subvectors(features[start:start + ENCODE_CHUNK], m)   # (M, n, s)
        codes.append(squared_distances(parts, codebooks).argmin(-1).T)    # (n, M)
    if not codes:
        return torch.zeros((0, m), dtype=torch.uint8, device=features.device)
    return torch.cat(codes).to(torch.uint8)


def pq_decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Features (N, d) from codes (N, M): the chosen centroids of the M subspaces side by side."""
    m = codebooks.shape[0]
    chosen = codebooks[torch.arange(m, device=codes.device), codes.long()]  # (N, M, s)
    return chosen.reshape(len(codes), -1)


def fit_codebooks(features: torch.Tensor, subvectors: int, codebook_size: int,
                  iterations: int, generator: torch.Generator) -> torch.Tensor:
    """k-means (Lloyd) in each of the M subspaces at once: features (N, d) -> codebooks
    (M, K, d / M). Initial centroids: K distinct training vectors drawn with `generator`
    (all of them plus repeats when N < K); an empty cluster keeps its centroid."""
    n, d = features.shape
    resolve_subvectors(d, subvectors)  # a clear error when M does not divide d
    vectors = split_subvectors(features.float(), subvectors)               # (M, N, s)
    first = torch.randperm(n, generator=generator)[:codebook_size]
    if n < codebook_size:
        first = torch.cat([first, torch.randint(n, (codebook_size - n,), generator=generator)])
    codebooks = vectors[:, first.to(features.device)].clone()              # (M, K, s)
    size = vectors.shape[-1]
    for _ in range(iterations):
        nearest = pq_encode(features.float(), codebooks).long().T         # (M, N), chunked
        sums = torch.zeros_like(codebooks).scatter_add_(
            1, nearest.unsqueeze(-1).expand(-1, -1, size), vectors)        # (M, K, s)
        counts = torch.zeros(codebooks.shape[:2], device=features.device).scatter_add_(
            1, nearest, torch.ones_like(nearest, dtype=torch.float))       # (M, K)
        filled = counts > 0
        codebooks[filled] = sums[filled] / counts[filled].unsqueeze(-1)
    return codebooks


# ----------------------------------------------------------------------------- the split

def block_cut(body: nn.Module, frozen_layers: int) -> int:
    """Index in `body` (an nn.Sequential) where G ends: just before the first Linear/conv of
    block number `frozen_layers` + 1, or the body's end when G takes every block."""
    if not isinstance(body, nn.Sequential):
        raise ConfigError("latent_replay needs a model whose body is an nn.Sequential "
                          "(the mlp and cnn models)")
    starts = [i for i, layer in enumerate(body) if isinstance(layer, (nn.Linear, nn.Conv2d))]
    if frozen_layers > len(starts):
        raise ConfigError(f"latent_replay: frozen_layers={frozen_layers} but the body has only "
                          f"{len(starts)} Linear/conv blocks; choose 1..{len(starts)}")
    return starts[frozen_layers] if frozen_layers < len(starts) else len(body)


def _weak_hook(method_ref: weakref.ref) -> Any:
    """A forward hook calling `method._quantise_output` while the method is alive."""
    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> Any:
        method = method_ref()
        return None if method is None else method._quantise_output(module, inputs, output)
    return hook


class LatentReplay(Method):
    """Freeze the lower layers after the first task; replay product-quantised features of
    stored examples through the upper layers."""

    Params = LatentReplayParams
    model_needs = ("features", "head", "sequential_body")  # G, F: cut the body; the head

    def __init__(self, params: LatentReplayParams | None = None) -> None:
        super().__init__(params)
        self.codebooks: torch.Tensor | None = None  # (M, K, s) float32, fitted after task 1
        self.feature_shape: list[int] = []          # G's output shape of one example
        # The memory: codes (memory, M) uint8, targets and task ids (memory,) int16.
        self.store = Replay(ReplayParams(memory=self.params.memory, policy=self.params.policy))
        self._exact = False  # set while encoding: G's output passes the quantising hook as is
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    # -- the two parts of the network

    def lower(self, model: nn.Module) -> nn.Sequential:
        """G: the first blocks of the body (for the mlp body, Flatten included)."""
        return model.body[:block_cut(model.body, self.params.frozen_layers)]

    def upper_logits(self, model: nn.Module, features: torch.Tensor,
                     task: torch.Tensor) -> torch.Tensor:
        """F: the rest of the body and the head, on flat G features (B, d)."""
        rest = model.body[block_cut(model.body, self.params.frozen_layers):]
        z = rest(features.view(len(features), *self.feature_shape))
        return model.output(z, task.long())

    @torch.no_grad()
    def lower_features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """G's features (N, ...) in eval mode (no dropout noise): (N, d) or (N, C, H, W)."""
        was_training, self._exact = model.training, True
        model.eval()
        lower = self.lower(model)
        try:
            z = torch.cat([lower(x[i:i + ENCODE_CHUNK]) for i in range(0, len(x), ENCODE_CHUNK)])
        finally:
            model.train(was_training)
            self._exact = False
        return z

    def _quantise_output(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> Any:
        """Forward hook on G's last layer: once the quantiser exists, replace G's output
        (B, ...) by decode(encode(output)), a constant (G is frozen, so no gradient is lost)."""
        if self.codebooks is None or self._exact:
            return None  # keep the output
        flat = output.detach().reshape(len(output), -1)                    # (B, d)
        return pq_decode(pq_encode(flat, self.codebooks), self.codebooks).view_as(output)

    # -- hooks

    def unusable_reason(self, problem: ProblemInfo) -> str | None:
        if not problem.classification:
            return ("stores each example's target as an int16 class label, and this problem is "
                    "a regression (squared error on real-valued targets)")
        return None

    def prepare_model(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Check the cut and the subvector count now, not after the first task's training;
        with quantise_live, hook the quantiser onto G's last layer (idle until it is fitted)."""
        require_structure(model, self.model_needs, "latent_replay")
        with torch.no_grad():
            lower = self.lower(model)
            probe = torch.zeros((1,) + tuple(ctx.stream.input_shape),
                                device=next(model.parameters()).device)
            d = lower(probe).numel()
        resolve_subvectors(d, self.params.subvectors)
        if self.params.quantise_live:
            if self._hook is not None:
                self._hook.remove()
            # Through a weak reference: a bound method would make copy.deepcopy(model) (LwF,
            # snapshots) silently copy this whole method, codes and codebooks included.
            self._hook = lower[-1].register_forward_hook(_weak_hook(weakref.ref(self)))
        return model

    def before_task(self, ctx: Context) -> None:
        if self.codebooks is not None:  # the base task is over: G stays as it was then
            self.lower(ctx.model).requires_grad_(False)

    def penalty(self, ctx: Context) -> torch.Tensor | None:
        filled = self.store.n_filled
        if filled == 0:
            return None
        size = self.params.replay_batch_size or ctx.train_cfg.batch_size
        pick = torch.randint(filled, (size,), generator=ctx.generator).to(self.codebooks.device)
        codes, targets, tasks = (part[pick] for part in self.store.buffer)
        logits = self.upper_logits(ctx.model, pq_decode(codes, self.codebooks), tasks)
        return ctx.loss_fn(logits, targets.long())  # class labels: see unusable_reason

    def after_task(self, ctx: Context) -> None:
        data = ctx.task.train
        features = self.lower_features(ctx.model, data.x)
        self.feature_shape = list(features.shape[1:])
        features = features.reshape(len(features), -1)                     # (N, d)
        if self.codebooks is None:  # the base task: fit the quantiser on its features
            p = self.params
            m = resolve_subvectors(features.shape[1], p.subvectors)
            self.codebooks = fit_codebooks(features, m, p.codebook_size,
                                           p.kmeans_iterations, ctx.generator)
        if data.y.abs().max() > torch.iinfo(LABEL_DTYPE).max:
            raise ConfigError("latent_replay stores targets as int16; this stream has more classes")
        encoded = TensorSet(pq_encode(features, self.codebooks),
                            data.y.to(LABEL_DTYPE), data.task.to(LABEL_DTYPE))
        self.store.after_step(encoded, ctx)  # the reservoir / class-balanced insertion

    # -- state

    def state_dict(self) -> dict[str, Any]:
        filled = self.store.n_filled
        stored = self.store.buffer
        buffer = None if stored is None else [part[:filled] for part in stored]
        return {"codebooks": self.codebooks, "feature_shape": list(self.feature_shape),
                "buffer": buffer, "n_seen": self.store.n_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.codebooks = state["codebooks"]
        self.feature_shape = list(state["feature_shape"])
        buffer = state["buffer"]
        if buffer is not None:  # back to the full allocation the memory policy fills
            padding = self.params.memory - len(buffer[0])
            buffer = [torch.cat([part, part.new_zeros((padding,) + part.shape[1:])])
                      for part in buffer]
        self.store.load_state_dict({"buffer": buffer, "n_seen": state["n_seen"]})
