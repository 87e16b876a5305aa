"""Lightning glue for :func:`lit_parallel.parallel.process_group.init_process_group`."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import ClusterEnvironment
from lightning.pytorch.plugins.layer_sync import LayerSync, TorchSyncBatchNorm
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed import ProcessGroup

from lit_parallel.parallel.context import ParallelContext
from lit_parallel.parallel.process_group import init_process_group
from lit_parallel.parallel.safe_load import check_safe
from lit_parallel.plugins.sync_batchnorm import MeshSyncBatchNorm

__all__ = ["connect", "hang_timeout_seconds", "mesh_layer_sync", "RestartSafeDDPMixin", "start_hang_monitor",
           "stop_hang_monitor"]


def connect(cluster_environment: ClusterEnvironment, backend: str, timeout: timedelta, device: torch.device) -> None:
    """Create the default process group as Lightning does, but safe across torchrun restarts."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ["MASTER_ADDR"] = cluster_environment.main_address
    os.environ["MASTER_PORT"] = str(cluster_environment.main_port)
    world_size = cluster_environment.world_size()
    init_process_group(backend, cluster_environment.global_rank(), world_size, timeout, device_id=device)
    rank_zero_info(f"distributed_backend={backend}: {world_size} processes joined")


# Seconds a rank of a multi-process run may take to exit after an exception before it is forced out.
EXIT_GRACE_S = 30


def exit_watchdog(world_size: int) -> None:
    """After an exception in a multi-process run: make sure this process really exits.

    Lightning re-raises the exception and the process should end within a second; but a rank that
    stays alive (a non-daemon thread, a process-group destructor waiting on a peer) would keep its
    sockets open, so peers blocked in a collective never see it die and wait for the collective timeout.
    ``faulthandler``'s C-level timer dumps every thread's stack and calls ``_exit(1)`` after
    :data:`EXIT_GRACE_S` seconds, even during interpreter shutdown. Single-process runs are left alone.
    """
    import faulthandler
    import sys

    if world_size > 1:
        faulthandler.dump_traceback_later(EXIT_GRACE_S, exit=True, file=sys.stderr)


def mesh_layer_sync(layer_sync: LayerSync | None, process_group: ProcessGroup | None = None) -> LayerSync | None:
    """The layer-sync plugin a strategy should apply, with batch norm pooled over ``process_group``.

    Lightning turns ``Trainer(sync_batchnorm=True)`` into a ``TorchSyncBatchNorm`` (torch's CUDA-only
    :class:`~torch.nn.SyncBatchNorm`, over the whole world); it becomes a
    :class:`~lit_parallel.plugins.MeshSyncBatchNorm` over ``process_group``. A ``MeshSyncBatchNorm``
    without a group gets ``process_group``. ``None`` and any other plugin (a user's own ``LayerSync``,
    subclasses of ``TorchSyncBatchNorm`` included) are returned unchanged.

    Args:
        layer_sync: the strategy's ``_layer_sync`` as Lightning set it.
        process_group: the data-parallel group (``None``: the default group).

    Example::

        # in a mesh strategy's setup(), once the data-parallel group exists:
        self._layer_sync = mesh_layer_sync(self._layer_sync, dp_group)
        if trainer.state.fn == TrainerFn.FITTING and self._layer_sync:
            self.model = self._layer_sync.apply(self.model)
    """
    if type(layer_sync) is TorchSyncBatchNorm:
        return MeshSyncBatchNorm(process_group)
    if isinstance(layer_sync, MeshSyncBatchNorm) and layer_sync.process_group is None:
        layer_sync.process_group = process_group
    return layer_sync


