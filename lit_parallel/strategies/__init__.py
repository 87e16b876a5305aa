"""Lightning strategies of lit_parallel, registered by name with Lightning at import time."""

from lightning.pytorch.strategies import StrategyRegistry

from lit_parallel.strategies.compressed_ddp import CompressedDDPStrategy
from lit_parallel.strategies.diloco import DiLoCoStrategy
from lit_parallel.strategies.hybrid import HybridParallelStrategy
from lit_parallel.strategies.local_sgd import LocalSGDStrategy

__all__ = ["CompressedDDPStrategy", "DiLoCoStrategy", "HybridParallelStrategy", "LocalSGDStrategy"]

for _strategy in (CompressedDDPStrategy, DiLoCoStrategy, HybridParallelStrategy, LocalSGDStrategy):
    _strategy.register_strategies(StrategyRegistry)
