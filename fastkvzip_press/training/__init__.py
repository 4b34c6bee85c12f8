"""Gate training: KVzip targets, feature shards on disk, gate fitting, export (``fastkvzip-press train``)."""

from fastkvzip_press.training.corpus import Document, iter_documents
from fastkvzip_press.training.distributed import Ranks
from fastkvzip_press.training.fit import FitConfig, FitReport, fit_gates, initial_gates
from fastkvzip_press.training.shards import ShardSet
from fastkvzip_press.training.workflow import TrainConfig, train

__all__ = [
    "Document",
    "FitConfig",
    "FitReport",
    "Ranks",
    "ShardSet",
    "TrainConfig",
    "fit_gates",
    "initial_gates",
    "iter_documents",
    "train",
]
