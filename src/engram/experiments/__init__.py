"""Experiments: the commands that run many jobs into one output folder, on one harness.

Each module is one experiment (continual runs and sweeps, the importance profile,
plasticity, the sliding window). Experiments may import every library; no library imports
them.
"""
