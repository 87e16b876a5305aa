"""Pure-torch pruning: sparsity schedules, exact distributed thresholds and masks.

The parameters to prune may be split over the ranks of a model-parallel ``group``: tensor-parallel
shards (``DTensor``) and pipeline stages (each rank holds different layers). A threshold computed on
one rank's shard alone would differ from the one of the whole model, so thresholds are found by
bisection on the float bit pattern of the scores: each of 31 rounds all-reduces one count per bucket
(a scalar for global scope), which makes the result the *exact* k-th smallest score of the unsharded
model with only scalar traffic.

Elements that several ranks of the group hold (``Replicate`` placements of a ``DTensor``, or plain
tensors that the tensor-parallel ranks all keep) are counted once: only one canonical holder
contributes counts, every holder computes the same mask from the same values. Data-parallel replicas
are outside the group; they compute identical masks from identical weights (the computation is
deterministic integer counting).

Example::

    layout = PruningLayout(dict(model.named_parameters()), group=None)
    scores = [p.detach().abs() for p in layout.local_tensors()]
    masks = layout.masks(scores, sparsity=0.9, scope="global")
    for tensor, mask in zip(layout.local_tensors(), masks):
        tensor.data.mul_(mask)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.data_parallel import local_tensor

__all__ = [
    "SCHEDULES",
    "PruningLayout",
    "check_sparsity",
    "comm_device",
    "expand_row_mask",
    "kth_smallest_bits",
    "local_tensor",
    "row_norms",
    "schedule_sparsity",
]

SCHEDULES = ("cubic", "one_shot", "constant")
# Bit pattern of +inf; non-negative floats order like their int32 bit patterns.
_INF_BITS = 0x7F800000
# 2**31 > _INF_BITS + 1, so 31 halvings close every search interval.
_BISECTION_ROUNDS = 31


def schedule_sparsity(
    schedule: Literal["cubic", "one_shot", "constant"], step: int, target: float, start_step: int, end_step: int
) -> float:
    """Sparsity the schedule asks for after ``step`` optimizer steps.

    ``cubic`` is Zhu & Gupta (2017): ``s_t = s_f * (1 - (1 - (t - t0) / (t1 - t0)) ** 3)`` between
    ``start_step`` (t0) and ``end_step`` (t1), ``s_f`` afterwards. ``one_shot`` and ``constant`` ask for
    the target from ``start_step`` on (they differ in how often masks are recomputed, not here).

    Args:
        schedule: ``"cubic"``, ``"one_shot"`` or ``"constant"``.
        step: optimizer steps taken so far.
        target: final sparsity in ``[0, 1)``.
        start_step: first step that prunes.
        end_step: step at which the cubic schedule reaches ``target``.

    Raises:
        ConfigurationError: an unknown schedule name.
    """
    if schedule not in SCHEDULES:
        raise ConfigurationError(f"schedule={schedule!r} is unknown; valid: {list(SCHEDULES)}.")
    if step < start_step:
        return 0.0
    if schedule != "cubic" or step >= end_step:
        return target
    progress = (step - start_step) / (end_step - start_step)
    return target * (1.0 - (1.0 - progress) ** 3)


def row_norms(weight: Tensor, dim: int, norm: float) -> Tensor:
    """Ln norm of every slice ``weight.select(dim, i)``, complete even when ``weight`` is sharded.

    For a ``DTensor`` the reduction runs as DTensor ops (partial sums are all-reduced over the mesh),
    and the result is the full, replicated vector on every rank of the mesh.
    """
    others = [d for d in range(weight.ndim) if d != dim]
    norms = torch.linalg.vector_norm(weight.detach().float(), ord=norm, dim=others)
    return norms.full_tensor().float() if isinstance(norms, DTensor) else norms


def kth_smallest_bits(
    bits: Sequence[Tensor],
    buckets: Sequence[int],
    contributes: Sequence[bool],
    ks: Tensor,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Exact k-th smallest non-negative score per bucket, over all ranks of ``group``.

    Args:
        bits: int32 bit patterns of non-negative float32 scores, one tensor per local entry.
        buckets: bucket index of each entry (entries of a bucket share one threshold).
        contributes: whether this rank counts the entry (False for a non-canonical replica).
        ks: int64 ``[num_buckets]``, the rank (1-based) of the wanted value; 0 means "none".
        group: ranks whose counts add up (``None``: this process only).

    Returns:
        int64 ``[num_buckets]``: the bit pattern of the k-th smallest score, ``-1`` where ``k == 0`` so
        that ``bits > threshold`` keeps every element.
    """
    reduce = group is not None and dist.is_initialized() and dist.get_world_size(group) > 1
    ks = ks.to(comm_device(group if reduce else None))
    lo = torch.zeros_like(ks)
    hi = torch.full_like(ks, _INF_BITS)
    for _ in range(_BISECTION_ROUNDS):
        mid = (lo + hi) // 2
        counts = torch.zeros_like(ks)
        # Counts stay on the device until the all-reduce: no host sync per tensor on GPUs.
        for values, bucket, counted in zip(bits, buckets, contributes, strict=True):
            if counted:
                counts[bucket] += (values <= mid[bucket].to(values.device)).sum().to(counts.device)
        if reduce:
            dist.all_reduce(counts, group=group)
        enough = counts >= ks
        hi = torch.where(enough, mid, hi)
        lo = torch.where(enough, lo, mid + 1)
    return torch.where(ks > 0, hi, torch.full_like(hi, -1))


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where tensors for collectives over ``group`` must live: the current GPU under NCCL, else CPU."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _score_bits(score: Tensor) -> Tensor:
    return score.detach().float().contiguous().view(torch.int32)


