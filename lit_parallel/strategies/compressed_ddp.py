"""Lightning DDP whose gradient all-reduce goes through a compressor, on every backend."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.strategy import _StrategyRegistry
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lit_parallel.compression import COMPRESSORS, Compressor, Hierarchical, NoCompression, resolve_compressor
from lit_parallel.errors import ConfigurationError
from lit_parallel.strategies._launch import (
    RestartSafeDDPMixin,
    check_replicas_now,
    hang_timeout_seconds,
    replica_check_interval,
)

__all__ = ["CompressedDDPStrategy"]

# Key under which the strategy stores every rank's compressor state in a Lightning checkpoint.
CHECKPOINT_KEY = "compression"
_HOOK_ARGUMENTS = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")


class CompressedDDPStrategy(RestartSafeDDPMixin, DDPStrategy):
    """:class:`~lightning.pytorch.strategies.DDPStrategy` with compressed gradient all-reduce.

    The compressor is registered as DDP's communication hook on every backend (Lightning's own DDP
    registers hooks only on CUDA); the hook only queues each bucket's exchange and returns a future, so
    compression and communication overlap with the rest of backward. The compressor is advanced once
    per optimizer step (its warm-up counts these), and its state (error-feedback memory, warm starts,
    step count) of *every* rank is saved in the Lightning checkpoint, so a resumed run continues exactly. Without ``compression`` the strategy is plain DDP:
    gradients are averaged by an exact all-reduce that also counts its bytes for
    :class:`~lit_parallel.callbacks.CommunicationMonitor`.

    Args:
        compression: a :class:`~lit_parallel.compression.Compressor`, a registered name (``"powersgd"``,
            ``"topk"``, ...), or ``None`` for exact all-reduce.
        accelerator: as for :class:`DDPStrategy`.
        parallel_devices: as for :class:`DDPStrategy`.
        cluster_environment: as for :class:`DDPStrategy`.
        checkpoint_io: as for :class:`DDPStrategy`.
        precision_plugin: as for :class:`DDPStrategy`.
        process_group_backend: as for :class:`DDPStrategy` (``None``: gloo on CPU, NCCL on CUDA).
        timeout: as for :class:`DDPStrategy`.
        start_method: as for :class:`DDPStrategy`.
        replica_check_every_n_steps: every N optimizer steps, verify that all replicas hold bitwise-identical
            parameters (one all-gather of 8 bytes per tensor); ``None`` reads ``LIT_PARALLEL_REPLICA_CHECK_EVERY_N_STEPS``
            (unset: off).
        hang_timeout: seconds (or a ``timedelta``) a peer may stay silent before this rank reports it and
            exits (docs/fault_tolerance.md, "No hangs"); ``None`` reads ``LIT_PARALLEL_HANG_TIMEOUT`` (unset: off).
        **kwargs: passed to :class:`~torch.nn.parallel.DistributedDataParallel`.

    Raises:
        ConfigurationError: an unknown compressor name or type, a DDP comm hook or model averaging passed
            as well (the compressor is the hook), or compression with a single data-parallel process.

    Example::

        from lit_parallel import CompressedDDPStrategy
        from lit_parallel.callbacks import CommunicationMonitor
        from lit_parallel.compression import PowerSGD

        trainer = Trainer(accelerator="cpu", devices=2, callbacks=[CommunicationMonitor()],
                          strategy=CompressedDDPStrategy(compression=PowerSGD(rank=4, warmup_steps=100)))
        trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_powersgd")  # default PowerSGD
    """

    def __init__(
        self,
        compression: Compressor | str | None = None,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        replica_check_every_n_steps: int | None = None,
        hang_timeout: float | timedelta | None = None,
        **kwargs: Any,
    ) -> None:
        clashing = [name for name in _HOOK_ARGUMENTS if kwargs.get(name) is not None]
        if clashing:
            raise ConfigurationError(
                f"CompressedDDPStrategy got {clashing}; its compressor is the DDP comm hook. Valid: "
                f"compression=<one of {sorted(COMPRESSORS)}>, or DDPStrategy for a custom hook."
            )
        compression = resolve_compressor(compression)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **kwargs,
        )
        self.compressor: Compressor = compression if compression is not None else NoCompression()
        self.replica_check_every_n_steps = replica_check_interval(type(self).__name__, replica_check_every_n_steps)
        self.hang_timeout = hang_timeout_seconds(type(self).__name__, hang_timeout)

    @override
    def setup_environment(self) -> None:
        # Checked before the process group exists, once the device count is known.
        world_size = self.num_nodes * len(self.parallel_devices or [])
        if self.compressor.compressing and world_size < 2:
            raise ConfigurationError(
                f"compression={self.compressor!r} needs data parallelism, but the trainer runs "
                f"{world_size} process; valid: devices * num_nodes >= 2, or no compression."
            )
        super().setup_environment()
        # Collective (new_group): every rank, now that the process group exists. The dp group is the world.
        ranks = [list(range(self.world_size))]
        if isinstance(self.compressor, Hierarchical):
            self.compressor.setup_groups(ranks, default_node_size=len(self.parallel_devices or []) or None)
        else:
            self.compressor.setup_groups(ranks)

    @override
    def _register_ddp_hooks(self) -> None:
        assert isinstance(self.model, DistributedDataParallel)
        self.model.register_comm_hook(*self.compressor.ddp_comm_hook(self.model.module, self.model.process_group))

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self.compressor.step()
        check_replicas_now(self, self.replica_check_every_n_steps)
        return output

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        # Error-feedback memory differs per rank, and only rank 0 writes: gather every rank's state.
        state = self.compressor.state_dict()
        states = [state]
        if dist.is_available() and dist.is_initialized():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        checkpoint[CHECKPOINT_KEY] = states
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        states = checkpoint.get(CHECKPOINT_KEY)
        if states is None:
            if self.compressor.compressing:
                rank_zero_warn(f"{checkpoint_path} holds no compression state; {self.compressor!r} starts afresh.")
            return checkpoint
        if len(states) != self.world_size:  # a resized run (ElasticResume): per-rank memory cannot be split
            rank_zero_warn(f"{checkpoint_path} holds compression state of {len(states)} ranks but the run has "
                           f"world_size={self.world_size}; {self.compressor!r} starts afresh (error feedback, warm "
                           "start and warm-up from zero).")
            return checkpoint
        self.compressor.load_state_dict(states[self.global_rank])
        return checkpoint

    @override
    def teardown(self) -> None:
        self.compressor.close()  # the thread the asynchronous comm hook exchanges on
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name in sorted(COMPRESSORS):
            if name != "none":
                strategy_registry.register(
                    f"ddp_{name}", cls, description=f"DDP with {COMPRESSORS[name].__name__} gradient compression",
                    compression=name,
                )
