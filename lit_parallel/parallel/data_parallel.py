"""Data-parallel gradient synchronization over one axis of the mesh.

Gradients of the local parameters (the local shard of a DTensor) are flattened into buckets and
averaged over the data-parallel process group, either with an exact all-reduce or through a
gradient compressor (``compressor.reduce_(key, tensors, group)``, see ``lit_parallel.compression``).
Tensor- and pipeline-parallel traffic never passes through here, so compression only ever touches
the replica axis.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from lit_parallel.parallel.compression.base import copy_back
from lit_parallel.parallel.mesh import local_tensor

__all__ = ["GradientSynchronizer", "local_tensor"]


class GradientSynchronizer:
    """Averages gradients over a data-parallel group in fixed, deterministic buckets.

    Args:
        named_parameters: the parameters whose gradients are synchronized, in a fixed order that is
            identical on every replica (missing gradients are treated as zeros).
        group: the data-parallel process group (``None`` = default group).
        compressor: optional gradient compressor with ``reduce_(key, tensors, group)``.
        bucket_cap_mb: maximum bucket size; larger buckets mean fewer, bigger collectives.
        overlap: launch each bucket's exchange from a gradient hook as soon as backward has produced
            every gradient in it, so communication runs while backward continues (as DDP does).
            Exact: buckets are filled in reverse parameter order (roughly the order backward produces
            gradients), the first one capped at 1 MiB so that communication starts early, and each
            all-reduce is issued as its bucket fills. Compressed: the buckets (and so the compressor's
            per-bucket memory) are those of the serial path, and their exchanges are queued on the
            compressor's exchange thread (``reduce_async_``) from the last bucket to the first as
            they fill, so the results are the serial path's, bit for bit.
        exchange_group: a process group with ``group``'s ranks that only the compressor's exchange
            thread uses (an overlapped compressed exchange must not share a group with collectives the
            training thread issues during backward, e.g. sync-BN); ``None``: ``group``.
        ready_from_hooks: with ``overlap``, learn that a gradient is final from a hook on its
            parameter. ``False``: the caller says so with :meth:`parameters_done` (a pipeline stage
            after its last microbatch's backward, when the hooks fire once per microbatch).

    Example::

        sync = GradientSynchronizer(model.named_parameters(), group=mesh["dp"].get_group())
        loss.backward()
        sync.sync()
        optimizer.step()
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, nn.Parameter]],
        group: ProcessGroup | None = None,
        compressor: Any | None = None,
        bucket_cap_mb: float = 25.0,
        overlap: bool = False,
        exchange_group: ProcessGroup | None = None,
        ready_from_hooks: bool = True,
    ) -> None:
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb={bucket_cap_mb} must be > 0.")
        self.group = group
        self.exchange_group = exchange_group if exchange_group is not None else group
        self.compressor = compressor
        self.params = [(n, p) for n, p in named_parameters if p.requires_grad]
        self.ready_from_hooks = ready_from_hooks
        self._exact = compressor is None or (not getattr(compressor, "compressing", True)
                                             and hasattr(compressor, "all_reduce_async_"))
        self.overlap = bool(overlap) and (self._exact or hasattr(compressor, "reduce_async_"))
        cap = int(bucket_cap_mb * 2**20)
        reverse = self.overlap and self._exact
        self.buckets = self._make_buckets(cap, first_cap=min(cap, 2**20)) if reverse else self._make_buckets(cap)
        # Overlap bookkeeping: gradients ready per bucket in this backward, the next compressed bucket to
        # queue (they are queued last to first, so every rank queues them in the same order), the exchanges.
        self.enabled = True
        self._ready = [0] * len(self.buckets)
        self._next = len(self.buckets) - 1
        self._pending: dict[int, tuple[Any, torch.Tensor | None, list[torch.Tensor]]] = {}
        self._hooks: list[Any] = []
        self._bucket_of = {id(param): index for index, bucket in enumerate(self.buckets) for _, param in bucket}
        if self.overlap and ready_from_hooks and dist.is_initialized() and self.world_size > 1:
            for index, bucket in enumerate(self.buckets):
                for _, param in bucket:
                    self._hooks.append(param.register_post_accumulate_grad_hook(self._hook(index)))

    def _make_buckets(self, cap_bytes: int, first_cap: int | None = None) -> list[list[tuple[str, nn.Parameter]]]:
        buckets: list[list[tuple[str, nn.Parameter]]] = []
        current: list[tuple[str, nn.Parameter]] = []
        size, dtype = 0, None
        params = list(reversed(self.params)) if first_cap is not None else self.params
        for name, param in params:
            local = local_tensor(param.data)
            nbytes = local.numel() * local.element_size()
            limit = first_cap if first_cap is not None and not buckets else cap_bytes
            if current and (size + nbytes > limit or local.dtype != dtype):
                buckets.append(current)
                current, size = [], 0
            current.append((name, param))
            size, dtype = size + nbytes, local.dtype
        if current:
            buckets.append(current)
        return buckets

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def _local_grads(self, bucket: list[tuple[str, nn.Parameter]]) -> list[torch.Tensor]:
        grads = []
        for _, param in bucket:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(local_tensor(param.grad))
        return grads

    def _hook(self, index: int) -> Any:
        def on_grad_ready(_: torch.Tensor) -> None:
            if self.enabled:
                self._mark_ready(index)

        return on_grad_ready

    def parameters_done(self, params: Iterable[torch.Tensor]) -> None:
        """The gradients of ``params`` are final for this step: launch every bucket that is complete now.

        Parameters this synchronizer does not average are ignored. For ``ready_from_hooks=False``.
        """
        if not (self.overlap and self.enabled) or self.world_size == 1:
            return
        for param in params:
            index = self._bucket_of.get(id(param))
            if index is not None:
                self._mark_ready(index)

    def _mark_ready(self, index: int) -> None:
        self._ready[index] += 1
        if self._ready[index] != len(self.buckets[index]):
            return
        if self._exact:
            self._launch(index)
            return
        while self._next >= 0 and self._ready[self._next] == len(self.buckets[self._next]):
            self._launch(self._next)
            self._next -= 1

    @torch.no_grad()
    def _launch(self, index: int) -> None:
        grads = self._local_grads(self.buckets[index])
        if not self._exact:
            exchange = self.compressor.reduce_async_(f"bucket{index}", grads, self.exchange_group)
            self._pending[index] = (exchange, None, grads)
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.compressor is not None:
            work: Any = self.compressor.all_reduce_async_(flat, self.group)  # divides, counts bytes
        else:
            flat.div_(self.world_size)
            work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._pending[index] = (work, flat, grads)

    @torch.no_grad()
    def _finish_overlapped(self) -> None:
        for index in reversed(range(len(self.buckets))):
            if index not in self._pending:  # a parameter without gradient this step: send zeros now
                self._launch(index)
        for index in range(len(self.buckets)):
            work, flat, grads = self._pending.pop(index)
            work.wait()
            if flat is not None:  # None: a compressed exchange averaged the gradients in place
                copy_back(flat, grads)
        self._reset()

    def _reset(self) -> None:
        self._ready = [0] * len(self.buckets)
        self._next = len(self.buckets) - 1

    def discard(self) -> None:
        """Wait for a backward's overlapped exchanges and forget their results."""
        for work, _, _ in self._pending.values():
            work.wait()
        self._pending.clear()
        self._reset()

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @torch.no_grad()
    def sync(self) -> None:
        """Average every gradient over the group (in place)."""
        if self.world_size == 1:
            return
        if self.overlap:
            self._finish_overlapped()
            return
        for index, bucket in enumerate(self.buckets):
            grads = self._local_grads(bucket)
            if self.compressor is not None:
                self.compressor.reduce_(f"bucket{index}", grads, self.group)
                continue
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.world_size)
            copy_back(flat, grads)
