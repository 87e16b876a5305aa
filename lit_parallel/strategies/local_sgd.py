"""Local SGD: every rank steps its own optimizer; parameters are averaged every ``sync_every`` steps."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.strategy import _StrategyRegistry
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed import ProcessGroup
from torch.optim import Optimizer
from typing_extensions import override

from lit_parallel.compression import Compressor, Hierarchical, get_compressor
from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.local_sgd import LocalSGDState, check_sync_every
from lit_parallel.strategies._launch import (
    RestartSafeDDPMixin,
    check_replicas_after_round,
    hang_timeout_seconds,
    replica_check_interval,
)

__all__ = ["LocalSGDStrategy"]

# Key under which the strategy stores its algorithm state and every rank's replica in a checkpoint.
CHECKPOINT_KEY = "local_sgd"


class LocalSGDStrategy(RestartSafeDDPMixin, DDPStrategy):
    """Data parallelism without a per-step gradient all-reduce: replicas average parameters every H steps.

    The model is not wrapped in DDP. Rank 0's initial parameters are broadcast, then every rank runs
    its own optimizer on its own shard of the data and every ``sync_every`` optimizer steps the
    parameters are averaged (an exact all-reduce through the byte-counting ``"none"`` compressor, exposed
    as :attr:`compressor` for :class:`~lit_parallel.callbacks.CommunicationMonitor`). That sends
    ``sync_every`` times fewer bytes than DDP. With ``sync_every=1`` and SGD (with or without momentum)
    it is DDP up to rounding.

    Between synchronizations the replicas differ, and so do their optimizer states: a checkpoint holds
    every rank's parameters and optimizer states, and a resumed run continues each replica exactly.
    Buffers (BatchNorm statistics) are not averaged; each rank keeps its own, unless
    ``Trainer(sync_batchnorm=True)`` computes them over all ranks' batches (docs/sync_batchnorm.md).

    Args:
        sync_every: optimizer steps between two parameter averagings (``H``).
        accelerator: as for :class:`DDPStrategy`.
        parallel_devices: as for :class:`DDPStrategy`.
        cluster_environment: as for :class:`DDPStrategy`.
        checkpoint_io: as for :class:`DDPStrategy`.
        precision_plugin: as for :class:`DDPStrategy`.
        process_group_backend: as for :class:`DDPStrategy` (``None``: gloo on CPU, NCCL on CUDA).
        timeout: as for :class:`DDPStrategy`.
        start_method: as for :class:`DDPStrategy`.
        replica_check_every_n_steps: verify bitwise-equal replicas after the averaging due at (or after) every
            N steps; ``None`` reads ``LIT_PARALLEL_REPLICA_CHECK_EVERY_N_STEPS`` (unset: off).
        hang_timeout: seconds (or a ``timedelta``) a peer may stay silent before this rank reports it and
            exits (docs/fault_tolerance.md, "No hangs"); ``None`` reads ``LIT_PARALLEL_HANG_TIMEOUT`` (unset: off).

    Raises:
        ConfigurationError: ``sync_every`` is not an integer >= 1.

    Example::

        from lit_parallel import LocalSGDStrategy
        from lit_parallel.callbacks import CommunicationMonitor

        trainer = Trainer(accelerator="cpu", devices=2, callbacks=[CommunicationMonitor()],
                          strategy=LocalSGDStrategy(sync_every=16))
        trainer = Trainer(accelerator="cpu", devices=2, strategy="local_sgd")  # sync_every=16
    """

    def __init__(
        self,
        sync_every: int = 16,
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
    ) -> None:
        check_sync_every(type(self).__name__, sync_every)
        self.replica_check_every_n_steps = replica_check_interval(type(self).__name__, replica_check_every_n_steps)
        self.hang_timeout = hang_timeout_seconds(type(self).__name__, hang_timeout)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.sync_every = sync_every
        self._state: LocalSGDState | None = None
        self._sync_group: ProcessGroup | None = None
        self._compressor: Compressor = get_compressor("none")
        self._restored: dict[str, Any] | None = None

    @property
    def replica_sync_every(self) -> int:
        """Optimizer steps between two synchronizations: the replicas are identical only after those."""
        return self.sync_every

    @property
    def compressor(self) -> Compressor:
        """Averages the synchronized tensors and counts their bytes (read by ``CommunicationMonitor``)."""
        return self._compressor

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # The replicas are only built in setup (after the broadcast of rank 0's parameters); each rank's
        # own parameters from the checkpoint must be restored after that.
        return True

    @override
    def configure_ddp(self) -> None:
        # No DDP wrapper, hence no per-step all-reduce; replicas start from rank 0's parameters.
        assert self.model is not None
        _sync_module_states(self.model)
        self._sync_group = self._create_sync_group()
        # The compressor's own groups (collective, every rank); the dp group is the world.
        ranks = [list(range(self.world_size))]
        if isinstance(self._compressor, Hierarchical):
            self._compressor.setup_groups(ranks, default_node_size=len(self.parallel_devices or []) or None)
        else:
            self._compressor.setup_groups(ranks)
        self._state = self._build_state(self._parameters())

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        assert self._state is not None
        if self._state.step(self._parameters(), self._sync_group):
            check_replicas_after_round(self, self.replica_check_every_n_steps, self._state)
        return output

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        if self._state is not None:  # None outside fitting: there is nothing but the model to save
            checkpoint[CHECKPOINT_KEY] = self._checkpoint_state()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        super().load_model_state_dict(checkpoint, strict=strict)
        saved = checkpoint.get(CHECKPOINT_KEY)
        if self._state is None:
            return  # not fitting: every rank evaluates the checkpoint's model (rank 0's replica)
        if saved is None:
            rank_zero_warn(f"the checkpoint holds no {type(self).__name__} state; every replica starts "
                           "from rank 0's parameters and the round counter from zero.")
            return
        ranks = saved["ranks"]
        if len(ranks) != self.world_size:
            raise ConfigurationError(
                f"the checkpoint holds {len(ranks)} replicas but the run has world_size={self.world_size}; "
                f"resume with {len(ranks)} processes."
            )
        own = ranks[self.global_rank]
        self._state.load_state_dict(saved["algorithm"])
        self._compressor.load_state_dict(own["compressor"])
        with torch.no_grad():
            for p, value in zip(self._parameters(), own["params"], strict=True):
                p.copy_(value)
        self._restored = own

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self._restored is None:
            super().load_optimizer_state_dict(checkpoint)
            return
        for optimizer, state in zip(self.optimizers, self._restored["optimizers"], strict=True):
            optimizer.load_state_dict(state)
            _optimizer_to_device(optimizer, self.root_device)
        self._restored = None

    @override
    def teardown(self) -> None:
        self._sync_group = None
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(
            "local_sgd", cls, description="Local SGD: parameters averaged every 16 optimizer steps"
        )

    # -- for DiLoCoStrategy -------------------------------------------------------------------------
    def _build_state(self, params: list[torch.Tensor]) -> LocalSGDState:
        return LocalSGDState(self.sync_every, self._compressor)

    def _create_sync_group(self) -> ProcessGroup | None:
        return None

    # -- helpers ------------------------------------------------------------------------------------
    def _parameters(self) -> list[torch.Tensor]:
        assert self.lightning_module is not None
        return [p for p in self.lightning_module.parameters() if p.requires_grad]

    def _checkpoint_state(self) -> dict[str, Any]:
        # Replicas and their optimizer states differ between syncs, and only rank 0 writes: gather them.
        assert self._state is not None
        own = {
            "params": [p.detach().cpu().clone() for p in self._parameters()],
            "optimizers": [self.optimizer_state(opt) for opt in self.optimizers],
            "compressor": self._compressor.state_dict(),
        }
        ranks: list[Any] = [own]
        if dist.is_available() and dist.is_initialized():
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, own)
        return {"algorithm": self._state.state_dict(), "ranks": ranks}