class RestartSafeDDPMixin:
    """For :class:`~lightning.pytorch.strategies.DDPStrategy` subclasses: join through :func:`connect`,
    never linger after an exception (:func:`exit_watchdog`), and synchronize batch norm on every
    backend (``Trainer(sync_batchnorm=True)`` applies :class:`~lit_parallel.plugins.MeshSyncBatchNorm`
    over the world, which is the data-parallel group of these strategies). They declare their layout in
    :attr:`parallel_context`: plain data parallelism over the world."""

    compressor: Any  # every DDP-family strategy of the package has one (``NoCompression`` counts bytes)
    replica_sync_every: int | None = None  # LocalSGD / DiLoCo: steps between synchronizations
    replicas_meet: bool = True  # False under Streaming DiLoCo (ParallelContext.replicas_meet)
    hang_timeout: float | None = None  # seconds a peer may stay silent (hang_timeout_seconds)

    @property
    def parallel_context(self: Any) -> ParallelContext:
        """The layout for precision plugins and callbacks (:class:`~lit_parallel.parallel.context.ParallelContext`)."""
        return ParallelContext(device=self.root_device, data_parallel_size=self.world_size,
                               compressor=self.compressor, replica_sync_every=self.replica_sync_every,
                               replicas_meet=self.replicas_meet)

    @property
    def _layer_sync(self: Any) -> LayerSync | None:
        return self.__dict__.get("_mesh_layer_sync")

    @_layer_sync.setter
    def _layer_sync(self: Any, layer_sync: LayerSync | None) -> None:
        # Lightning's accelerator connector assigns TorchSyncBatchNorm here; DDPStrategy.setup applies it.
        self.__dict__["_mesh_layer_sync"] = mesh_layer_sync(layer_sync)

    def load_checkpoint(self: Any, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load, always with ``weights_only=True``; a file naming other globals is refused by name
        before anything of it is unpickled (docs/fault_tolerance.md, "Safe loading")."""
        if Path(checkpoint_path).is_file():
            check_safe(checkpoint_path)
        return super().load_checkpoint(checkpoint_path, weights_only=True)  # type: ignore[misc]

    def on_exception(self: Any, exception: BaseException) -> None:
        exit_watchdog(self.world_size)
        super().on_exception(exception)  # type: ignore[misc]

    def setup_distributed(self: Any) -> None:
        self.set_world_ranks()
        from lit_parallel.plugins.async_checkpoint_io import AsyncAtomicCheckpointIO, check_checkpoint_dirs

        if isinstance(self.checkpoint_io, AsyncAtomicCheckpointIO):  # refused before any process-group work
            check_checkpoint_dirs(self.lightning_module.trainer)
        connect(self.cluster_environment, self._get_process_group_backend(), self._timeout, self.root_device)
        start_hang_monitor(self, self.hang_timeout)
        super().setup_distributed()  # type: ignore[misc]  (finds the group initialized and keeps it)

    def teardown(self: Any) -> None:
        stop_hang_monitor(self)
        super().teardown()  # type: ignore[misc]


# Environment default of ``hang_timeout`` (seconds) for every strategy.
HANG_TIMEOUT_ENV = "LIT_PARALLEL_HANG_TIMEOUT"


def hang_timeout_seconds(owner: str, value: float | timedelta | None) -> float | None:
    """Validate ``hang_timeout`` (seconds or a timedelta); ``None`` falls back to :data:`HANG_TIMEOUT_ENV`.

    Args:
        owner: the strategy's class name, for the message.
        value: the ``hang_timeout`` argument.

    Returns:
        Seconds, or ``None`` (off).

    Raises:
        ConfigurationError: not a number or timedelta, or not > 0.
    """
    from lit_parallel.errors import ConfigurationError

    value, source = _env_default(value, "hang_timeout", HANG_TIMEOUT_ENV, float, "seconds > 0")
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0 or seconds == float("inf"):
        raise ConfigurationError(f"{owner}({source}={value!r}); valid: seconds > 0 (a number or a timedelta), "
                                 "or None for off.")
    return float(seconds)


def start_hang_monitor(strategy: Any, hang_timeout: float | None) -> None:
    """Start this rank's :class:`~lit_parallel.parallel.heartbeat.HeartbeatMonitor` (once the group exists).

    Its step is the trainer's ``global_step``. Under Lightning's launcher and ``env://`` rank 0 serves the
    store in its own process; under torchrun's agent store (``restart_attempt() is not None``) the agent does.
    """
    import torch.distributed as dist

    from lit_parallel.parallel.heartbeat import HeartbeatMonitor, heartbeat_store
    from lit_parallel.parallel.process_group import restart_attempt

    if hang_timeout is None or strategy.__dict__.get("_hang_monitor") is not None or dist.get_world_size() < 2:
        return
    interval = max(0.5, hang_timeout / 10)

    def step() -> int:
        return strategy.lightning_module.trainer.global_step

    def store() -> dist.Store:
        # A stopped store host is judged by the monitor's own clock; the call timeout only guards a slow one.
        return heartbeat_store(timeout=hang_timeout)

    monitor = HeartbeatMonitor(store(), dist.get_rank(), dist.get_world_size(), hang_timeout, interval, progress=step,
                               store_host_rank=None if restart_attempt() is not None else 0, reconnect=store)
    monitor.start()
    strategy.__dict__["_hang_monitor"] = monitor
    rank_zero_info(f"hang detection: a rank silent for {hang_timeout:g} s ends the run (heartbeat every {interval:g} s)")


def stop_hang_monitor(strategy: Any) -> None:
    """Stop the monitor :func:`start_hang_monitor` started, if any (teardown: peers may still be running)."""
    monitor = strategy.__dict__.pop("_hang_monitor", None)
    if monitor is not None:
        monitor.stop()


def _env_default(value: Any, name: str, env: str, parse: Any, valid: str) -> tuple[Any, str]:
    """``(value, name)``, or the parsed environment variable ``env`` and its name when ``value`` is ``None``.

    Raises:
        ConfigurationError: ``env`` does not parse.
    """
    from lit_parallel.errors import ConfigurationError

    if value is not None or not os.environ.get(env):
        return value, name
    raw = os.environ[env]
    try:
        return parse(raw), env
    except ValueError:
        raise ConfigurationError(f"{env}={raw!r}; valid: {valid}.") from None


# Environment default of ``replica_check_every_n_steps`` (the test suite sets it to 1).
REPLICA_CHECK_ENV = "LIT_PARALLEL_REPLICA_CHECK_EVERY_N_STEPS"


def replica_check_interval(owner: str, value: int | None) -> int | None:
    """Validate ``replica_check_every_n_steps``; ``None`` falls back to :data:`REPLICA_CHECK_ENV`."""
    from lit_parallel.errors import ConfigurationError

    value, source = _env_default(value, "replica_check_every_n_steps", REPLICA_CHECK_ENV, int, "a positive integer")
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{owner}({source}={value!r}); valid: a positive integer, or None/0 for off.")
    return value


def check_replicas_now(strategy: Any, every: int | None, group: Any = None) -> None:
    """Run the replica divergence guard if this optimizer step is one of every ``every``."""
    if every is None:
        return
    module = strategy.lightning_module
    trainer = getattr(module, "_trainer", None)
    step = (trainer.global_step if trainer is not None else 0) + 1  # the step that just finished
    if step % every:
        return
    from lit_parallel.parallel.consistency import check_replicas

    check_replicas(module.named_parameters(), group=group, step=step)


def check_replicas_after_round(strategy: Any, every: int | None, state: Any, group: Any = None) -> None:
    """The replica divergence guard for local SGD / DiLoCo, called right after a synchronization.

    Replicas are equal only right after a round, so the check runs at the first round due after every
    ``every`` steps: on rounds ``state.steps // state.sync_every`` that are multiples of
    ``every // sync_every`` (every round when ``every <= sync_every``).
    """
    if every is None:
        return
    rounds = state.steps // state.sync_every
    if rounds % max(1, every // state.sync_every):
        return
    from lit_parallel.parallel.consistency import check_replicas

    check_replicas(strategy.lightning_module.named_parameters(), group=group, step=state.steps)
