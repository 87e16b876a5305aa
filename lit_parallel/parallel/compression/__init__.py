"""Gradient compression for data-parallel training, in pure torch (no Lightning).

Every compressor averages a bucket of gradients in place with :meth:`Compressor.reduce_`, keeps its
per-bucket memory in a checkpointable ``state_dict``, and counts the bytes it sends. Lightning glue
lives in :mod:`lit_parallel.strategies.compressed_ddp`; the public import path is
:mod:`lit_parallel.compression`.
"""

from lit_parallel.parallel.compression.base import CommStats, Compressor, DDPHookState, NoCompression
from lit_parallel.parallel.compression.cast import BF16, FP16
from lit_parallel.parallel.compression.hierarchical import Hierarchical, HierarchicalCommStats
from lit_parallel.parallel.compression.int8 import Int8
from lit_parallel.parallel.compression.onebit import OneBit
from lit_parallel.parallel.compression.powersgd import PowerSGD
from lit_parallel.parallel.compression.topk import TopK

__all__ = ["BF16", "FP16", "CommStats", "Compressor", "DDPHookState", "Hierarchical", "HierarchicalCommStats", "Int8",
           "NoCompression", "OneBit", "PowerSGD", "TopK"]
