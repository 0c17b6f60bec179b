"""Naive fine-tuning: train on each task in turn with nothing to protect earlier tasks.

The lower bound every method is compared with; in class-incremental learning it remembers
essentially only the last task (van de Ven & Tolias 2019).
"""

from engram.methods.base import Method


class Naive(Method):
    """Plain sequential training; every hook is the base class's no-op."""
    batchable = True  # its seeds may train as one stacked network (batch_seeds)
