"""Hierarchical all-reduce: exact inside a node, (optionally compressed) between nodes.

Inside a node the links are fast (NVLink, shared memory), between nodes they are slow. A flat all-reduce
(or a flat compressed exchange) sends every byte over the slow links from every rank; the hierarchical one
first reduce-scatters the bucket exactly inside the node, so each of the node's ranks owns one part of the
node's sum, exchanges only that part with its peers on the other nodes (the ranks with the same local
index), optionally compressed, and all-gathers the averaged parts inside the node again. Each rank then
sends ``1 / ranks_per_node`` of the bucket between nodes, and the inter-node links of a node carry the
whole bucket once, not once per rank.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.compression.base import CommStats, Compressor, NoCompression, check_int

__all__ = ["Hierarchical", "HierarchicalCommStats", "assign_owners", "plan_hierarchy"]


@dataclass
class HierarchicalCommStats(CommStats):
    """:class:`CommStats` split by link: ``bytes_sent = intra_node_bytes_sent + inter_node_bytes_sent``.

    Attributes:
        intra_node_bytes_sent: bytes handed to the node-local reduce-scatter and all-gather (and to the whole
            exchange when the data-parallel group lies on one node).
        inter_node_bytes_sent: bytes handed to the exchange between nodes (the outer compressor's payload).
    """

    intra_node_bytes_sent: int = 0
    inter_node_bytes_sent: int = 0


def assign_owners(numels: list[int], parts: int) -> list[int]:
    """The owner (``0 .. parts-1``) of each tensor: whole tensors, balanced greedily by element count.

    Largest tensor first (ties: lower index first), each to the owner with the fewest elements so far (ties:
    lower owner). Deterministic, so every rank of every node computes the same assignment.

    Args:
        numels: the tensors' element counts, in bucket order.
        parts: the number of owners (the data-parallel ranks per node).

    Example::

        assign_owners([100, 10, 60, 50], parts=2)   # [0, 0, 1, 1]: 110 elements each
    """
    loads = [0] * parts
    owners = [0] * len(numels)
    for index in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        owner = min(range(parts), key=lambda p: (loads[p], p))
        owners[index] = owner
        loads[owner] += numels[index]
    return owners


def plan_hierarchy(group_ranks: list[list[int]], node_size: int, world_size: int) -> list[tuple[list[list[int]], list[list[int]]]]:
    """For every data-parallel group, its node-local groups and its inter-node groups.

    The node of global rank ``r`` is ``r // node_size``. The node-local groups are the group's ranks on each
    node (nodes in increasing order); the inter-node group ``j`` holds the ``j``-th of those ranks of every
    node. Pure: no process-group work, so bad input fails on every rank before any collective.

    Args:
        group_ranks: the global ranks of every data-parallel group.
        node_size: ranks per node.
        world_size: the number of ranks.

    Raises:
        ConfigurationError: ``node_size`` does not divide ``world_size``, a rank outside the world or twice in a
            group, or a group whose ranks are not spread evenly over its nodes (each message names the values
            and the node sizes that would work).

    Example::

        plan_hierarchy([[0, 1, 2, 3]], node_size=2, world_size=4)
        # [([[0, 1], [2, 3]], [[0, 2], [1, 3]])]
    """
    if world_size % node_size:
        raise ConfigurationError(
            f"Hierarchical(node_size={node_size}) does not divide the world size {world_size}; valid: "
            f"{_divisors(world_size)} (the ranks per node)."
        )
    plans = []
    for ranks in group_ranks:
        if len(set(ranks)) != len(ranks) or any(not 0 <= r < world_size for r in ranks):
            raise ConfigurationError(
                f"Hierarchical.setup_groups got the data-parallel group {ranks}; valid: distinct global ranks in "
                f"[0, {world_size})."
            )
        nodes: dict[int, list[int]] = {}
        for r in sorted(ranks):
            nodes.setdefault(r // node_size, []).append(r)
        counts = {node: len(members) for node, members in nodes.items()}
        if len(set(counts.values())) != 1:
            fitting = [d for d in _divisors(world_size) if _even(group_ranks, d)]
            raise ConfigurationError(
                f"Hierarchical(node_size={node_size}): the data-parallel group {sorted(ranks)} (size {len(ranks)}) "
                f"does not split evenly over its nodes (ranks per node {counts}; world size {world_size}); every node "
                f"must hold the same number of the group's ranks. Valid node_size for these groups: {fitting}."
            )
        members = list(nodes.values())
        plans.append((members, [list(column) for column in zip(*members, strict=True)]))
    return plans


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _even(group_ranks: list[list[int]], node_size: int) -> bool:
    for ranks in group_ranks:
        counts: dict[int, int] = {}
        for r in ranks:
            counts[r // node_size] = counts.get(r // node_size, 0) + 1
        if len(set(counts.values())) > 1:
            return False
    return True


@dataclass(frozen=True)
class _Plan:
    """This rank's view of one data-parallel group."""

    intra: ProcessGroup | None  # None: no node-local step (the group lies on one node, or has one rank per node)
    inter: ProcessGroup | None
    local_size: int  # the group's ranks on this node
    local_rank: int  # this rank's index among them
    spans_nodes: bool


class Hierarchical(Compressor):
    """Reduce-scatter inside the node (exact), exchange the shard between nodes (through ``outer``), all-gather.

    Per bucket, on every rank of a data-parallel group spread over ``n`` nodes with ``k`` of its ranks each:

    1. Whole tensors are assigned to the node's ``k`` ranks (:func:`assign_owners`, balanced by element
       count); the bucket is laid out as ``k`` per-owner blocks padded to equal size, divided by ``k`` and
       reduce-scattered inside the node (``reduce_scatter_single``): each rank now holds the node's mean of
       the tensors it owns.
    2. Each rank hands its owned tensors, *shaped as they are*, to ``outer.reduce_`` on the group of the ranks
       with the same local index on the other nodes: the average over nodes is the average over the whole
       group. ``outer=None`` is an exact all-reduce; PowerSGD still compresses matrices.
    3. The averaged blocks are all-gathered inside the node (``all_gather_single``) and copied back.

    The outer compressor keeps its error-feedback memory for the tensors its rank owns, its warm-up counts
    the same optimizer steps (:meth:`step` advances it; during its warm-up the exchange is still hierarchical,
    and exact), and the checkpoint holds its state. :attr:`stats` are a :class:`HierarchicalCommStats`: the
    outer's payload counts as ``inter_node_bytes_sent``, the reduce-scatter input and all-gather block as
    ``intra_node_bytes_sent``, their sum as ``bytes_sent``.

    Node membership: global rank ``r`` is on node ``r // node_size``, with ``node_size`` from the argument, else
    from the strategy (the devices per node it launched), else from ``LOCAL_WORLD_SIZE`` (torchrun). A
    data-parallel group on one node reduces to ``outer`` on the group itself (with a warning); a group with
    one rank per node skips the node-local steps.

    Process groups are created up front by :meth:`setup_groups` (collective); the strategies of this package
    call it. When to use it:

    1. Several ranks per node and a slow network between nodes (Ethernet between GPU servers): the inter-node
       bytes per node drop ``k``-fold against a flat all-reduce, before any compression.
    2. Add ``outer=PowerSGD(...)`` (or ``Int8``, ...) to cut the inter-node bytes further; the node-local
       steps stay exact, so the compressor approximates the average of ``n`` node means, not of ``n * k``
       gradients.
    3. With one node, or one rank per node, it is the outer compressor alone.

    Args:
        outer: the compressor between nodes: an instance, a registered name (``"powersgd"``, ...), or ``None``
            for an exact all-reduce.
        node_size: ranks per node; ``None``: from the strategy or ``LOCAL_WORLD_SIZE``.

    Raises:
        ConfigurationError: an unknown ``outer`` name (the message lists the valid ones), an ``outer`` that is not
            a compressor or is itself hierarchical, or ``node_size`` not a positive integer.

    Example::

        from lit_parallel.compression import Hierarchical, PowerSGD

        Trainer(num_nodes=2, devices=8,
                strategy=CompressedDDPStrategy(compression=Hierarchical(outer=PowerSGD(rank=4))))
        # pure torch, after init_process_group on every rank:
        compressor = Hierarchical(outer="int8", node_size=8)
        compressor.setup_groups([list(range(dist.get_world_size()))])
        compressor.reduce_("grads", [p.grad for p in model.parameters()], group=None)
    """

    name = "hierarchical"
    hparams = ("outer", "node_size")

    def __init__(self, outer: Compressor | str | None = None, node_size: int | None = None) -> None:
        super().__init__()
        if node_size is not None:
            check_int("Hierarchical", "node_size", node_size, 1)
        # Hyper-parameters.
        self.outer: Compressor = _resolve_outer(outer)
        self.node_size = node_size
        # Internal state: the node size in use and this rank's groups (from setup_groups), byte counts by link.
        self.node_size_in_use: int | None = None
        self._saved_node_size: int | None = None
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self.stats: HierarchicalCommStats = HierarchicalCommStats()

    # -- configuration ------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        outer = None if isinstance(self.outer, NoCompression) else {"type": type(self.outer).__name__,
                                                                      **self.outer.config()}
        return {"outer": outer, "node_size": self.node_size}

    def __repr__(self) -> str:
        outer = None if isinstance(self.outer, NoCompression) else self.outer
        return f"Hierarchical(outer={outer!r}, node_size={self.node_size!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Process groups do not pickle and mean nothing in another process: setup_groups makes them anew.
        return {**super().__getstate__(), "_plans": {}}

    # -- groups -------------------------------------------------------------------------------------
    def setup_groups(self, group_ranks: list[list[int]], *, default_node_size: int | None = None) -> None:
        """Create the node-local and inter-node groups of every data-parallel group; keep this rank's.

        Collective: every rank calls it with the same ``group_ranks`` (the order of ``new_group`` calls must
        match). Everything is validated before the first ``new_group``.

        Args:
            group_ranks: the global ranks of every data-parallel group, in the same order on every rank.
            default_node_size: the ranks per node as the launcher knows them (a strategy's devices per node),
                used when ``node_size`` is ``None``; without either, ``LOCAL_WORLD_SIZE`` is read.

        Raises:
            ConfigurationError: no node size known, one that does not divide the world size or splits a group
                unevenly over nodes, or one other than in the checkpoint loaded before.

        Example::

            compressor.setup_groups([[0, 2], [1, 3]], default_node_size=2)   # dp groups of a tp=2 mesh
        """
        node_size = self._resolve_node_size(default_node_size)
        if self._saved_node_size is not None and self._saved_node_size != node_size:
            raise self._node_size_mismatch(self._saved_node_size, node_size)
        world_size = dist.get_world_size()
        plans = plan_hierarchy(group_ranks, node_size, world_size)
        me = dist.get_rank()
        self._plans = {}
        for ranks, (intra_ranks, inter_ranks) in zip(group_ranks, plans, strict=True):
            # One node or one rank per node: the dp group itself does the exchange, no groups to create.
            hierarchical = len(intra_ranks) > 1 and len(inter_ranks) > 1
            intra = inter = None
            if hierarchical:
                for members in intra_ranks:
                    created = dist.new_group(members)
                    intra = created if me in members else intra
                for members in inter_ranks:
                    created = dist.new_group(members)
                    inter = created if me in members else inter
            if me not in ranks:
                continue
            local = next(members for members in intra_ranks if me in members)
            self._plans[tuple(sorted(ranks))] = _Plan(intra, inter, len(local), local.index(me), len(intra_ranks) > 1)
            if len(intra_ranks) == 1 and len(ranks) > 1:
                warnings.warn(
                    f"Hierarchical(node_size={node_size}): the data-parallel group {sorted(ranks)} lies on one node, "
                    f"so the hierarchical exchange reduces to a flat one: {self.outer!r} on the group itself. Pass "
                    "node_size (the ranks per node) if the group spans several nodes.",
                    stacklevel=2,
                )
        self.node_size_in_use = node_size

    def _resolve_node_size(self, default: int | None) -> int:
        if self.node_size is not None:
            return self.node_size
        if default is not None:
            check_int("Hierarchical.setup_groups", "default_node_size", default, 1)
            return default
        env = os.environ.get("LOCAL_WORLD_SIZE")
        if env is None:
            raise ConfigurationError(
                "Hierarchical(node_size=None) cannot tell which ranks share a node: LOCAL_WORLD_SIZE is not set "
                "(torchrun sets it). Pass node_size=<ranks per node>, e.g. Hierarchical(node_size=8)."
            )
        if not env.isdigit() or int(env) < 1:
            raise ConfigurationError(
                f"Hierarchical(node_size=None) read LOCAL_WORLD_SIZE={env!r}, which is not a positive integer; pass "
                "node_size=<ranks per node>."
            )
        return int(env)

    def _node_size_mismatch(self, saved: int, now: int) -> ConfigurationError:
        return ConfigurationError(
            f"the checkpoint's Hierarchical state was saved with {saved} ranks per node, this run has node_size={now}; "
            f"the outer compressor's memory belongs to the tensors each rank owned then. Resume with node_size={saved}, "
            "or start without the checkpoint's compression state."
        )

    # -- the exchange -------------------------------------------------------------------------------
    @property
    def compressing(self) -> bool:
        return True  # a reduce-scatter, an exchange and an all-gather, never one plain all-reduce

    def step(self) -> None:
        super().step()
        self.outer.step()

    def pop_stats(self) -> HierarchicalCommStats:
        stats, self.stats = self.stats, HierarchicalCommStats()
        return stats

    def _reduce_compressed(self, key: str, tensors: list[Tensor], group: ProcessGroup | None) -> None:
        plan = self._plan(group)
        if plan.intra is None or plan.inter is None:
            self._outer_reduce(key, tensors, group, inter_node=plan.spans_nodes)
            return
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        numels = [t.numel() for t in tensors]
        owners = assign_owners(numels, plan.local_size)
        loads, offsets = [0] * plan.local_size, []
        for numel, owner in zip(numels, owners, strict=True):
            offsets.append(loads[owner])
            loads[owner] += numel
        block = max(loads)
        if block == 0:
            return
        starts = [owner * block + offset for owner, offset in zip(owners, offsets, strict=True)]
        # Per-owner blocks of equal size (zero padding), so one reduce-scatter hands each rank whole tensors.
        flat = torch.zeros(plan.local_size * block, dtype=dtype, device=tensors[0].device)
        for t, start, numel in zip(tensors, starts, numels, strict=True):
            flat[start : start + numel].copy_(t.reshape(-1))
        # Divide before summing, as DDP does: the node-local sum is then the node's mean, and the outer
        # compressor's average of the node means is the average over the whole group.
        flat.div_(plan.local_size)
        own = torch.empty(block, dtype=dtype, device=flat.device)
        self._count_intra(flat)
        # gloo implements reduce-scatter and all-gather into one tensor in torch 2.13 (the ``_single`` names
        # replace the deprecated ``reduce_scatter_tensor`` / ``all_gather_into_tensor``).
        dist.reduce_scatter_single(own, flat, group=plan.intra)
        base = plan.local_rank * block
        owned = [own[start - base : start - base + numel].view(t.shape)
                 for t, owner, start, numel in zip(tensors, owners, starts, numels, strict=True)
                 if owner == plan.local_rank]
        self._outer_reduce(key, owned, plan.inter, inter_node=True)
        self._count_intra(own)
        dist.all_gather_single(flat, own, group=plan.intra)
        for t, start, numel in zip(tensors, starts, numels, strict=True):
            t.copy_(flat[start : start + numel].view(t.shape))

    def _plan(self, group: ProcessGroup | None) -> _Plan:
        ranks = tuple(range(dist.get_world_size())) if group is None else tuple(sorted(dist.get_process_group_ranks(group)))
        plan = self._plans.get(ranks)
        if plan is None:
            known = [list(r) for r in self._plans] or "none"
            raise RuntimeError(
                f"Hierarchical.reduce_ got the process group of ranks {list(ranks)}, which setup_groups did not set up "
                f"(set up on this rank: {known}); call compressor.setup_groups(<the global ranks of every "
                "data-parallel group>) on every rank after init_process_group and before the first reduce_."
            )
        return plan

    def _outer_reduce(self, key: str, tensors: list[Tensor], group: ProcessGroup | None, inter_node: bool) -> None:
        self.outer.reduce_(key, tensors, group)
        sent = self.outer.pop_stats().bytes_sent
        self.stats.bytes_sent += sent
        if inter_node:
            self.stats.inter_node_bytes_sent += sent
        else:
            self.stats.intra_node_bytes_sent += sent

    def _count_intra(self, tensor: Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self.stats.bytes_sent += nbytes
        self.stats.intra_node_bytes_sent += nbytes

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base state, the outer compressor's state and the node size in use (``None`` before setup)."""
        return {**super().state_dict(), "outer": self.outer.state_dict(), "node_size_in_use": self.node_size_in_use}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, the outer compressor's included.

        Raises:
            ConfigurationError: another compressor type or configuration (the outer's included), or a node size
                other than the one in use (checked at :meth:`setup_groups` when that comes later).
        """
        config = state.get("config", {})
        if state.get("type") == type(self).__name__ and config != self.config():
            saved = _describe(config)
            raise ConfigurationError(
                f"the checkpoint's compression state is {saved} but the configured compressor is {self!r}; configure "
                f"{saved} to resume, or start without the checkpoint's compression state."
            )
        super().load_state_dict(state)
        self.outer.load_state_dict(state["outer"])
        saved = state.get("node_size_in_use")
        if saved is not None and self.node_size_in_use is not None and saved != self.node_size_in_use:
            raise self._node_size_mismatch(saved, self.node_size_in_use)
        self._saved_node_size = saved


def _describe(config: dict[str, Any]) -> str:
    """``Hierarchical(outer=PowerSGD(rank=2, ...), node_size=2)`` from a saved :meth:`Hierarchical.config`."""
    outer = config.get("outer")
    if outer is not None:
        outer = dict(outer)
        outer = f"{outer.pop('type', '?')}({', '.join(f'{k}={v!r}' for k, v in outer.items())})"
    return f"Hierarchical(outer={outer}, node_size={config.get('node_size')!r})"


def _resolve_outer(outer: Compressor | str | None) -> Compressor:
    if outer is None:
        return NoCompression()
    # Imported here: the registry module imports this package.
    from lit_parallel.compression import COMPRESSORS

    valid = sorted(name for name, cls in COMPRESSORS.items() if not issubclass(cls, Hierarchical))
    if isinstance(outer, str):
        cls = COMPRESSORS.get(outer)
        if cls is None or issubclass(cls, Hierarchical):
            raise ConfigurationError(f"Hierarchical(outer={outer!r}) is unknown; valid: None or one of {valid}.")
        return cls()
    if not isinstance(outer, Compressor) or isinstance(outer, Hierarchical):
        raise ConfigurationError(
            f"Hierarchical(outer={outer!r}) is not a compressor for the inter-node exchange; valid: None, a name in "
            f"{valid} or an instance from lit_parallel.compression."
        )
    return outer
