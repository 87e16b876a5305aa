"""DataModules for the offline datasets and user files."""

from lit_parallel.data.mnist import MNISTDataModule

__all__ = ["MNISTDataModule"]
