"""The data-parallel axis of a hybrid mesh: what happens to gradients or replicas over the dp group each step.

Pure torch. Either gradients are averaged every step (:class:`GradientSynchronizer`: exact or compressed,
overlapped with backward when exact), or, with ``sync=LocalSGD(...)`` / ``DiLoCo(...)``, each replica steps on its
own and every ``sync_every`` steps the replicas run a round over the dp group, shard by shard (Streaming DiLoCo,
``DiLoCo(fragments=F)``: one fragment of each rank's shards every ``sync_every / F`` steps)::

    axis = DataParallelAxis(sync=None, compression=None)            # exact averaging
    axis.setup(model.named_parameters(), group=dp_group, overlap=True)
    loss.backward(); axis.sync_gradients(); optimizer.step(); axis.after_optimizer_step(local_params)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.data_parallel import GradientSynchronizer
from lit_parallel.parallel.local_sgd import (
    DiLoCo,
    DiLoCoState,
    LocalSGD,
    LocalSGDState,
    check_threaded_backend,
    outer_compressor,
    resolve_dp_sync,
)

__all__ = ["DataParallelAxis"]


class DataParallelAxis:
    """Gradient averaging or local-SGD / DiLoCo rounds over the data-parallel group.

    Args:
        sync: ``None`` / ``"exact"`` (average every step), ``"local_sgd"`` / ``"diloco"`` or a
            :class:`LocalSGD` / :class:`DiLoCo`.
        compression: a compressor (or its registered name) for the exchange, or ``None``.
        bucket_cap_mb: gradient bucket size of the exact / compressed averaging.

    Raises:
        ConfigurationError: an unknown ``sync`` or compressor, ``bucket_cap_mb <= 0``, or ``compression`` with a
            :class:`DiLoCo` whose ``outer_dtype`` already chooses the exchange.
    """

    def __init__(self, sync: LocalSGD | DiLoCo | str | None = None, compression: Any | None = None,
                 bucket_cap_mb: float = 25.0) -> None:
        if bucket_cap_mb <= 0:
            raise ConfigurationError(f"bucket_cap_mb={bucket_cap_mb} must be > 0.")
        from lit_parallel.compression import get_compressor

        self.sync = resolve_dp_sync(sync)
        self.compression = get_compressor(compression) if isinstance(compression, str) else compression
        # Without compression the exchange uses the exact "none" compressor, which counts bytes.
        self.compressor = self.compression if self.compression is not None else get_compressor("none")
        outer_dtype = getattr(self.sync, "outer_dtype", None)
        if outer_dtype is not None:
            if self.compression is not None:
                raise ConfigurationError(
                    f"data_parallel_sync={self.sync!r} with gradient_compression={self.compression!r}: both choose "
                    "how the pseudo-gradient is exchanged; valid: outer_dtype alone, or outer_dtype=None with "
                    "gradient_compression."
                )
            # The quantizer of the outer exchange is the dp axis's compressor: CommunicationMonitor counts it.
            self.compressor = outer_compressor(outer_dtype)
        self.bucket_cap_mb = bucket_cap_mb
        self.grads: GradientSynchronizer | None = None
        self.state: LocalSGDState | None = None
        self.group: Any = None  # the group rounds run on (a group of their own when overlapped)

    @property
    def replica_sync_every(self) -> int | None:
        """Steps between rounds (replicas are identical right after one); ``None`` for per-step averaging."""
        return None if self.sync is None else self.sync.sync_every

    @property
    def replicas_meet(self) -> bool:
        """Whether the replicas are identical at some step boundary (not under Streaming DiLoCo)."""
        return not (self.sync is not None and getattr(self.sync, "streaming", False))

    def settings(self) -> dict[str, str | None]:
        """The options that need dp >= 2, as shown in messages."""
        return {"gradient_compression": None if self.compression is None else type(self.compression).__name__,
                "data_parallel_sync": None if self.sync is None else repr(self.sync)}

    def check_backend(self, backend: str) -> None:
        """Refuse an overlapped, compressed round on a backend whose collectives cannot run from a thread."""
        if self.sync is not None and self.sync.asynchronous and self.compressor.compressing:
            check_threaded_backend(
                backend, f"data_parallel_sync={self.sync!r} with the exchange compressed by {self.compressor!r}",
                "no gradient_compression and outer_dtype=None",
            )

    def setup(self, named_parameters: Iterable[tuple[str, nn.Parameter]], local_parameters: list[torch.Tensor],
              group: Any, overlap: bool, new_group: Callable[[], Any] | None = None,
              ready_from_hooks: bool = True) -> None:
        """Build the per-step synchronizer, or the round state (``local_parameters``: this rank's shards).

        ``new_group`` makes a process group of its own for an overlapped round or an overlapped compressed
        gradient exchange (collective on every rank). ``ready_from_hooks=False``: the caller reports final
        gradients with :meth:`parameters_done` (pipeline stages).
        """
        self.close()
        if self.sync is None:
            # An overlapped compressed exchange runs on a thread of its own, on a group of its own.
            threaded = overlap and self.compressor.compressing and new_group is not None
            self.grads = GradientSynchronizer(named_parameters, group=group, compressor=self.compressor,
                                              bucket_cap_mb=self.bucket_cap_mb, overlap=overlap,
                                              exchange_group=new_group() if threaded else None,
                                              ready_from_hooks=ready_from_hooks)
            return
        self.state = self.sync.build(local_parameters, self.compressor)
        # A group of its own per dp group, so an exchange in flight never queues behind (or blocks) others.
        self.group = new_group() if self.sync.asynchronous and new_group is not None else group

    def set_accumulating(self, accumulating: bool) -> None:
        """Gradient accumulation: no overlapped all-reduce until the step's last backward."""
        if self.grads is not None:
            self.grads.enabled = not accumulating

    def parameters_done(self, params: Iterable[torch.Tensor]) -> None:
        """Start the exchange of every gradient bucket that ``params`` complete (overlapped sync only)."""
        if self.grads is not None:
            self.grads.parameters_done(params)

    def sync_gradients(self) -> None:
        """Average the gradients over the group (nothing under local SGD / DiLoCo)."""
        if self.grads is not None:
            self.grads.sync()
            self.compressor.step()

    def after_optimizer_step(self, local_parameters: list[torch.Tensor]) -> bool:
        """Advance local SGD / DiLoCo; whether a round completed (the replicas are identical now)."""
        return self.state is not None and self.state.step(local_parameters, self.group)

    def close_exchange(self) -> None:
        """Stop DiLoCo's background exchange (end of a fit); the gradient hooks stay for the next one."""
        if isinstance(self.state, DiLoCoState):
            self.state.close()
        self.compressor.close()
        self.group = None

    def close(self) -> None:
        """Release the gradient hooks and the background exchange."""
        if self.grads is not None:
            self.grads.remove_hooks()
            self.grads = None
        self.close_exchange()
