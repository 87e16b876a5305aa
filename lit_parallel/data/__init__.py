"""DataModules for the offline datasets and user files."""

from lit_parallel.data.mnist import MNISTDataModule
from lit_parallel.data.resumable import ResumableDataLoader, trainer_batch_position
from lit_parallel.data.text import LanguageModelingDataModule, TextClassificationDataModule

__all__ = [
    "LanguageModelingDataModule",
    "MNISTDataModule",
    "ResumableDataLoader",
    "TextClassificationDataModule",
    "trainer_batch_position",
]
