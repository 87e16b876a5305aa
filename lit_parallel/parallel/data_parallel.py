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

__all__ = ["GradientSynchronizer", "local_tensor"]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local data of ``tensor`` (the shard of a DTensor, the tensor itself otherwise)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


class GradientSynchronizer:
    """Averages gradients over a data-parallel group in fixed, deterministic buckets.

    Args:
        named_parameters: the parameters whose gradients are synchronized, in a fixed order that is
            identical on every replica (missing gradients are treated as zeros).
        group: the data-parallel process group (``None`` = default group).
        compressor: optional gradient compressor with ``reduce_(key, tensors, group)``.
        bucket_cap_mb: maximum bucket size; larger buckets mean fewer, bigger collectives.

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
    ) -> None:
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb={bucket_cap_mb} must be > 0.")
        self.group = group
        self.compressor = compressor
        self.params = [(n, p) for n, p in named_parameters if p.requires_grad]
        self.buckets = self._make_buckets(int(bucket_cap_mb * 2**20))

    def _make_buckets(self, cap_bytes: int) -> list[list[tuple[str, nn.Parameter]]]:
        buckets: list[list[tuple[str, nn.Parameter]]] = []
        current: list[tuple[str, nn.Parameter]] = []
        size, dtype = 0, None
        for name, param in self.params:
            local = local_tensor(param.data)
            nbytes = local.numel() * local.element_size()
            if current and (size + nbytes > cap_bytes or local.dtype != dtype):
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

    @torch.no_grad()
    def sync(self) -> None:
        """Average every gradient over the group (in place)."""
        if self.world_size == 1:
            return
        for index, bucket in enumerate(self.buckets):
            grads = self._local_grads(bucket)
            if self.compressor is not None:
                self.compressor.reduce_(f"bucket{index}", grads, self.group)
                continue
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.world_size)
            offset = 0
            for grad in grads:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()
