"""Sharding the data-parallel axis (ZeRO stages 1-3 with torch's FSDP2) and activation checkpointing.

Pure torch. Applied per network after the pipeline split and the tensor-parallel plan (torchtitan's order:
pipeline split -> TP per stage -> activation checkpointing -> FSDP per block, then the stage's root)::

    options = ShardingOptions(zero_stage=3, activation_checkpointing="full")
    apply_activation_checkpointing(net, blocks, options.activation_checkpointing)
    apply_fsdp(net, blocks, mesh["dp_shard"], options.zero_stage, pipelined=False)  # HSDP: mesh["dp_replicate", "dp_shard"]

What each stage shards over the ``dp_shard`` ranks (``dp = dp_replicate x dp_shard``):

==========  ===============================================================================================
zero_stage  sharded
==========  ===============================================================================================
0           nothing: parameters, gradients and optimizer state are replicated (averaged gradients)
1           optimizer state (:class:`OptimizerStatePartition`: gradients still all-reduced in full)
2           gradients and optimizer state; parameters sharded at rest, gathered once per step and kept
            through backward (FSDP2 ``reshard_after_forward=False``, torch's ``SHARD_GRAD_OP``)
3           parameters, gradients and optimizer state; parameters re-gathered for backward
            (FSDP2 ``reshard_after_forward=True``)
==========  ===============================================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.mesh import local_tensor

__all__ = [
    "ACTIVATION_CHECKPOINTING",
    "OptimizerStatePartition",
    "ShardingOptions",
    "apply_activation_checkpointing",
    "apply_fsdp",
    "compress_replicate_axis",
    "fsdp_managed",
    "present_blocks",
]

ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
"""``"full"``: every block recomputes its activations in backward (only block inputs are kept);
``"selective"``: every second block does (torchtitan's layer-level selective checkpointing, frequency 2)."""


@dataclass(frozen=True)
class ShardingOptions:
    """Validated ZeRO / activation-checkpointing settings of the hybrid strategy.

    Args:
        zero_stage: 0 (replicate), 1 (shard optimizer state), 2 (+ gradients), 3 (+ parameters).
        shard_size: data-parallel ranks that shard (``"auto"``: all of dp when ``zero_stage > 0``); the other
            factor of dp replicates (HSDP: ``dp = dp_replicate x dp_shard``).
        activation_checkpointing: ``"none"``, ``"full"`` or ``"selective"`` (:data:`ACTIVATION_CHECKPOINTING`).

    Raises:
        ConfigurationError: a value outside its range, or a shard size with ``zero_stage=0``.
    """

    zero_stage: int = 0
    shard_size: int | Literal["auto"] = "auto"
    activation_checkpointing: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.zero_stage, bool) or self.zero_stage not in (0, 1, 2, 3):
            raise ConfigurationError(f"zero_stage={self.zero_stage!r} is invalid; valid: 0, 1, 2 or 3.")
        size = self.shard_size
        if size != "auto" and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigurationError(
                f"data_parallel_shard_size={size!r} is invalid; valid: a positive integer dividing the data-parallel "
                "size, or 'auto'."
            )
        if self.zero_stage == 0 and size not in ("auto", 1):
            raise ConfigurationError(
                f"data_parallel_shard_size={size} shards nothing with zero_stage=0; set zero_stage to 1, 2 or 3, or "
                "leave data_parallel_shard_size='auto'."
            )
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ConfigurationError(
                f"activation_checkpointing={self.activation_checkpointing!r} is invalid; valid: "
                f"{list(ACTIVATION_CHECKPOINTING)}."
            )

    def resolve_shard_size(self, dp: int) -> int:
        """The number of dp ranks that shard, for a data-parallel size ``dp``.

        Raises:
            ConfigurationError: the shard size does not divide ``dp``.
        """
        if self.zero_stage == 0:
            return 1
        size = dp if self.shard_size == "auto" else int(self.shard_size)
        if dp % size:
            raise ConfigurationError(
                f"data_parallel_shard_size={size} does not divide the data-parallel size dp={dp}; valid: a divisor "
                f"of {dp} ({[d for d in range(1, dp + 1) if dp % d == 0]}) or 'auto'."
            )
        return size


