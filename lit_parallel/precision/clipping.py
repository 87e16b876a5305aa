"""Gradient clipping across tensor-parallel shards and pipeline stages (pure torch).

Each rank of a replica holds a disjoint part of the model's gradient elements: its pipeline stage's
layers, and within them its tensor-parallel shard. The global norm is the norm of the concatenation of
all of them, so every rank computes ``sum |g|^p`` over its local elements, the sums are all-reduced over
the model-parallel group (pp × tp of one replica), and every rank scales by the same coefficient.
Elements held identically by several ranks of the group are counted once:

- a DTensor gradient with a ``Replicate`` placement on a mesh dimension counts only on local rank 0 of
  that dimension (``Shard`` dimensions hold disjoint pieces and always count);
- a plain tensor is replicated over the tensor-parallel group, so it counts only on its rank 0;
- ``exclude`` lists parameters whose gradient another rank (or another entry) already counts, such as
  the copies of a weight tied across pipeline stages.

Data-parallel replicas hold equal gradients after the dp-axis sync, so each computes the same norm
without communicating.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from lit_parallel.parallel.mesh import local_tensor

__all__ = ["clip_grad_norm_", "clip_grad_value_", "global_grad_norm"]

_EPS = 1e-6  # as in torch.nn.utils.clip_grad_norm_, so single-device clipping is matched exactly


def _grads(parameters: Iterable[Tensor] | Tensor) -> list[tuple[Tensor, Tensor]]:
    """``(parameter, grad)`` pairs, each parameter once, without those that have no gradient."""
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    seen: set[int] = set()
    pairs = []
    for param in params:
        if param.grad is None or id(param) in seen:
            continue
        seen.add(id(param))
        pairs.append((param, param.grad))
    return pairs


def _resolve_partial(grad: Tensor) -> Tensor:
    """A DTensor gradient with pending (``Partial``) sums is reduced first; its local part is then exact."""
    placements = getattr(grad, "placements", None)
    if placements is None or not any(p.is_partial() for p in placements):
        return grad
    from torch.distributed.tensor import Replicate

    return grad.redistribute(grad.device_mesh, [Replicate() if p.is_partial() else p for p in placements])


def _counted_here(grad: Tensor, replicated_group: ProcessGroup | None) -> bool:
    placements = getattr(grad, "placements", None)
    if placements is not None:
        mesh = grad.device_mesh
        return all(
            not placement.is_replicate() or mesh.size(dim) == 1 or mesh.get_local_rank(dim) == 0
            for dim, placement in enumerate(placements)
        )
    if replicated_group is None or not dist.is_initialized():
        return True
    return dist.get_rank(replicated_group) == 0


def _collective_device(group: ProcessGroup | None, fallback: torch.device) -> torch.device:
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


@torch.no_grad()
def global_grad_norm(
    parameters: Iterable[Tensor] | Tensor,
    norm_type: float = 2.0,
    *,
    group: ProcessGroup | None = None,
    replicated_group: ProcessGroup | None = None,
    exclude: Collection[Tensor] = (),
) -> Tensor:
    """The norm of the whole model's gradient, from the local shards on every rank of ``group``.

    Every rank of ``group`` must call it (it is one all-reduce); all get the same value.

    Args:
        parameters: this rank's parameters (plain tensors or DTensors); those without a gradient are skipped.
        norm_type: ``p`` of the p-norm, or ``inf``.
        group: the ranks whose elements together form one model (the model-parallel group); ``None`` with
            an initialized default group means all ranks; without a process group the norm is local.
        replicated_group: the group over which plain (non-DTensor) parameters are replicated (the
            tensor-parallel group); their gradients count on its rank 0 only.
        exclude: parameters whose gradients must not be counted here (counted by another rank).

    Returns:
        A float32 scalar tensor on the gradients' device.

    Example::

        norm = global_grad_norm(model.parameters(), group=mp_group, replicated_group=tp_group)
    """
    norm_type = float(norm_type)
    excluded = {id(p) for p in exclude}
    pairs = _grads(parameters)
    device = local_tensor(pairs[0][1]).device if pairs else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for param, grad in pairs:
        grad = _resolve_partial(grad)
        if id(param) in excluded or not _counted_here(grad, replicated_group):
            continue
        local = local_tensor(grad)
        if local.numel() == 0:
            continue
        if math.isinf(norm_type):
            total = torch.maximum(total, local.detach().abs().max().float())
        else:
            total += torch.linalg.vector_norm(local.detach(), norm_type, dtype=torch.float32) ** norm_type
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        comm = total.to(_collective_device(group, device))
        dist.all_reduce(comm, op=dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM, group=group)
        total = comm.to(device)
    return total if math.isinf(norm_type) else total ** (1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[Tensor] | Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    *,
    group: ProcessGroup | None = None,
    replicated_group: ProcessGroup | None = None,
    exclude: Collection[Tensor] = (),
    error_if_nonfinite: bool = False,
) -> Tensor:
    """Scale gradients in place so that the global norm is at most ``max_norm``; return the global norm.

    The model-parallel counterpart of :func:`torch.nn.utils.clip_grad_norm_`: the same coefficient
    ``min(1, max_norm / (norm + 1e-6))`` on every rank, so sharded training clips exactly like one device.

    Args:
        parameters: this rank's parameters (plain tensors or DTensors).
        max_norm: the largest allowed global norm.
        norm_type: ``p`` of the p-norm, or ``inf``.
        group: see :func:`global_grad_norm`.
        replicated_group: see :func:`global_grad_norm`.
        exclude: see :func:`global_grad_norm` (their gradients are still scaled).
        error_if_nonfinite: raise if the global norm is ``nan`` or ``inf`` (on every rank alike).

    Raises:
        RuntimeError: ``error_if_nonfinite`` and the norm is not finite.

    Example::

        loss.backward()
        clip_grad_norm_(stage.parameters(), 1.0, group=strategy.model_parallel_group,
                        replicated_group=strategy.tensor_parallel_group)
        optimizer.step()
    """
    pairs = _grads(parameters)
    total = global_grad_norm([p for p, _ in pairs], norm_type, group=group, replicated_group=replicated_group,
                             exclude=exclude)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"The global norm of order {norm_type} of the gradients is non-finite ({total.item()}).")
    coef = torch.clamp(max_norm / (total + _EPS), max=1.0)
    for _, grad in pairs:
        local = local_tensor(grad)
        local.mul_(coef.to(device=local.device, dtype=local.dtype))
    return total


@torch.no_grad()
def clip_grad_value_(parameters: Iterable[Tensor] | Tensor, clip_value: float) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]`` (element-wise, so shard-local).

    Example::

        clip_grad_value_(model.parameters(), 0.5)
    """
    for _, grad in _grads(parameters):
        local_tensor(grad).clamp_(min=-clip_value, max=clip_value)
