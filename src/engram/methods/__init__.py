"""Methods against forgetting: one file each, one registry line each.

A method class has a `Params` dataclass (its validated config keys) and overrides the
hooks of `engram.methods.base.Method` that it needs.
"""

from __future__ import annotations

from engram.methods.agem import AGEM
from engram.methods.anchor import L2, MAS, OnlineEWC
from engram.methods.base import Batch, Context, Method
from engram.methods.compose import Compose
from engram.methods.continual_backprop import ContinualBackprop
from engram.methods.der import DER, DERpp
from engram.methods.er_ace import ERACE
from engram.methods.ewc import EWC
from engram.methods.gdumb import GDumb
from engram.methods.gem import GEM
from engram.methods.generative_replay import GenerativeReplay
from engram.methods.icarl import ICaRL
from engram.methods.joint import Joint
from engram.methods.l2_init import L2Init
from engram.methods.latent_replay import LatentReplay
from engram.methods.lwf import LwF
from engram.methods.mcsgd import MCSGD
from engram.methods.multihead import MultiHead
from engram.methods.naive import Naive
from engram.methods.ogd import OGD
from engram.methods.packnet import PackNet
from engram.methods.progressive import Progressive
from engram.methods.pseudo_rehearsal import PseudoRehearsal
from engram.methods.redo import ReDo
from engram.methods.replay import Replay
from engram.methods.rwalk import EWCpp, RWalk
from engram.methods.sam import SAM
from engram.methods.shrink_perturb import ShrinkPerturb
from engram.methods.si import SI
from engram.methods.sleep import Sleep
from engram.methods.snapshots import Snapshots
from engram.registry import METHODS

METHODS.add("naive", Naive, "fine-tune on each task in turn; the lower bound")
METHODS.add("joint", Joint, "train on all tasks seen so far; the upper bound")
METHODS.add("ewc", EWC, "elastic weight consolidation with a named Fisher estimator (Kirkpatrick et al. 2017)")
METHODS.add("online_ewc", OnlineEWC, "online EWC: decayed sum of Fishers, one anchor (Schwarz et al. 2018)")
METHODS.add("mas", MAS, "memory aware synapses: importance from output sensitivity (Aljundi et al. 2018)")
METHODS.add("l2", L2, "L2 penalty pulling the weights to the previous task's weights")
METHODS.add("si", SI, "synaptic intelligence: path-integral importance (Zenke et al. 2017)")
METHODS.add("rwalk", RWalk, "Riemannian walk: EWC++ online Fisher plus a KL-normalised path score (Chaudhry et al. 2018)")
METHODS.add("ewcpp", EWCpp, "EWC++: a moving average of squared gradients as the Fisher, one anchor (Chaudhry et al. 2018)")
METHODS.add("lwf", LwF, "learning without forgetting: distil the previous model's outputs (Li & Hoiem 2016)")
METHODS.add("agem", AGEM, "A-GEM: project gradients so the loss on an episodic memory does not rise (Chaudhry et al. 2019)")
METHODS.add("gem", GEM, "GEM: project gradients so that no earlier task's memory loss rises, one constraint per task (Lopez-Paz & Ranzato 2017)")
METHODS.add("ogd", OGD, "orthogonal gradient descent: project gradients off earlier tasks' logit gradients (Farajtabar et al. 2020)")
METHODS.add("replay", Replay, "experience replay from a fixed-size reservoir-sampled memory")
METHODS.add("der", DER, "dark experience replay: a reservoir memory of examples with their logits, matched by MSE (Buzzega et al. 2020)")
METHODS.add("derpp", DERpp, "DER++: DER plus cross-entropy on a second memory batch (Buzzega et al. 2020)")
METHODS.add("er_ace", ERACE, "ER-ACE: replay whose incoming batch's cross-entropy masks the seen classes absent from it (Caccia et al. 2022)")
METHODS.add("icarl", ICaRL, "iCaRL: herding exemplars, sigmoid distillation of earlier classes, nearest-mean-of-exemplars classifier (Rebuffi et al. 2017)")
METHODS.add("gdumb", GDumb, "GDumb: greedy class-balanced memory, network retrained from scratch on it each task (Prabhu et al. 2020)")
METHODS.add("pseudo_rehearsal", PseudoRehearsal, "rehearse the previous network's outputs on random inputs; stores no data (Robins 1995)")
METHODS.add("latent_replay", LatentReplay, "REMIND-style latent replay: freeze the lower layers after task 1, replay product-quantised features through the upper layers (Hayes et al. 2020)")
METHODS.add("multihead", MultiHead, "shared trunk, one head per task; the trunk frozen after N tasks (task-IL heads)")
METHODS.add("snapshots", Snapshots, "store the whole model after every task; task-IL picks each task's copy by task id")
METHODS.add("generative_replay", GenerativeReplay, "deep generative replay: a VAE generates earlier inputs, the previous model labels them (Shin et al. 2017)")
METHODS.add("sam", SAM, "sharpness-aware minimisation, the flat-minimum option; compose it with any method (Foret et al. 2021)")
METHODS.add("mcsgd", MCSGD, "mode-connectivity SGD: merge each task's solution with the previous one along low-loss lines (Mirzadeh et al. 2021)")
METHODS.add("packnet", PackNet, "PackNet: per-task weight masks by iterative magnitude pruning; task-incremental (Mallya & Lazebnik 2018)")
METHODS.add("progressive", Progressive, "progressive neural networks: a new column per task with lateral connections, earlier columns frozen (Rusu et al. 2016)")
METHODS.add("sleep", Sleep, "sleep replay consolidation: spiking sleep with Hebbian plasticity after each task (Tadros et al. 2022)")
METHODS.add("continual_backprop", ContinualBackprop, "continual backprop: replace the mature hidden units of lowest utility, a few per step (Dohare et al. 2024)")
METHODS.add("shrink_perturb", ShrinkPerturb, "shrink and perturb: theta <- shrink*theta + noise, per task (Ash & Adams 2020) or per step (Dohare et al. 2024)")
METHODS.add("l2_init", L2Init, "L2 toward the initial weights: lambda*||theta - theta_0||^2 (Kumar et al. 2023)")
METHODS.add("redo", ReDo, "ReDo: every F steps reinitialise the dormant hidden units (Sokar et al. 2023)")
METHODS.add("compose", Compose, "several methods at once, e.g. replay + EWC: hooks in order, penalties summed")

__all__ = ["METHODS", "Batch", "Context", "Method"]
