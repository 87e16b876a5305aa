"""Replica divergence guard: data-parallel replicas must hold bitwise-identical parameters.

Replicas drift apart silently when something is wrong (a non-deterministic reduction, a rank that
skipped an optimizer step, a hook that was not registered, a corrupted resume). :func:`check_replicas`
fingerprints every tensor locally (an exact 64-bit sum of its bit patterns, weighted by position so
that permutations differ too), all-gathers the fingerprints over the data-parallel group (one small
collective, ``8 * n_tensors`` bytes per rank) and raises :class:`ReplicaDivergenceError` naming the first
tensor whose fingerprint differs and the ranks that disagree. Tensor-parallel shards (DTensor) are
compared shard against shard: only replicas of the same shard are in one data-parallel group.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from lit_parallel.parallel.mesh import local_tensor

__all__ = ["ReplicaDivergenceError", "check_replicas", "fingerprint"]

_WEIGHT_PERIOD = 8191  # a prime: positions are weighted 1..8191 so swapped elements change the sum


class ReplicaDivergenceError(RuntimeError):
    """Data-parallel replicas hold different values for a tensor that must be identical."""


def _fingerprint_tensor(tensor: Tensor) -> Tensor:
    """:func:`fingerprint` as a 0-dim int64 tensor on the tensor's device (no host synchronization)."""
    data = local_tensor(tensor).detach().contiguous().reshape(-1)
    if data.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=data.device)
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    width = data.element_size()
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[width]
    bits = data.view(as_int).to(torch.int64)
    weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % _WEIGHT_PERIOD + 1
    return (bits * weights).sum() ^ (bits.numel() << 1)


def fingerprint(tensor: Tensor) -> int:
    """An exact integer fingerprint of a tensor's bytes (equal bytes → equal fingerprint)."""
    return int(_fingerprint_tensor(tensor).item())


def check_replicas(named_tensors: Iterable[tuple[str, Tensor]], group: dist.ProcessGroup | None = None,
                   step: int | None = None) -> None:
    """Raise :class:`ReplicaDivergenceError` unless every rank of ``group`` holds the same tensors.

    Every rank of ``group`` must call this with the same names in the same order.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) < 2:
        return
    names, prints = [], []
    for name, tensor in named_tensors:
        names.append(name)
        prints.append(_fingerprint_tensor(tensor))
    # One stacked tensor and one collective; gloo needs it on the CPU.
    device = torch.device("cpu") if not prints or dist.get_backend(group) == "gloo" else prints[0].device
    mine = torch.stack(prints).to(device) if prints else torch.zeros(0, dtype=torch.int64)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu()
    differs = (table != table[0]).any(dim=0)
    if not bool(differs.any()):
        return
    index = int(differs.nonzero()[0])
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    values = {rank: int(v) for rank, v in zip(ranks, table[:, index].tolist(), strict=True)}
    groups: dict[int, list[int]] = {}
    for rank, value in values.items():
        groups.setdefault(value, []).append(rank)
    where = f" after step {step}" if step is not None else ""
    raise ReplicaDivergenceError(
        f"data-parallel replicas diverged{where}: {names[index]!r} differs between ranks "
        f"{' vs '.join(str(g) for g in groups.values())} ({int(differs.sum())} of {len(names)} tensors differ). "
        "Replicas must stay bitwise identical; look for a rank-dependent code path, a skipped optimizer step "
        "or a non-deterministic reduction."
    )
