"""DiLoCo: local inner steps, an averaged pseudo-gradient every H steps, an outer Nesterov SGD."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.strategy import _StrategyRegistry
from torch.distributed import ProcessGroup
from typing_extensions import override

from lit_parallel.compression import Compressor, NoCompression, resolve_compressor
from lit_parallel.parallel.local_sgd import (
    DiLoCoState,
    LocalSGDState,
    check_outer,
    check_streaming,
    check_sync_every,
    check_threaded_backend,
    is_streaming,
    resolve_outer_compressor,
)
from lit_parallel.strategies.local_sgd import LocalSGDStrategy

__all__ = ["DiLoCoStrategy"]


class DiLoCoStrategy(LocalSGDStrategy):
    """DiLoCo (Douillard et al. 2023): replicas train alone; every H steps an outer optimizer syncs them.

    The inner optimizer is the LightningModule's own and runs on every rank without gradient
    communication. Every ``sync_every`` inner steps (a round) each rank computes the pseudo-gradient
    ``global - local``; it is averaged across ranks (through ``compression`` when given) and applied to
    the replicated global parameters by an outer SGD with Nesterov momentum; every replica then restarts
    from the new global parameters. ``outer_lr=1.0, outer_momentum=0.0`` is :class:`LocalSGDStrategy`.

    With ``overlap=True`` the averaging runs in the background while the next round trains (an
    asynchronous all-reduce on a dedicated process group; with a compressor, a background thread) and
    its result is applied at the end of the next round, one round late, so no rank waits on the network.

    With ``fragments=F`` it is Streaming DiLoCo (Douillard et al. 2025): the parameters are cut into F
    fragments balanced by size, and one fragment synchronizes every ``sync_every / F`` steps (each still once
    per round), so the peak bytes of one exchange fall F-fold. ``overlap_steps=τ`` launches a fragment's
    exchange at its sync step and applies it τ inner steps later (on a process group of its own), and
    ``outer_dtype="bf16" / "int8"`` quantizes the exchanged pseudo-gradient (docs/async.md, "Streaming DiLoCo").

    :attr:`compressor` counts the bytes of the pseudo-gradient exchange for
    :class:`~lit_parallel.callbacks.CommunicationMonitor`; its warm-up counts rounds, not inner steps.
    The checkpoint holds the outer state (global parameters, outer momentum, round counter, an exchange
    in flight) and every rank's parameters, inner optimizer state and compressor state.

    Tuning guide:

    1. ``sync_every`` trades bytes for quality: H=32..500 keeps the accuracy of synchronous training on
       many tasks (the paper uses 500 for language models); bytes fall H-fold against DDP.
    2. ``outer_lr=0.7, outer_momentum=0.9, nesterov=True`` are the paper's values for AdamW inner steps;
       with SGD + momentum inner steps they overshoot (MNIST, H=32: -5 pt against DDP); there
       ``outer_momentum=0.5`` kept DDP's accuracy within 0.5 pt (docs/benchmarks.md).
    3. Add ``overlap=True`` when an exchange takes a noticeable part of a round. The one-round-late step
       is less stable: keep ``outer_lr / (1 - outer_momentum)`` small (about 1; it diverged at 2 and
       above on MNIST).
    4. ``compression`` (``Int8``, ``FP16``, ...) multiplies the saving; pseudo-gradients of many steps
       tolerate quantization well. ``outer_dtype="int8"`` is the stateless quantizer of Streaming DiLoCo.
    5. On a link whose bandwidth, not total bytes, limits: ``fragments=4`` cuts the peak of one exchange
       4-fold at equal total bytes, and ``overlap_steps=1..sync_every / fragments - 1`` hides the exchange
       behind inner steps (its result is staler by as many steps).

    Args:
        sync_every: inner optimizer steps per round (``H``).
        outer_lr: outer learning rate.
        outer_momentum: outer momentum, in ``[0, 1)``.
        nesterov: Nesterov outer momentum.
        overlap: exchange the pseudo-gradient in the background and apply it one round late (DiLoCo only;
            Streaming DiLoCo overlaps with ``overlap_steps``).
        compression: a :class:`~lit_parallel.compression.Compressor`, a registered name (``"int8"``, ...)
            or ``None`` for an exact all-reduce.
        fragments: Streaming DiLoCo's parameter fragments (a divisor of ``sync_every``; 1 = DiLoCo).
        overlap_steps: inner steps between launching a fragment's exchange and applying it, in
            ``[0, sync_every / fragments)``.
        fragment_update_alpha: weight of the local parameters when a fragment takes the new global ones, in
            ``[0, 1)``.
        outer_dtype: ``None``, ``"bf16"``, ``"fp16"`` or ``"int8"``: the dtype the pseudo-gradient is averaged in
            (instead of ``compression``).
        accelerator: as for :class:`~lightning.pytorch.strategies.DDPStrategy`.
        parallel_devices: as for :class:`~lightning.pytorch.strategies.DDPStrategy`.
        cluster_environment: as for :class:`~lightning.pytorch.strategies.DDPStrategy`.
        checkpoint_io: as for :class:`~lightning.pytorch.strategies.DDPStrategy`.
        precision_plugin: as for :class:`~lightning.pytorch.strategies.DDPStrategy`.
        process_group_backend: as for :class:`~lightning.pytorch.strategies.DDPStrategy`.
        timeout: as for :class:`~lightning.pytorch.strategies.DDPStrategy`.
        start_method: as for :class:`~lightning.pytorch.strategies.DDPStrategy`.
        replica_check_every_n_steps: as for :class:`~lit_parallel.LocalSGDStrategy` (checked only after a
            whole-model synchronization, so never with ``fragments > 1``).
        hang_timeout: as for :class:`~lit_parallel.LocalSGDStrategy`.

    Raises:
        ConfigurationError: ``sync_every < 1``, ``outer_lr <= 0``, ``outer_momentum`` outside ``[0, 1)``,
            an unknown compressor, ``overlap`` / ``overlap_steps`` with a compressor on a backend that cannot
            run its exchange in a background thread (valid: gloo, nccl; or no compression), ``fragments`` not
            dividing ``sync_every``, ``overlap_steps`` outside ``[0, sync_every / fragments)``, an unknown
            ``outer_dtype`` or one given with ``compression``, or ``overlap=True`` with streaming options.

    Example::

        from lit_parallel import DiLoCoStrategy
        from lit_parallel.compression import Int8

        trainer = Trainer(accelerator="cpu", devices=2,
                          strategy=DiLoCoStrategy(sync_every=64, overlap=True, compression=Int8()))
        trainer = Trainer(accelerator="cpu", devices=2, strategy="diloco")  # the defaults below
        trainer = Trainer(accelerator="cpu", devices=2,                     # Streaming DiLoCo
                          strategy=DiLoCoStrategy(sync_every=64, fragments=4, overlap_steps=2, outer_dtype="int8"))
    """

    def __init__(
        self,
        sync_every: int = 64,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        overlap: bool = False,
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
        fragments: int = 1,
        overlap_steps: int = 0,
        fragment_update_alpha: float = 0.0,
        outer_dtype: str | None = None,
    ) -> None:
        owner = type(self).__name__
        check_sync_every(owner, sync_every)
        check_outer(owner, outer_lr, outer_momentum)
        check_streaming(owner, sync_every, overlap, fragments, overlap_steps, fragment_update_alpha, outer_dtype)
        compression = resolve_outer_compressor(owner, outer_dtype, resolve_compressor(compression))
        super().__init__(
            sync_every=sync_every,
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            replica_check_every_n_steps=replica_check_every_n_steps,
            hang_timeout=hang_timeout,
        )
        self.outer_lr, self.outer_momentum, self.nesterov, self.overlap = outer_lr, outer_momentum, nesterov, overlap
        self.fragments, self.overlap_steps = fragments, overlap_steps
        self.fragment_update_alpha, self.outer_dtype = fragment_update_alpha, outer_dtype
        if compression is not None:
            self._compressor = compression
        if process_group_backend is not None:
            self._check_overlap(process_group_backend)

    @override
    def setup_environment(self) -> None:
        # The backend is known here, before the process group exists.
        self._check_overlap(self._get_process_group_backend())
        super().setup_environment()

    @override
    def teardown(self) -> None:
        if isinstance(self._state, DiLoCoState):
            self._state.close()
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(
            "diloco", cls, description="DiLoCo: outer Nesterov SGD on pseudo-gradients every 64 inner steps"
        )

    @override
    def _build_state(self, params: list[torch.Tensor]) -> LocalSGDState:
        return DiLoCoState(params, self.sync_every, self.outer_lr, self.outer_momentum, self.nesterov,
                           self.overlap, self._compressor, fragments=self.fragments, overlap_steps=self.overlap_steps,
                           fragment_update_alpha=self.fragment_update_alpha, outer_dtype=self.outer_dtype)

    @override
    def _create_sync_group(self) -> ProcessGroup | None:
        # A group of its own, so the exchange in flight never queues behind (or blocks) Lightning's own
        # collectives such as the logged loss's all-reduce. new_group is collective: every rank calls it.
        if not self._asynchronous or not dist.is_initialized():
            return None
        return dist.new_group(backend=self._get_process_group_backend())

    @property
    def replicas_meet(self) -> bool:  # type: ignore[override]  # a class attribute in the mixin
        """Whether the replicas are identical right after a round (not under Streaming DiLoCo)."""
        return not is_streaming(self.fragments, self.overlap_steps, self.fragment_update_alpha)

    @property
    def _asynchronous(self) -> bool:
        """Whether an exchange runs while inner steps continue (``overlap`` or ``overlap_steps > 0``)."""
        return self.overlap or self.overlap_steps > 0

    def _check_overlap(self, backend: str) -> None:
        if self._asynchronous and not isinstance(self._compressor, NoCompression):
            setting = "overlap=True" if self.overlap else f"overlap_steps={self.overlap_steps}"
            check_threaded_backend(backend, f"DiLoCoStrategy({setting}, compression={self._compressor!r})",
                                   "compression=None and outer_dtype=None")
