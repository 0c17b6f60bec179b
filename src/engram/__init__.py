"""engram: a laboratory for catastrophic forgetting and loss of plasticity.

Importing engram is cheap and has no side effects; the pieces live in submodules
(`engram.data`, `engram.models`, `engram.methods`, `engram.metrics`, `engram.experiments.continual`).
`engram.load_results(folder)` and `engram.accuracy_matrices(frame)` (engram.frames, needs
pandas), `engram.stream_from(train, test, ...)` (engram.data.user: a Stream from your own
data) and `engram.fit(model, stream, method, ...)` (engram.api: train any network with any
method) are imported on first use.

Public API (the pages of the API reference, `python docs/build_api.py`); everything else
(the CLI, the harness, the experiments, names starting with _) is internal and may change:

* `engram.fit`, `engram.stream_from`, `engram.load_results`, `engram.accuracy_matrices`:
  train and evaluate from Python, and query any results table (engram.api,
  engram.data.user, engram.frames); engram.data.streams holds the Stream they pass around.
* engram.models.adapt: your own nn.Module as an engram network (engram.models.protocol).
* engram.registry: the registries (MODELS, DATASETS, STREAMS, PROBLEMS, METHODS, MEASURES);
  a plugin adds an entry with one line, `METHODS.add(name, cls, description)`.
* engram.methods.base: the Method hooks and the Context they read, for writing a method.
* engram.metrics: pure functions of an accuracy matrix (average accuracy, forgetting,
  backward and forward transfer) and the loss-of-plasticity diagnostics.
* engram.results: the tidy results table (columns, writer, reader, accuracy matrices);
  engram.errors: the one-line errors engram raises.
"""

from engram.version import __version__

LAZY = ("load_results", "accuracy_matrices", "stream_from", "fit")  # imported on first use
__all__ = ["fit", "stream_from", "load_results", "accuracy_matrices"]  # the lazy names


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
