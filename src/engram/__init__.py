"""engram: a laboratory for catastrophic forgetting and loss of plasticity.

Importing engram is cheap and has no side effects; the pieces live in submodules
(`engram.data`, `engram.models`, `engram.methods`, `engram.metrics`, `engram.experiments.continual`).
"""

__version__ = "0.1.0"