def present_blocks(net: nn.Module, blocks: Iterable[str]) -> list[nn.Module]:
    """The modules among ``blocks`` (FQNs) that this rank holds with parameters (a pipeline split leaves
    parameter-free placeholders or ``None`` for other stages' blocks)."""
    found = []
    for fqn in blocks:
        try:
            module = net.get_submodule(fqn)
        except AttributeError:
            continue
        if module is not None and any(True for _ in module.parameters()):
            found.append(module)
    return found


def apply_activation_checkpointing(net: nn.Module, blocks: Sequence[str], mode: str) -> int:
    """Recompute the activations of ``blocks`` in backward (torch's composable ``checkpoint``, non-reentrant).

    The composable API installs hooks instead of wrapping modules, so parameter names (checkpoints, tied
    weights, the pipeline plan) stay those of the unsplit model; the RNG state is replayed, so dropout is
    the same in the recomputation. Returns the number of blocks checkpointed on this rank.
    """
    if mode == "none":
        return 0
    from torch.distributed._composable import checkpoint

    modules = present_blocks(net, blocks)
    chosen = modules if mode == "full" else modules[::2]
    for module in chosen:
        checkpoint(module)
    return len(chosen)


def apply_fsdp(net: nn.Module, blocks: Sequence[str], mesh: DeviceMesh, zero_stage: int, pipelined: bool,
               roots: Sequence[nn.Module] | None = None) -> None:
    """Shard ``net``'s parameters over ``mesh`` (1-D: FSDP, 2-D ``(replicate, shard)``: HSDP) with FSDP2.

    Each block (FQNs in ``blocks``) becomes one FSDP unit (one all-gather / reduce-scatter), then each of
    ``roots`` (default ``[net]``; under a pipeline, the rank's stage modules) takes the remaining parameters
    (embeddings, final norm, head). ``zero_stage=3`` frees gathered parameters after forward and re-gathers
    them in backward; ``2`` keeps them until the end of backward. Under a pipeline every microbatch would
    re-gather them, so (as torchtitan does) they are kept through the step in both stages.
    """
    from torch.distributed.fsdp import fully_shard

    reshard = zero_stage == 3 and not pipelined
    for module in present_blocks(net, blocks):
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
    for root in roots if roots is not None else [net]:
        fully_shard(root, mesh=mesh, reshard_after_forward=reshard)


def fsdp_managed(modules: Iterable[nn.Module]) -> set[int]:
    """``id``s of the parameters the FSDP2 units inside ``modules`` manage."""
    from torch.distributed.fsdp import FSDPModule

    ids: set[int] = set()
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, FSDPModule):
                ids.update(id(p) for p in sub.parameters())
    return ids


def compress_replicate_axis(roots: Sequence[nn.Module], compressor: Any, group: Any) -> int:
    """Average each FSDP2 unit's reduce-scattered gradient shard over the replicas with ``compressor``.

    FSDP2 (on the ``dp_shard`` mesh only) calls the hook of each unit right after its reduce-scatter, during
    backward, with the flat shard of the unit's gradients (``set_all_reduce_hook``: the building block for a
    custom HSDP all-reduce); ``compressor.reduce_`` averages the unit's per-parameter gradient shards over
    ``group`` (the replicate axis) in place, with its error feedback keyed by the unit's name. Returns the
    number of units hooked.
    """
    from torch.distributed.fsdp import FSDPModule

    count, seen = 0, set()
    for index, root in enumerate(roots):
        for name, sub in root.named_modules():
            if not isinstance(sub, FSDPModule) or id(sub) in seen:
                continue
            seen.add(id(sub))
            key = f"fsdp{index}.{name}" if name else f"fsdp{index}"

            def hook(flat: Tensor, key: str = key, unit: Any = sub) -> None:
                compressor.reduce_(key, _gradient_shards(unit, flat), group)

            sub.set_all_reduce_hook(hook)
            count += 1
    return count


