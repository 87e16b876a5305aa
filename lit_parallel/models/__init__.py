"""LightningModules of lit_parallel."""

from lit_parallel.models.base import ParallelModule
from lit_parallel.models.hf import CausalLM, SequenceClassifier
from lit_parallel.models.image import ImageClassifier, mlp, mnist_cnn

__all__ = ["CausalLM", "ImageClassifier", "ParallelModule", "SequenceClassifier", "mlp", "mnist_cnn"]
