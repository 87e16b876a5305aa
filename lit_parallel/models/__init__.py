"""LightningModules of lit_parallel."""

from lit_parallel.models.base import ParallelModule
from lit_parallel.models.image import ImageClassifier, mlp, mnist_cnn

__all__ = ["ImageClassifier", "ParallelModule", "mlp", "mnist_cnn"]
