"""DataModules for the offline datasets and user files."""

from lit_parallel.data.global_batch import GlobalBatchSampler, global_batch_indices
from lit_parallel.data.mnist import MNISTDataModule
from lit_parallel.data.resumable import ResumableDataLoader, trainer_batch_position
from lit_parallel.data.text import LanguageModelingDataModule, TextClassificationDataModule

__all__ = [
    "GlobalBatchSampler",
    "LanguageModelingDataModule",
    "MNISTDataModule",
    "ResumableDataLoader",
    "TextClassificationDataModule",
    "global_batch_indices",
    "trainer_batch_position",
]
