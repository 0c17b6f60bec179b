"""engram: a laboratory for catastrophic forgetting and loss of plasticity.

Importing engram is cheap and has no side effects; the pieces live in submodules
(`engram.data`, `engram.models`, `engram.methods`, `engram.metrics`, `engram.experiments.continual`).
`engram.load_results(folder)` and `engram.accuracy_matrices(frame)` (engram.frames, needs
pandas), `engram.stream_from(train, test, ...)` (engram.data.user: a Stream from your own
data) and `engram.fit(model, stream, method, ...)` (engram.api: train any network with any
method) are imported on first use.
"""

__version__ = "0.1.0"

LAZY = ("load_results", "accuracy_matrices", "stream_from", "fit")  # imported on first use


def __getattr__(name: str) -> object:  # no `typing` import: it costs more than engram
    """The names in LAZY, importing their module only when first asked for: torch with
    stream_from and fit, pandas only when load_results or accuracy_matrices are called."""
    if name == "fit":
        from engram.api import fit  # a lazy re-export (tests/test_layers.py)
        return fit
    if name == "stream_from":
        from engram.data.user import stream_from  # a lazy re-export (tests/test_layers.py)
        return stream_from
    if name in LAZY:
        from engram import frames
        return getattr(frames, name)
    raise AttributeError(f"module 'engram' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *LAZY])
