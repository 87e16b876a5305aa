"""The hybrid strategy's checkpoints: one atomic DCP folder that resumes in any (tp, pp, dp) layout.

Lightning glue over :mod:`lit_parallel.parallel.sharded_checkpoint`; mixed into
:class:`~lit_parallel.HybridParallelStrategy`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.async_checkpoint import BackgroundCheckpointWriter
from lit_parallel.parallel.local_sgd import DiLoCoState
from lit_parallel.parallel.safe_load import safe_torch_load
from lit_parallel.parallel.sharded_checkpoint import (
    COMPRESSION_KEY,
    DP_SYNC_FILE,
    DP_SYNC_SHARD_FILE,
    REPLICA_KEY,
    async_save_sharded,
    load_sharded,
    read_meta,
    remove_path,
    save_sharded,
)

__all__ = ["ShardedCheckpointMixin"]


class ShardedCheckpointMixin:
    """Checkpoint hooks of :class:`~lit_parallel.HybridParallelStrategy` (uses its mesh, dp-sync and compressor)."""

    # Provided by the strategy.
    dims: Any
    data_parallel_sync: Any
    pipeline_schedule: str
    zero_stage: int
    _dp: Any  # DataParallelAxis

    # -- asynchronous checkpoints (docs/fault_tolerance.md, "Asynchronous checkpoints") --------------------
    def _init_async_checkpoint(self, async_checkpoint: bool) -> None:
        if not isinstance(async_checkpoint, bool):
            raise ConfigurationError(f"{type(self).__name__}(async_checkpoint={async_checkpoint!r}); valid: True or False.")
        self.async_checkpoint = async_checkpoint
        self._checkpoint_group: dist.ProcessGroup | None = None
        self._checkpoint_writer = BackgroundCheckpointWriter(remove_path)

    def _check_checkpoint_dirs(self: Any) -> None:
        """With ``async_checkpoint``: refuse a checkpoint directory that cannot be written, before any collective."""
        if self.async_checkpoint and self.lightning_module is not None:
            from lit_parallel.plugins.async_checkpoint_io import check_checkpoint_dirs

            check_checkpoint_dirs(self.lightning_module.trainer)

    def _setup_async_checkpoint(self) -> None:
        # DCP's planning collectives run on the background thread: on their own group, never interleaved with the
        # training collectives of the default group (torch recommends a separate gloo group for async_save).
        if self.async_checkpoint and self._checkpoint_group is None:
            self._checkpoint_group = dist.new_group(backend="gloo")

    def _finish_async_checkpoint(self) -> None:
        self._checkpoint_writer.close()

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._checkpoint_writer.poll()  # a write that finished: run the deletions it held back
        super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]

    @override
    def lightning_module_state_dict(self: Any) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.lightning_module)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # done in load_checkpoint

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return get_optimizer_state_dict(self.lightning_module, optimizer)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass  # done in load_checkpoint

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Write a DCP folder under a temporary name and rename it once every rank has finished."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options.")
        assert self.dims is not None
        path = Path(self.broadcast(str(filepath)))
        state = {"model": checkpoint.pop("state_dict")}
        for index, optim_state in enumerate(checkpoint.pop("optimizer_states", [])):
            state[f"optimizer_{index}"] = optim_state
        replica_key, rank_files = None, {}
        if self._dp.state is not None:
            coords = self.dims.coordinates(self.global_rank)
            # The replicas differ between synchronizations: every replica keeps its own entries (with FSDP2 a
            # replica is a dp_shard group, whose ranks write the shards of the same entries).
            replica_key = REPLICA_KEY.format(self._replica_index(coords))
            # Outer state (counters; DiLoCo's global parameters, momentum, exchange in flight): identical
            # across replicas, one file per (tp, pp) shard (and per dp_shard index with FSDP2).
            dp_state = self._dp.state.state_dict()  # every rank: it waits for an exchange in flight
            if self._replica_index(coords) == 0:
                rank_files[self._dp_sync_file(coords)] = dp_state
        if self._dp.compression is not None:
            # Error-feedback memory differs per rank (per dp replica and per tp/pp shard): keep every rank's.
            states: list[Any] = [None] * self.world_size
            dist.all_gather_object(states, self.compressor.state_dict())
            checkpoint[COMPRESSION_KEY] = states
        checkpoint["parallel_layout"] = self._layout()
        if self.async_checkpoint:
            if self._checkpoint_group is None:
                raise RuntimeError(f"{type(self).__name__}: async_checkpoint was turned on after setup; its process "
                                   "group is created in setup_environment (pass async_checkpoint=True at construction).")
            self._checkpoint_writer.wait()  # one write in flight: the previous one is published first
            self._checkpoint_writer.track(async_save_sharded(
                path, state, checkpoint, is_writer=self.is_global_zero, barrier=self.barrier,
                process_group=self._checkpoint_group, replica_key=replica_key, rank_files=rank_files))
            return
        save_sharded(path, state, checkpoint, is_writer=self.is_global_zero, barrier=self.barrier,
                     replica_key=replica_key, rank_files=rank_files)

    def _replica_index(self, coords: dict[str, int]) -> int:
        return coords["dp_replicate"] if self.zero_stage >= 2 else coords["dp"]

    def _dp_sync_file(self, coords: dict[str, int]) -> str:
        if self.zero_stage >= 2:
            return DP_SYNC_SHARD_FILE.format(coords["tp"], coords["pp"], coords["dp_shard"])
        return DP_SYNC_FILE.format(coords["tp"], coords["pp"])

    def _layout(self) -> dict[str, Any]:
        assert self.dims is not None
        sync = self.data_parallel_sync
        layout = {"tp": self.dims.tp, "pp": self.dims.pp, "dp": self.dims.dp,
                  "pipeline_schedule": self.pipeline_schedule, "virtual_pipeline_stages": self.virtual_pipeline_stages,
                  "data_parallel_sync": None if sync is None else type(sync).__name__}
        if self.zero_stage:  # absent for zero_stage=0, as in checkpoints written before sharding existed
            layout.update(zero_stage=self.zero_stage, data_parallel_shard_size=self.dims.dp_shard)
        return layout

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        if self.is_global_zero:
            # With async_checkpoint, held back while a newer checkpoint is still being written.
            self._checkpoint_writer.remove(Path(filepath))

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a checkpoint folder written with any (tp, pp, dp) layout into this one."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        self._checkpoint_writer.wait()  # a checkpoint of this run may still be in flight
        path = Path(checkpoint_path)
        meta = read_meta(path, type(self).__name__)
        saved_sync = (meta.get("parallel_layout") or {}).get("data_parallel_sync")
        module = self.lightning_module
        state: dict[str, Any] = {"model": get_model_state_dict(module)}
        optimizers = [o._optimizer if isinstance(o, LightningOptimizer) else o for o in self.optimizers]
        for index, optimizer in enumerate(optimizers):
            state[f"optimizer_{index}"] = get_optimizer_state_dict(module, optimizer)
        key = self._replica_key(meta, path) if saved_sync is not None else None
        load_sharded(path, state, key)
        set_model_state_dict(module, state["model"], )
        # ZeRO-1: this rank keeps (and loaded) state only for the parameters it steps.
        options = StateDictOptions(strict=self.zero_stage != 1)
        for index, optimizer in enumerate(optimizers):
            set_optimizer_state_dict(module, optimizer, state[f"optimizer_{index}"], options=options)
        self._load_dp_sync_state(saved_sync, path)
        self._load_compression_state(meta, path)
        return meta

    def _replica_key(self, meta: dict[str, Any], path: Path) -> str:
        """This rank's replica entry of a checkpoint written with ``data_parallel_sync`` (same layout only)."""
        assert self.dims is not None
        saved = meta["parallel_layout"]
        if self._dp.state is None or saved != self._layout():
            raise ConfigurationError(
                f"{path} was written with data_parallel_sync={saved['data_parallel_sync']} and layout {saved}; "
                f"its replicas differ, so it resumes only with the same layout and data_parallel_sync "
                f"(this run: {self._layout()})."
            )
        return REPLICA_KEY.format(self._replica_index(self.dims.coordinates(self.global_rank)))

    def _load_dp_sync_state(self, saved_sync: str | None, path: Path) -> None:
        if self._dp.state is None:
            return
        if saved_sync is None:
            # A checkpoint of synchronous training: every replica starts from it, the algorithm afresh.
            if isinstance(self._dp.state, DiLoCoState):
                self._dp.state.reset_global(self._local_parameters())
            rank_zero_warn(f"{path} was written without data_parallel_sync; {self.data_parallel_sync!r} starts "
                           "from its parameters with a fresh round counter.")
            return
        assert self.dims is not None
        dp_state = safe_torch_load(path / self._dp_sync_file(self.dims.coordinates(self.global_rank)))
        self._dp.state.load_state_dict(dp_state)

    def _load_compression_state(self, meta: dict[str, Any], path: Path) -> None:
        states = meta.get(COMPRESSION_KEY)
        if self._dp.compression is None:
            return
        if states is None:
            rank_zero_warn(f"{path} holds no gradient-compression state; {self.compressor!r} starts afresh.")
            return
        if meta.get("parallel_layout") != self._layout():
            # Error feedback is per local shard; it cannot be mapped onto another sharding.
            rank_zero_warn(f"{path} was written with layout {meta.get('parallel_layout')} and this run uses "
                           f"{self._layout()}; the gradient-compression memory starts afresh.")
            return
        self.compressor.load_state_dict(states[self.global_rank])

    def export_state_dict(self) -> dict[str, Tensor] | None:
        """The full, unsplit network state dict (original FQNs) on global rank 0; ``None`` elsewhere."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        net = getattr(self.lightning_module, "model", None)
        net = net if isinstance(net, nn.Module) else self.lightning_module
        local = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        assert self.dims is not None
        coords = self.dims.coordinates(self.global_rank)
        mine = {k: v.detach().cpu().clone() for k, v in local.items()} if coords["dp"] == coords["tp"] == 0 else {}
        gathered: list[Any] = [None] * self.world_size if self.is_global_zero else []
        dist.gather_object(mine, gathered if self.is_global_zero else None, dst=0)
        if not self.is_global_zero:
            return None
        full: dict[str, Tensor] = {}
        for part in gathered:
            full.update(part)
        return full

