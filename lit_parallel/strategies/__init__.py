"""Lightning strategies of lit_parallel, registered by name with Lightning at import time."""

from lightning.pytorch.strategies import StrategyRegistry

from lit_parallel.strategies.compressed_ddp import CompressedDDPStrategy
from lit_parallel.strategies.hybrid import HybridParallelStrategy

__all__ = ["CompressedDDPStrategy", "HybridParallelStrategy"]

for _strategy in (CompressedDDPStrategy, HybridParallelStrategy):
    _strategy.register_strategies(StrategyRegistry)