def _group_ranks(group: dist.ProcessGroup | None) -> set[int]:
    if not dist.is_initialized():
        return {0}
    if group is None:
        return {dist.get_rank()}
    return set(dist.get_process_group_ranks(group))


def _fingerprint(tensor: Tensor) -> str:
    raw = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return f"{tuple(tensor.shape)}:{hashlib.sha1(raw).hexdigest()}"


class PruningLayout:
    """Which rank counts which elements of a set of (possibly sharded) tensors.

    Built once per model: it all-gathers names over ``group`` (a no-op without one), so every rank of
    the group must construct it, with its own local tensors, at the same point.

    Rules:
        - ``DTensor``: for each mesh dimension whose ranks all lie in ``group`` and whose placement is
          ``Replicate``, only coordinate 0 contributes. ``Shard`` over ranks outside ``group`` is refused
          (the counts would miss elements).
        - Plain tensor: if another rank of ``group`` holds a tensor with bit-identical contents (and
          shape), it is a replica and only the lowest such rank contributes; otherwise the rank holds
          those elements alone (a pipeline stage). Contents are compared once, at construction.

    Args:
        tensors: name -> tensor (``nn.Parameter`` or ``DTensor``) for this rank's part of the model.
        group: process group over which the tensors' elements are disjoint (tensor x pipeline ranks);
            ``None`` for a single process or pure data parallelism.

    Raises:
        ConfigurationError: a ``DTensor`` is sharded across ranks outside ``group``, or has a ``Partial``
            placement.
    """

    def __init__(self, tensors: dict[str, Tensor], group: dist.ProcessGroup | None = None) -> None:
        self.names = list(tensors)
        self.tensors = list(tensors.values())
        self.group = group
        self._distributed = group is not None and dist.is_initialized() and dist.get_world_size(group) > 1
        ranks = _group_ranks(group)
        self.contributes: list[bool] = []
        self.keys: list[str] = []
        plain: dict[str, str] = {}
        for name, tensor in tensors.items():
            if isinstance(tensor, DTensor):
                self.contributes.append(self._dtensor_contributes(name, tensor, ranks, replicated_only=True))
                self.keys.append(f"{name}@mesh{tensor.device_mesh.mesh.flatten().tolist()}")
            else:
                self.contributes.append(True)
                self.keys.append(name)
                plain[name] = _fingerprint(tensor) if self._distributed else ""
        if self._distributed:
            self._resolve_plain_replicas(plain)
        self.bucket_keys = self._gather_keys()

    @staticmethod
    def _dtensor_contributes(name: str, tensor: DTensor, group_ranks: set[int], replicated_only: bool) -> bool:
        mesh = tensor.device_mesh
        coordinate = mesh.get_coordinate() or [0] * mesh.ndim
        counts = True
        for dim, placement in enumerate(tensor.placements):
            dim_ranks = set(dist.get_process_group_ranks(mesh.get_group(dim))) if mesh.size(dim) > 1 else set()
            inside = dim_ranks <= group_ranks
            if not isinstance(placement, (Replicate, Shard)):
                raise ConfigurationError(
                    f"parameter {name!r} has placement {placement}; valid for pruning: Shard or Replicate."
                )
            if isinstance(placement, Shard) and not inside:
                raise ConfigurationError(
                    f"parameter {name!r} is sharded over mesh dim {dim} (ranks {sorted(dim_ranks)}) outside the "
                    f"pruning group (ranks {sorted(group_ranks)}); pass a group that contains them."
                )
            # A rank off coordinate 0 holds a copy of what coordinate 0 holds: of the whole tensor on a
            # Replicate dim, and of derived replicated values (row norms) on any dim.
            duplicate = isinstance(placement, Replicate) or not replicated_only
            if inside and mesh.size(dim) > 1 and coordinate[dim] != 0 and duplicate:
                counts = False
        return counts

    def _resolve_plain_replicas(self, plain: dict[str, str]) -> None:
        gathered: list[dict[str, str]] = [{} for _ in range(dist.get_world_size(self.group))]
        dist.all_gather_object(gathered, plain, group=self.group)
        me = dist.get_rank(self.group)
        for i, name in enumerate(self.names):
            if name not in plain:
                continue
            # Bit-identical contents on several ranks are copies, whatever their names: tensor-parallel
            # replicas share a name, GPT-2's tied wte / lm_head live on the first and last stage.
            holders = [(r, n) for r, table in enumerate(gathered) for n, fp in table.items() if fp == plain[name]]
            if len({r for r, _ in holders}) > 1:
                first_rank, first_name = min(holders)
                self.contributes[i] = (me, name) == (first_rank, first_name)
                self.keys[i] = f"{first_name}@replicas{sorted({r for r, _ in holders})}"
            else:
                self.keys[i] = f"{name}@rank{me}"

    def _gather_keys(self) -> list[str]:
        if not self._distributed:
            return sorted(set(self.keys))
        gathered: list[list[str]] = [[] for _ in range(dist.get_world_size(self.group))]
        dist.all_gather_object(gathered, self.keys, group=self.group)
        return sorted({key for keys in gathered for key in keys})

    def local_tensors(self) -> list[Tensor]:
        """This rank's local data of every tensor (shards of ``DTensor``), in construction order."""
        return [local_tensor(t) for t in self.tensors]

    def all_reduce(self, values: Tensor) -> Tensor:
        """Sum ``values`` over the group in place (identity without one) and return it."""
        if self._distributed:
            dist.all_reduce(values, group=self.group)
        return values

    def bucket_index(self, scope: Literal["global", "layer"]) -> list[int]:
        """Bucket of each local entry: 0 for global scope, the entry's global key index for layer scope."""
        if scope == "global":
            return [0] * len(self.keys)
        position = {key: i for i, key in enumerate(self.bucket_keys)}
        return [position[key] for key in self.keys]

    def counted_sum(self, per_entry: Sequence[int | Tensor], buckets: Sequence[int], num_buckets: int,
                    contributes: Sequence[bool] | None = None) -> Tensor:
        """Sum of per-entry integers per bucket over the group, each element counted once."""
        totals = torch.zeros(num_buckets, dtype=torch.int64)
        for value, bucket, counted in zip(per_entry, buckets, contributes or self.contributes, strict=True):
            if counted:
                totals[bucket] += int(value)
        return self.all_reduce(totals.to(comm_device(self.group if self._distributed else None))).cpu()

    def masks(
        self, scores: Sequence[Tensor], sparsity: float, scope: Literal["global", "layer"] = "global",
        contributes: Sequence[bool] | None = None,
    ) -> list[Tensor]:
        """Keep-masks (``True`` = keep) pruning the ``sparsity`` fraction of smallest scores.

        Ties at the threshold are all pruned, so the result may exceed the target by the tie count.

        Args:
            scores: non-negative scores, one per entry, any shape (the shape of the returned mask).
            sparsity: fraction in ``[0, 1)`` to prune per bucket.
            scope: ``"global"`` (one threshold over every entry and rank) or ``"layer"`` (one per tensor).
            contributes: override of :attr:`contributes` when scores are replicated differently from
                the tensors (e.g. full row-norm vectors of a sharded weight).
        """
        counted = list(contributes) if contributes is not None else self.contributes
        buckets = self.bucket_index(scope)
        num_buckets = 1 if scope == "global" else len(self.bucket_keys)
        sizes = self.counted_sum([s.numel() for s in scores], buckets, num_buckets, counted)
        ks = torch.round(sizes.double() * sparsity).to(torch.int64)
        bits = [_score_bits(s) for s in scores]
        thresholds = kth_smallest_bits(bits, buckets, counted, ks, self.group if self._distributed else None)
        thresholds = thresholds.cpu()
        return [b > thresholds[bucket].to(b.device) for b, bucket in zip(bits, buckets, strict=True)]

    def structured_contributes(self) -> list[bool]:
        """Contribution flags for per-row scores that are replicated over every mesh dim of a tensor."""
        ranks = _group_ranks(self.group)
        return [
            self._dtensor_contributes(name, t, ranks, replicated_only=False) if isinstance(t, DTensor) else counted
            for name, t, counted in zip(self.names, self.tensors, self.contributes, strict=True)
        ]

    def sparsity(self, masks: Sequence[Tensor]) -> tuple[float, list[float]]:
        """Global and per-bucket (layer) fraction of pruned elements, each element counted once."""
        buckets = self.bucket_index("layer")
        num_buckets = len(self.bucket_keys)
        pruned = self.counted_sum([m.numel() - int(m.sum()) for m in masks], buckets, num_buckets)
        total = self.counted_sum([m.numel() for m in masks], buckets, num_buckets)
        overall = float(pruned.sum()) / max(1, int(total.sum()))
        return overall, [float(p) / max(1, int(t)) for p, t in zip(pruned, total, strict=True)]


def expand_row_mask(row_mask: Tensor, tensor: Tensor, dim: int) -> Tensor:
    """Element mask of ``tensor``'s local data from a full mask over its slices along ``dim``."""
    shape = [1] * tensor.ndim
    shape[dim] = -1
    full = row_mask.view(shape).expand(tensor.shape)
    if not isinstance(tensor, DTensor):
        return full.clone()
    # Every rank holds the same full mask, so each slices its shard locally (no communication).
    return distribute_tensor(full.contiguous(), tensor.device_mesh, tensor.placements,
                             src_data_rank=None).to_local()


def check_sparsity(value: float, what: str = "target_sparsity") -> float:
    """Return ``value`` if it is a fraction in ``[0, 1)``; raise ConfigurationError otherwise."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value < 1.0):
        raise ConfigurationError(f"{what}={value!r} is outside [0, 1); valid: a fraction such as 0.5 or 0.9.")
    return float(value)
