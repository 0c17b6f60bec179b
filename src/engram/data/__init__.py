"""Datasets (sources read from disk), streams (how a dataset becomes a task sequence) and
plasticity problems (long non-stationary streams), registered in engram.registry.

    source = DATASETS.get("digits")(path)                 -> SourceData (tensors)
    stream = build_stream(source, data_cfg, stream_cfg, seed, device) -> Stream
"""

from __future__ import annotations

from engram.data import problems, sources, streams  # noqa: F401 - problems registers PROBLEMS
from engram.data.problems import Problem, ProblemConfig
from engram.data.sources import SourceData, load_source
from engram.data.streams import Stream, Task, TensorSet, build_stream
from engram.registry import DATASETS, PROBLEMS, STREAMS

DATASETS.add("digits", sources.load_digits, "scikit-learn's bundled 8x8 handwritten digits, 1797 images, offline default")
DATASETS.add("mnist", sources.load_mnist, "MNIST from the standard IDX files (.gz or raw) in data.path")
DATASETS.add("fashion_mnist", sources.load_fashion_mnist, "Fashion-MNIST from the standard IDX files (.gz or raw) in data.path")
DATASETS.add("cifar10", sources.load_cifar10, "CIFAR-10 from its python batches in data.path, read without running pickled code")
DATASETS.add("cifar100", sources.load_cifar100, "CIFAR-100 from its python files in data.path (data.labels: fine or coarse), read without running pickled code")
DATASETS.add("tiny_imagenet", sources.load_tiny_imagenet, "TinyImageNet's tiny-imagenet-200 folder in data.path (200 classes, 64x64; val is the test split), needs Pillow")
DATASETS.add("image_folder", sources.load_image_folder, "a folder with one subfolder of images per class (or train/ and test/ such folders) in data.path, needs Pillow")

STREAMS.add("split", streams.split_tasks, "classes in consecutive groups of stream.classes_per_task: 0/1, 2/3, ...")
STREAMS.add("ab", streams.ab_tasks, "two tasks: A = the first half of the classes, then B = the second half")
STREAMS.add("permuted", streams.permuted_tasks, "all classes each task, pixels shuffled by a fixed per-task permutation (task 1 unpermuted)")
STREAMS.add("rotated", streams.rotated_tasks, "all classes each task, images rotated by stream.rotation_step degrees more per task")

__all__ = ["DATASETS", "PROBLEMS", "STREAMS", "Problem", "ProblemConfig", "SourceData", "load_source", "Stream", "Task", "TensorSet", "build_stream"]
