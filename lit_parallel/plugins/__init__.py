"""Lightning plugins of lit_parallel (precision plugins live in :mod:`lit_parallel.precision`)."""

from lit_parallel.plugins.async_checkpoint_io import AsyncAtomicCheckpointIO
from lit_parallel.plugins.sync_batchnorm import MeshSyncBatchNorm

__all__ = ["AsyncAtomicCheckpointIO", "MeshSyncBatchNorm"]
