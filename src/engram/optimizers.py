"""torch.optim by name: the optimizer and learning-rate scheduler a training config asks for.

Ground floor (imports only errors and schema; torch is imported inside the functions). A
config names any optimizer class of `torch.optim` (case-insensitive: sgd, adam, adamw,
rmsprop, ...) with extra keyword arguments, and optionally a class of
`torch.optim.lr_scheduler` with its own arguments. `check_optimization` validates all of it
when a config is loaded, so a misspelt name or argument stops before any training:

    check_optimization(train, "train")          # ConfigError naming the key, else None
    optimizer = build_optimizer(model.parameters(), train)
    scheduler = build_scheduler(optimizer, train)   # None without train.scheduler

`train` is any object with the fields of engram.config.TrainConfig's optimizer part:
optimizer, lr, momentum, weight_decay, optimizer_args, scheduler, scheduler_args,
scheduler_step (the last four may be absent: no arguments, no scheduler).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Iterable

from engram.errors import ConfigError
from engram.schema import short_repr

# Config fields every optimizer gets (when its class takes them); optimizer_args may not
# repeat them, so a setting has one place.
OWN_FIELDS = ("lr", "momentum", "weight_decay")

# Classes of torch.optim that engram's training step cannot drive, and why.
UNSUPPORTED_OPTIMIZERS = {
    "lbfgs": "its step() needs a closure that re-evaluates the loss, which engram's training "
             "step (one backward pass, then the method's hooks) does not give",
    "sparseadam": "it takes only sparse gradients, and engram's networks have dense ones",
    "muon": "it takes only 2-D weight matrices, and engram's networks have biases too",
}
# Schedulers whose required arguments are Python objects a YAML config cannot hold.
UNSUPPORTED_SCHEDULERS = {
    "lambdalr": "it needs a Python function (lr_lambda)",
    "multiplicativelr": "it needs a Python function (lr_lambda)",
    "chainedscheduler": "it needs scheduler objects",
    "sequentiallr": "it needs scheduler objects",
}
PLATEAU = "reducelronplateau"  # steps on a loss, not a count


@functools.cache
def optimizer_classes() -> dict[str, type]:
    """Lower-case name -> class of every optimizer in torch.optim (without the base class)."""
    import torch

    return {name.lower(): cls for name, cls in vars(torch.optim).items()
            if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
            and cls is not torch.optim.Optimizer}


@functools.cache
def scheduler_classes() -> dict[str, type]:
    """Lower-case name -> class of every scheduler in torch.optim.lr_scheduler (without the
    base classes)."""
    from torch.optim import lr_scheduler

    bases = {"lrscheduler", "_lrscheduler"}
    classes = {name.lower(): cls for name, cls in vars(lr_scheduler).items()
               if isinstance(cls, type) and not name.startswith("_")
               and issubclass(cls, (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau))}
    return {name: cls for name, cls in classes.items() if name not in bases}


def _lookup(name: Any, classes: dict[str, type], unsupported: dict[str, str], key: str,
            what: str) -> type:
    """The class `name` names (any case), or a one-line ConfigError listing the usable ones."""
    usable = sorted(n for n in classes if n not in unsupported)
    lowered = name.lower() if isinstance(name, str) else None
    if lowered in unsupported:
        raise ConfigError(f"{key}: {classes[lowered].__name__} cannot be used: "
                          f"{unsupported[lowered]}; choose one of: {', '.join(usable)}")
    if lowered not in classes:
        raise ConfigError(f"{key}: unknown {what} {short_repr(name)}; choose one of: "
                          f"{', '.join(usable)}")
    return classes[lowered]


def optimizer_class(name: Any, key: str = "train.optimizer") -> type:
    """The torch.optim class `name` names (case-insensitive)."""
    return _lookup(name, optimizer_classes(), UNSUPPORTED_OPTIMIZERS, key, "optimizer")


def scheduler_class(name: Any, key: str = "train.scheduler") -> type:
    """The torch.optim.lr_scheduler class `name` names (case-insensitive)."""
    return _lookup(name, scheduler_classes(), UNSUPPORTED_SCHEDULERS, key, "scheduler")


def _keywords(cls: type, first: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments of cls(...) after its first one (params / optimizer)."""
    return {name: p for name, p in inspect.signature(cls).parameters.items()
            if name != first and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _with_tuples(args: dict[str, Any], accepted: dict[str, inspect.Parameter]) -> dict[str, Any]:
    """YAML has lists, torch's defaults are tuples (Adam's betas): give what torch expects."""
    return {k: tuple(v) if isinstance(v, list) and isinstance(accepted[k].default, tuple)
            else v for k, v in args.items()}


def lower_name(name: Any) -> Any:
    """A class name as configs store it: lower case, so `Adam` and `adam` are one run (one
    run id). Anything but a string is left for the checks to name."""
    return name.lower() if isinstance(name, str) else name


def optimizer_takes(name: str, argument: str) -> bool:
    """Whether the optimizer class `name` names takes keyword `argument` (e.g. momentum)."""
    return argument in _keywords(optimizer_class(name), "params")


def optimizer_kwargs(train: Any, foreach: bool | None = None) -> dict[str, Any]:
    """The keyword arguments of the config's optimizer class: lr, momentum and weight_decay
    where the class takes them, then optimizer_args (and foreach, when given and taken)."""
    cls = optimizer_class(train.optimizer)
    accepted = _keywords(cls, "params")
    kwargs = {name: getattr(train, name) for name in OWN_FIELDS
              if name in accepted and hasattr(train, name)}  # the window has no momentum
    kwargs.update(_with_tuples(getattr(train, "optimizer_args", {}) or {}, accepted))
    if foreach is not None and "foreach" in accepted:
        kwargs["foreach"] = foreach
    return kwargs


def build_optimizer(params: Iterable[Any], train: Any, foreach: bool | None = None) -> Any:
    """The config's torch.optim optimizer over `params`. foreach=True batches the update over
    all tensors (on the CPU faster for many small tensors)."""
    return optimizer_class(train.optimizer)(params, **optimizer_kwargs(train, foreach))


def build_scheduler(optimizer: Any, train: Any) -> Any:
    """The config's LR scheduler on `optimizer`, or None when train.scheduler is unset."""
    name = getattr(train, "scheduler", None)
    if name is None:
        return None
    cls = scheduler_class(name)
    args = getattr(train, "scheduler_args", {}) or {}
    return cls(optimizer, **_with_tuples(args, _keywords(cls, "optimizer")))


def is_plateau(scheduler: Any) -> bool:
    """Whether `scheduler` steps on a loss (ReduceLROnPlateau) rather than on a count."""
    return type(scheduler).__name__.lower() == PLATEAU


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def check_optimization(train: Any, where: str = "train", *, strict_momentum: bool = True
                       ) -> None:
    """ConfigError (one line naming the key) unless `train`'s optimizer and scheduler can be
    built: known class names, arguments the classes take, no momentum or weight decay for an
    optimizer without them, every required scheduler argument given, and values the classes
    accept (both are built once on a probe tensor). strict_momentum=False lets a momentum be
    ignored by an optimizer without one (the profiler's default momentum is 0.9)."""
    import torch

    def key(name: str) -> str:
        return f"{where}.{name}" if where else name

    cls = optimizer_class(train.optimizer, key("optimizer"))
    accepted = _keywords(cls, "params")
    for name in ("momentum", "weight_decay"):
        value = getattr(train, name, 0.0)
        if value and name not in accepted and (name != "momentum" or strict_momentum):
            takers = sorted(n for n, c in optimizer_classes().items()
                            if n not in UNSUPPORTED_OPTIMIZERS and name in _keywords(c, "params"))
            raise ConfigError(f"{key(name)}: {cls.__name__} takes no {name}, so {key(name)}="
                              f"{value} would be ignored; set it to 0 or choose an optimizer "
                              f"that takes it: {', '.join(takers)}")
    args = getattr(train, "optimizer_args", {}) or {}
    for name in args:
        if name in OWN_FIELDS and hasattr(train, name):  # the window has no momentum field
            raise ConfigError(f"{key('optimizer_args')}.{name}: set {key(name)} instead (it "
                              "applies to every optimizer)")
        if name not in accepted:
            raise ConfigError(
                f"{key('optimizer_args')}.{name}: {cls.__name__} takes no argument {name!r}; "
                "it takes: " + ", ".join(n for n in accepted if not hasattr(train, n)))
    probe = [torch.zeros(2, 2, requires_grad=True)]
    try:
        optimizer = cls(probe, **optimizer_kwargs(train))
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"{key('optimizer_args')}: {cls.__name__} refuses "
                          f"{short_repr(args)}: {_one_line(err)}") from None

    name = getattr(train, "scheduler", None)
    scheduler_args = getattr(train, "scheduler_args", {}) or {}
    if name is None:
        if scheduler_args:
            raise ConfigError(f"{key('scheduler_args')}: given without {key('scheduler')}; "
                              "name a scheduler too, e.g. cosineannealinglr")
        return
    scheduler_cls = scheduler_class(name, key("scheduler"))
    accepted = _keywords(scheduler_cls, "optimizer")
    for arg in scheduler_args:
        if arg not in accepted:
            raise ConfigError(f"{key('scheduler_args')}.{arg}: {scheduler_cls.__name__} takes "
                              f"no argument {arg!r}; it takes: {', '.join(accepted)}")
    missing = [n for n, p in accepted.items() if p.default is p.empty and n not in scheduler_args]
    if missing:
        raise ConfigError(f"{key('scheduler_args')}: {scheduler_cls.__name__} needs "
                          f"{', '.join(missing)}, e.g. {key('scheduler_args')}: "
                          f"{{{missing[0]}: ...}}")
    if name.lower() == PLATEAU and getattr(train, "scheduler_step", "epoch") != "epoch":
        raise ConfigError(f"{key('scheduler_step')}: {scheduler_cls.__name__} watches the "
                          "epoch's training loss; use scheduler_step: epoch")
    try:
        build_scheduler(optimizer, train)
    except (ValueError, TypeError, RuntimeError, KeyError) as err:
        raise ConfigError(f"{key('scheduler_args')}: {scheduler_cls.__name__} refuses "
                          f"{short_repr(scheduler_args)}: {_one_line(err)}") from None