def _gradient_shards(unit: Any, flat: Tensor) -> list[Tensor]:
    """The per-parameter gradient shards inside FSDP2's flat reduce-scatter output of ``unit``, shaped like the
    parameters' shards (so PowerSGD sees matrices, not one vector); ``[flat]`` when the layout is not the one
    expected (a parameter without a gradient in this backward).

    FSDP2 lays the output out parameter after parameter, each padded to its padded shard size (as in its
    ``foreach_reduce``); this reads its private ``FSDPParam`` sizes, checked against the buffer's size.
    """
    groups = getattr(unit._get_fsdp_state(), "_fsdp_param_groups", None) or []
    if len(groups) != 1:
        return [flat]
    params = groups[0].fsdp_params
    if sum(p.padded_sharded_param_size.numel() for p in params) != flat.numel() or flat.storage_offset() != 0:
        return [flat]
    views, offset = [], 0
    for param in params:
        views.append(torch.as_strided(flat, size=param.sharded_size, stride=param.contiguous_sharded_stride,
                                      storage_offset=offset))
        offset += param.padded_sharded_param_size.numel()
    return views


class OptimizerStatePartition:
    """ZeRO stage 1: each rank of the shard group steps (and keeps optimizer state for) its share of the
    parameters; the updated parameters are then broadcast from their owners.

    Gradients are averaged in full before the step (so clipping and overflow checks are unchanged). The
    optimizer's ``step`` is wrapped: it runs the closure (Lightning's forward, backward and clipping) first,
    then drops the gradients of parameters another rank owns, so the optimizer neither steps them nor creates
    state for them (torch's optimizers skip ``grad is None``), steps, and broadcasts each owner's updated
    parameters. Step pre-hooks cannot do this: they fire before the closure, i.e. before the gradients exist.
    Ownership is whole parameters, balanced by size in a fixed order (as ``ZeroRedundancyOptimizer``). We do
    not use ``ZeroRedundancyOptimizer`` itself: it builds its own optimizer from a class and keyword
    arguments, which replaces the optimizer (and LR schedulers) the LightningModule configured, and it does
    not handle DTensor (tensor-parallel) parameters.

    Args:
        params: this rank's trainable parameters, in the same order on every rank of ``group``.
        group: the shard group (data-parallel ranks holding the same tp/pp shard).
    """

    def __init__(self, params: Sequence[Tensor], group: Any) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        loads = [0] * self.size
        self.owner: dict[int, int] = {}
        self.by_owner: list[list[Tensor]] = [[] for _ in range(self.size)]
        for param in sorted(params, key=lambda p: -local_tensor(p).numel()):  # largest first, stable
            owner = loads.index(min(loads))
            loads[owner] += local_tensor(param).numel()
            self.owner[id(param)] = owner
        for param in params:  # broadcast order: parameter order within each owner
            self.by_owner[self.owner[id(param)]].append(param)
        self._wrapped: list[torch.optim.Optimizer] = []

    def owns(self, param: Tensor) -> bool:
        return self.owner.get(id(param), self.rank) == self.rank

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Wrap ``optimizer.step`` (the torch optimizer, not Lightning's wrapper).

        Raises:
            ConfigurationError: an optimizer that re-evaluates its closure (LBFGS).
        """
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ConfigurationError("zero_stage=1 does not support LBFGS (it re-runs the closure); use zero_stage=0.")
        step = optimizer.step

        def partitioned_step(closure: Any = None) -> Any:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self._drop_foreign_gradients(optimizer)
            step()
            self._broadcast_parameters()
            return loss

        optimizer.step = partitioned_step  # type: ignore[method-assign]
        self._wrapped.append(optimizer)

    def detach(self) -> None:
        for optimizer in self._wrapped:
            vars(optimizer).pop("step", None)  # the class's step again
        self._wrapped = []

    def _drop_foreign_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if not self.owns(param):
                    param.grad = None

    @torch.no_grad()
    def _broadcast_parameters(self) -> None:
        for owner, params in enumerate(self.by_owner):
            if not params:
                continue
            src = dist.get_global_rank(self.group, owner)
            for dtype in sorted({local_tensor(p).dtype for p in params}, key=str):
                locals_ = [local_tensor(p) for p in params if local_tensor(p).dtype == dtype]
                flat = torch.cat([t.reshape(-1) for t in locals_])
                dist.broadcast(flat, src=src, group=self.group)
                if owner != self.rank:
                    offset = 0
                    for t in locals_:
                        t.copy_(flat[offset:offset + t.numel()].view_as(t))
                        offset += t.numel()
