"""engram's version, in a module of its own: what a results folder records (experiment.json,
provenance.jsonl) without importing the package root, whose lazy exports reach the top layer."""

__version__ = "0.1.0"
