"""Parallel dimensions and the 3-D device mesh (pp × dp × tp).

The mesh is laid out with tensor parallelism innermost (adjacent ranks, the fastest links),
data parallelism in the middle and pipeline stages outermost, as in Megatron and torchtitan: a rank's
coordinates are ``(pp, dp, tp) = divmod`` of its global rank over ``(dp * tp, tp)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lit_parallel.errors import ConfigurationError

__all__ = ["MESH_DIMS", "SHARDED_MESH_DIMS", "ParallelDims", "build_mesh", "local_tensor", "mesh_dim", "new_dp_groups"]

MESH_DIMS = ("pp", "dp", "tp")
SHARDED_MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
"""With a sharded dp axis (``zero_stage > 0``) dp is split into replicate x shard (HSDP); ``"dp"`` stays
available as the flattened pair, so code that only needs the data-parallel group is unchanged."""


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local data of ``tensor`` (the shard of a DTensor, the tensor itself otherwise)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def _check_size(name: str, value: int | str, allow_auto: bool) -> None:
    if allow_auto and value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        valid = "a positive integer or 'auto'" if allow_auto else "a positive integer"
        raise ConfigurationError(f"{name}={value!r} is invalid; valid: {valid}.")


@dataclass(frozen=True)
class ParallelDims:
    """Validated sizes of the three parallel dimensions.

    Args:
        pp: pipeline-parallel size (number of pipeline ranks).
        dp: data-parallel size (number of model replicas).
        tp: tensor-parallel size (ranks sharing each layer).
        world_size: total number of ranks; must equal ``pp * dp * tp``.
        dp_shard: the data-parallel ranks that shard parameters / gradients / optimizer state (a divisor of
            ``dp``; ``dp // dp_shard`` replicas of each shard); 1 without a sharded dp axis.
        sharded: whether the mesh splits dp into ``("dp_replicate", "dp_shard")`` (``zero_stage > 0``).

    Raises:
        ConfigurationError: a size is not a positive integer, the product differs from ``world_size``, or
            ``dp_shard`` does not divide ``dp``.

    Example::

        dims = ParallelDims.resolve(tp=2, pp=2, dp="auto", world_size=8)   # dp = 2
    """

    pp: int
    dp: int
    tp: int
    world_size: int
    dp_shard: int = 1
    sharded: bool = False

    def __post_init__(self) -> None:
        for name in ("pp", "dp", "tp", "world_size", "dp_shard"):
            _check_size(name, getattr(self, name), allow_auto=False)
        if self.dp % self.dp_shard:
            raise ConfigurationError(
                f"data_parallel_shard_size({self.dp_shard}) does not divide dp({self.dp}); valid: a divisor of "
                f"{self.dp} ({[d for d in range(1, self.dp + 1) if self.dp % d == 0]})."
            )
        if self.pp * self.dp * self.tp != self.world_size:
            raise ConfigurationError(
                f"pp({self.pp}) * dp({self.dp}) * tp({self.tp}) = {self.pp * self.dp * self.tp} "
                f"!= world_size({self.world_size}); choose sizes whose product is the number of processes."
            )

    @classmethod
    def resolve(cls, tp: int, pp: int, dp: int | Literal["auto"], world_size: int) -> ParallelDims:
        """Fill ``dp="auto"`` with the ranks left over by ``tp * pp``, then validate."""
        _check_size("tensor_parallel_size", tp, allow_auto=False)
        _check_size("pipeline_parallel_size", pp, allow_auto=False)
        _check_size("data_parallel_size", dp, allow_auto=True)
        if dp == "auto":
            if world_size % (tp * pp):
                raise ConfigurationError(
                    f"world_size({world_size}) is not divisible by tp({tp}) * pp({pp}) = {tp * pp}; "
                    f"data_parallel_size='auto' needs a multiple of {tp * pp} processes."
                )
            dp = world_size // (tp * pp)
        return cls(pp=pp, dp=int(dp), tp=tp, world_size=world_size)

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's ``{"pp": i, "dp": j, "tp": k, "dp_replicate": r, "dp_shard": s}`` in the mesh layout used
        by :func:`build_mesh` (``dp = r * dp_shard + s``)."""
        pp, rest = divmod(rank, self.dp * self.tp)
        dp, tp = divmod(rest, self.tp)
        replicate, shard = divmod(dp, self.dp_shard)
        return {"pp": pp, "dp": dp, "tp": tp, "dp_replicate": replicate, "dp_shard": shard}

    @property
    def dp_replicate(self) -> int:
        """Replicas of each dp shard (``dp // dp_shard``)."""
        return self.dp // self.dp_shard

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        if self.sharded:
            return (self.pp, self.dp_replicate, self.dp_shard, self.tp)
        return (self.pp, self.dp, self.tp)

    @property
    def mesh_dims(self) -> tuple[str, ...]:
        return SHARDED_MESH_DIMS if self.sharded else MESH_DIMS


def build_mesh(dims: ParallelDims, device_type: str | None = None) -> DeviceMesh:
    """Create the ``("pp", "dp", "tp")`` DeviceMesh over the initialized default process group, or with
    ``dims.sharded`` the ``("pp", "dp_replicate", "dp_shard", "tp")`` mesh with ``"dp"`` the flattened pair.

    Every dimension is kept, even of size 1, so ``mesh["dp"]`` etc. always exist.
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, dims.mesh_shape, mesh_dim_names=dims.mesh_dims)
    if dims.sharded:
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return mesh


def mesh_dim(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """``mesh[name]``, also for a flattened dimension (``"dp"`` of the sharded mesh) without torch's deprecated
    slicing of flattened dimensions from the root mesh."""
    flattened = mesh._get_root_mesh()._flatten_mapping.get(name)
    return flattened if flattened is not None else mesh[name]


def new_dp_groups(mesh: DeviceMesh, backend: str | None = None, dim: str = "dp") -> dist.ProcessGroup:
    """A new process group per data-parallel group of the mesh (``dim="dp_replicate"``: per replicate group of
    the sharded mesh); returns this rank's.

    Collective: every rank creates every group (``new_group``'s rule), in the same order.
    """
    grid = mesh.mesh
    if grid.ndim == len(SHARDED_MESH_DIMS):
        names = list(SHARDED_MESH_DIMS)
        if dim == "dp":  # (pp, dp_replicate, dp_shard, tp) -> (pp, dp, tp)
            grid = grid.reshape(grid.shape[0], -1, grid.shape[-1])
        else:  # (pp, dp_shard, tp, dim) -> (pp, rest, dim)
            order = [names.index(n) for n in names if n != dim] + [names.index(dim)]
            grid = grid.permute(*order).reshape(grid.shape[0], -1, grid.shape[names.index(dim)]).permute(0, 2, 1)
    dp = grid.shape[1]
    ranks = grid.permute(0, 2, 1).reshape(-1, dp).tolist()
    mine = dist.get_rank()
    own = None
    for group_ranks in ranks:
        group = dist.new_group(group_ranks, backend=backend)
        if mine in group_ranks:
            own = group
    assert own is not None
    return own
