"""``parallel_context(strategy)``: the declared layout of any Lightning strategy, ours or Lightning's own."""

from __future__ import annotations

from typing import Any

import torch

from lit_parallel.parallel.context import ParallelContext, ProvidesParallelContext

__all__ = ["ParallelContext", "parallel_context"]


def parallel_context(strategy: Any) -> ParallelContext:
    """The strategy's :class:`ParallelContext`; Lightning's own strategies get plain data parallelism over the
    world (whole model on every rank, no compressor)."""
    if isinstance(strategy, ProvidesParallelContext):
        return strategy.parallel_context
    device = getattr(strategy, "root_device", torch.device("cpu"))
    return ParallelContext(device=device, data_parallel_size=int(strategy.world_size))
