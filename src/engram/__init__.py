"""engram: a laboratory for catastrophic forgetting and loss of plasticity.

Importing engram is cheap and has no side effects; the pieces live in submodules
(`engram.data`, `engram.models`, `engram.methods`, `engram.metrics`, `engram.experiments.continual`).
`engram.load_results(folder)` and `engram.accuracy_matrices(frame)` (engram.frames, needs
pandas) are imported on first use.
"""

__version__ = "0.1.0"

LAZY = ("load_results", "accuracy_matrices")  # engram.frames' functions, named here


def __getattr__(name: str) -> object:  # no `typing` import: it costs more than engram
    """`engram.load_results` and `engram.accuracy_matrices`, importing engram.frames only
    when first asked for (pandas only when they are called)."""
    if name in LAZY:
        from engram import frames
        return getattr(frames, name)
    raise AttributeError(f"module 'engram' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *LAZY])
