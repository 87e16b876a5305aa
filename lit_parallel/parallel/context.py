"""The seam between a mesh strategy and the plugins / callbacks that need its layout.

A strategy of this package hands out one :class:`ParallelContext` (``strategy.parallel_context``); precision
plugins (global-norm clipping, mesh-wide overflow checks) and callbacks (pruning, communication monitor,
run summary) read it instead of probing strategy attributes. Pure torch: no Lightning import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["ParallelContext", "ProvidesParallelContext"]


def _no_copies() -> list[Tensor]:
    return []


@dataclass(frozen=True)
class ParallelContext:
    """What a strategy's layout means for code that runs beside it.

    Attributes:
        device: this rank's device.
        data_parallel_size: number of model replicas (the global batch is ``data_parallel_size`` per-rank batches).
        data_parallel_group: the ranks holding replicas of this rank's shard (``None``: the default group).
        model_parallel_group: the ranks whose parameters are disjoint pieces of one replica (pp × tp);
            ``None`` when every rank holds the whole model.
        tensor_parallel_group: the ranks over which parameters are sharded or replicated as DTensors
            (a replicated parameter counts once in a norm); ``None`` without tensor parallelism.
        compressor: the compressor of the data-parallel exchange (counts bytes), or ``None``.
        replica_sync_every: under local SGD / DiLoCo, optimizer steps between replica synchronizations
            (replicas are identical right after one); ``None``: identical after every step.
        replicas_meet: ``False`` under Streaming DiLoCo (``fragments > 1``, ``overlap_steps > 0`` or
            ``fragment_update_alpha > 0``): fragments synchronize at different steps, so the replicas never
            hold identical parameters at one step boundary.
        tied_copies: returns the parameters tied across pipeline stages that this rank holds but that
            another stage owns (counted once in global norms).
    """

    device: torch.device
    data_parallel_size: int
    data_parallel_group: Any = None
    model_parallel_group: Any = None
    tensor_parallel_group: Any = None
    compressor: Any = None
    replica_sync_every: int | None = None
    replicas_meet: bool = True
    tied_copies: Callable[[], list[Tensor]] = field(default=_no_copies)


@runtime_checkable
class ProvidesParallelContext(Protocol):
    """A strategy that declares its layout (every strategy of this package)."""

    @property
    def parallel_context(self) -> ParallelContext: ...
