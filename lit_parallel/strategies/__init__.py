"""Lightning strategies of lit_parallel, registered by name with Lightning at import time."""

from lightning.pytorch.strategies import StrategyRegistry

from lit_parallel.strategies.hybrid import HybridParallelStrategy

__all__ = ["HybridParallelStrategy"]

for _strategy in (HybridParallelStrategy,):
    _strategy.register_strategies(StrategyRegistry)
