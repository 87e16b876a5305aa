"""HybridParallelStrategy: data × tensor × pipeline parallelism on one DeviceMesh, in Lightning."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Generator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.context import ParallelContext
from lit_parallel.parallel.data_parallel import local_tensor
from lit_parallel.parallel.dp_axis import DataParallelAxis
from lit_parallel.parallel.families import get_family
from lit_parallel.parallel.fsdp import (
    OptimizerStatePartition,
    ShardingOptions,
)
from lit_parallel.parallel.local_sgd import (
    DiLoCo,
    LocalSGD,
)
from lit_parallel.parallel.materialize import (
    MetaOrigins,
)
from lit_parallel.parallel.mesh import ParallelDims, build_mesh, mesh_dim
from lit_parallel.parallel.pipeline_runtime import PipelineRuntime, positional_inputs
from lit_parallel.parallel.pipeline_schedules import PipelineOptions
from lit_parallel.parallel.tensor_parallel import place_gradients_like_parameters
from lit_parallel.precision import HybridPrecision, to_mesh_aware
from lit_parallel.strategies._hybrid_checkpoint import ShardedCheckpointMixin
from lit_parallel.strategies._hybrid_sharding import ShardedDataParallelMixin
from lit_parallel.strategies._launch import (
    check_replicas_after_round,
    check_replicas_now,
    connect,
    exit_watchdog,
    hang_timeout_seconds,
    mesh_layer_sync,
    replica_check_interval,
    start_hang_monitor,
    stop_hang_monitor,
)
from lit_parallel.strategies._modules import ModelParallelizer

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["HybridParallelStrategy"]

_PRESETS = {
    "hybrid": {},
    "hybrid_tp2": {"tensor_parallel_size": 2},
    "hybrid_pp2": {"pipeline_parallel_size": 2},
    "hybrid_tp2_pp2": {"tensor_parallel_size": 2, "pipeline_parallel_size": 2},
    "hybrid_pp2_interleaved": {"pipeline_parallel_size": 2, "pipeline_schedule": "interleaved_1f1b"},
    "hybrid_fsdp": {"zero_stage": 3},
    "hybrid_tp2_fsdp": {"tensor_parallel_size": 2, "zero_stage": 3},
    "hybrid_pp2_fsdp": {"pipeline_parallel_size": 2, "zero_stage": 3},
}


class HybridParallelStrategy(ShardedCheckpointMixin, ShardedDataParallelMixin, ParallelStrategy):
    """Data × tensor × pipeline parallelism on one ``("pp", "dp", "tp")`` DeviceMesh.

    Any LightningModule trains with ``pipeline_parallel_size=1``: its own ``training_step`` runs, data
    parallelism needs nothing from it, and tensor parallelism is applied to the networks a registered model
    family covers among its submodules (``nn.Sequential``, Hugging Face BERT / GPT-2 / Llama / Qwen2 /
    Mistral / Qwen3, or one added with :func:`~lit_parallel.register_family`), unless ``configure_model``
    already sharded them with ``self.device_mesh["tp"]``. Pipeline parallelism runs the network itself:
    the module keeps it in ``self.model`` and implements ``model_inputs``, ``loss_target`` and ``loss_fn``
    (all modules of :mod:`lit_parallel.models` do; the error says what is missing). At setup the
    network, built in full on every rank from the same seed, is split into pipeline stages, each
    stage's layers are sharded over the tensor-parallel ranks with DTensor, and gradients are averaged
    over the data-parallel ranks only (optionally compressed). Parameter names stay those of the
    unsplit model on every rank, so checkpoints and callbacks line up across layouts.

    With ``zero_stage`` 1-3 the dp axis shards training state instead of replicating it (ZeRO): stage 1 the
    optimizer state, 2 also the gradients, 3 also the parameters, with torch's FSDP2 ``fully_shard`` per block
    on the ``("pp", "dp_replicate", "dp_shard", "tp")`` mesh (``dp = dp_replicate x dp_shard``; only the
    ``dp_shard`` ranks shard, the replicas of each shard average like DDP: HSDP). docs/memory.md.

    With ``data_parallel_sync=LocalSGD(...)`` or ``DiLoCo(...)`` the dp axis does not average gradients
    every step: each replica (a tp × pp group of ranks) steps on its own, and every ``sync_every`` steps the
    replicas average their parameters (local SGD) or their pseudo-gradients through an outer Nesterov SGD
    (DiLoCo), shard by shard over the dp group. Tensor- and pipeline-parallel traffic is unchanged.

    Args:
        tensor_parallel_size: ranks sharing each layer (heads / hidden units split between them).
        pipeline_parallel_size: pipeline ranks; each holds a contiguous group of layers.
        data_parallel_size: model replicas; ``"auto"`` uses the ranks left by ``tp * pp``.
        num_microbatches: microbatches per batch for the pipeline schedule (``"auto"``: ``2 * pp``);
            the per-rank batch size must be divisible by it.
        pipeline_schedule: ``"gpipe"``, ``"1f1b"``, ``"interleaved_1f1b"``, ``"looped_bfs"``,
            ``"zero_bubble"``, ... (see :data:`lit_parallel.parallel.pipeline.SCHEDULES`).
        virtual_pipeline_stages: stages per pipeline rank for interleaved schedules (``"auto"``: 2 for
            multi-stage schedules, else 1).
        split_points: FQNs where a new pipeline stage begins (default: balanced by parameter count).
        model_family: ``"auto"`` (detected) or one of the supported families.
        auto_tensor_parallel: apply the family's TP plan; set ``False`` to apply your own plan in
            ``configure_model`` with ``self.device_mesh["tp"]``.
        gradient_compression: a compressor of :mod:`lit_parallel.compression` for the dp-axis sync (with
            ``data_parallel_sync``, for the parameter / pseudo-gradient exchange of each round).
        data_parallel_sync: ``None`` (or ``"exact"``): gradients averaged over dp every step;
            :class:`~lit_parallel.parallel.local_sgd.LocalSGD` / :class:`~lit_parallel.parallel.local_sgd.DiLoCo`
            (or ``"local_sgd"`` / ``"diloco"`` for their defaults): replicas synchronize every ``sync_every``
            optimizer steps (docs/async.md).
        bucket_cap_mb: size of the gradient buckets of the data-parallel sync.
        overlap_grad_sync: start each bucket's data-parallel exchange while backward is still running (as
            DDP does): exact all-reduces from gradient hooks; compressed exchanges on the compressor's own
            thread and process group; under a pipeline, each stage's buckets once its last microbatch's
            backward has run (inside the schedule; not with gradient accumulation, and weights tied across
            stages wait for their stage sum). The result is the same, bit for bit, either way.
        process_group_backend: ``"gloo"``/``"nccl"``; ``None`` picks by device.
        timeout: timeout of collectives.
        replica_check_every_n_steps: every N optimizer steps, verify that the data-parallel replicas of every
            shard hold bitwise-identical parameters; ``None`` reads ``LIT_PARALLEL_REPLICA_CHECK_EVERY_N_STEPS``
            (unset: off).
        hang_timeout: seconds (or a ``timedelta``) a peer may stay silent before this rank reports it and
            exits (docs/fault_tolerance.md, "No hangs"); ``None`` reads ``LIT_PARALLEL_HANG_TIMEOUT`` (unset: off).
        zero_stage: 0 (replicate everything), 1 (shard optimizer state), 2 (+ gradients), 3 (+ parameters)
            over the ``dp_shard`` ranks (:mod:`lit_parallel.parallel.fsdp`).
        data_parallel_shard_size: dp ranks that shard (``"auto"``: all of dp with ``zero_stage > 0``); the
            remaining factor of dp replicates each shard (HSDP).
        activation_checkpointing: ``"none"``, ``"full"`` (every block recomputes its activations in backward)
            or ``"selective"`` (every second block); blocks are the model family's layers.
        async_checkpoint: write checkpoints in the background (``torch.distributed.checkpoint.async_save`` on a
            dedicated gloo group): ``save_checkpoint`` returns once the state is copied to CPU; the folder
            appears under its final name when every rank has written, and deletions of older checkpoints wait
            until then (docs/fault_tolerance.md, "Asynchronous checkpoints").

    Raises:
        ConfigurationError: for invalid sizes or names, before any process group is created.

    Example::

        trainer = Trainer(accelerator="cpu", devices=4, strategy=HybridParallelStrategy(
            tensor_parallel_size=2, pipeline_parallel_size=2, num_microbatches=4, pipeline_schedule="1f1b"))
        trainer.fit(module, datamodule)
    """

    strategy_name = "hybrid"

    def __init__(
        self,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        data_parallel_size: int | Literal["auto"] = "auto",
        num_microbatches: int | Literal["auto"] = "auto",
        pipeline_schedule: str = "1f1b",
        virtual_pipeline_stages: int | Literal["auto"] = "auto",
        split_points: list[str] | None = None,
        model_family: str = "auto",
        auto_tensor_parallel: bool = True,
        gradient_compression: Any | None = None,
        data_parallel_sync: LocalSGD | DiLoCo | str | None = None,
        bucket_cap_mb: float = 25.0,
        overlap_grad_sync: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        replica_check_every_n_steps: int | None = None,
        hang_timeout: float | timedelta | None = None,
        zero_stage: int = 0,
        data_parallel_shard_size: int | Literal["auto"] = "auto",
        activation_checkpointing: Literal["none", "full", "selective"] = "none",
        async_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self._init_async_checkpoint(async_checkpoint)
        self._sharding = ShardingOptions(zero_stage, data_parallel_shard_size, activation_checkpointing)
        self.replica_check_every_n_steps = replica_check_interval(type(self).__name__, replica_check_every_n_steps)
        self.hang_timeout = hang_timeout_seconds(type(self).__name__, hang_timeout)
        # Validate what can be validated without the world size or the model.
        ParallelDims.resolve(tensor_parallel_size, pipeline_parallel_size, data_parallel_size,
                             world_size=tensor_parallel_size * pipeline_parallel_size
                             * (1 if data_parallel_size == "auto" else data_parallel_size))
        self._pipeline_options = PipelineOptions(pipeline_parallel_size, pipeline_schedule, num_microbatches,
                                                 virtual_pipeline_stages)
        self._dp = DataParallelAxis(data_parallel_sync, gradient_compression, bucket_cap_mb)
        self._check_sharding_combination()
        if data_parallel_size != "auto":
            self._sharding.resolve_shard_size(data_parallel_size)
        if model_family != "auto":
            get_family(name=model_family)  # an unknown name is refused here, the model is checked at setup
        self._tp, self._pp, self._dp_arg = tensor_parallel_size, pipeline_parallel_size, data_parallel_size
        self.pipeline_schedule = pipeline_schedule
        self._parallelizer = ModelParallelizer(tensor_parallel_size, self._pipeline_options, model_family,
                                               auto_tensor_parallel, list(split_points) if split_points else None,
                                               type(self).__name__)
        if process_group_backend is not None:
            self._dp.check_backend(process_group_backend)
        self.overlap_grad_sync = overlap_grad_sync
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self.num_nodes = 1
        self.dims: ParallelDims | None = None
        self._device_mesh: DeviceMesh | None = None
        self._pipeline: PipelineRuntime | None = None
        self._parallelized: weakref.ref[Any] | None = None
        self._context: ParallelContext | None = None
        self._accumulating = False  # inside block_backward_sync: a gradient-accumulation micro-step
        self._tied_ids: set[int] = set()
        self._synced = False
        self._blocks: dict[str, list[str]] = {}
        self._meta_origins: dict[str, MetaOrigins] = {}
        self.materialized_bytes = 0  # bytes this rank allocated for meta-built networks (its shards only)
        self._zero1: OptimizerStatePartition | None = None

    # -- sizes and groups --------------------------------------------------------------------------
    @property
    def data_parallel_sync(self) -> LocalSGD | DiLoCo | None:
        """``None`` (gradients averaged every step) or the local SGD / DiLoCo algorithm of the dp axis."""
        return self._dp.sync

    @property
    def replica_sync_every(self) -> int | None:
        """With ``data_parallel_sync``: steps between rounds (dp replicas are identical right after one)."""
        return self._dp.replica_sync_every

    @property
    def compressor(self) -> Any:
        """The compressor of the data-parallel exchange (read by ``CommunicationMonitor``).

        Without ``gradient_compression`` it is the exact, byte-counting ``"none"`` compressor.
        """
        return self._dp.compressor

    @property
    def device_mesh(self) -> DeviceMesh:
        """The ``("pp", "dp", "tp")`` mesh (available from ``configure_model`` on)."""
        if self._device_mesh is None:
            raise RuntimeError("The device mesh exists only after the processes have initialized.")
        return self._device_mesh

    @property
    def tensor_parallel_size(self) -> int:
        return self._tp

    @property
    def pipeline_parallel_size(self) -> int:
        return self._pp

    @property
    def data_parallel_size(self) -> int:
        if self.dims is not None:
            return self.dims.dp
        return self._dp_arg if self._dp_arg != "auto" else max(1, self.world_size // (self._tp * self._pp))

    @property
    def num_microbatches(self) -> int:
        return self._pipeline_options.microbatches

    @property
    def virtual_pipeline_stages(self) -> int:
        return self._pipeline_options.stages_per_rank

    @property
    def parallel_context(self) -> ParallelContext:
        """The layout for precision plugins and callbacks (available from ``configure_model`` on)."""
        if self._context is None:
            raise RuntimeError("The parallel context exists only after the processes have initialized.")
        return self._context

    def _tied_copies(self) -> list[Tensor]:
        return [] if self._pipeline is None else self._pipeline.tied_copies(self.lightning_module.model)

    @property
    def pipeline_plan(self) -> Any | None:
        """The pipeline plan (stages, tied parameters), or ``None`` without pipeline parallelism."""
        return self._pipeline.plan if self._pipeline is not None else None

    @property
    def data_parallel_group(self) -> Any:
        return mesh_dim(self.device_mesh, "dp").get_group()

    @property
    def replica_group(self) -> Any:
        """The ranks holding identical copies of this rank's parameters (dp; only dp_replicate when FSDP2
        shards the parameters over dp_shard)."""
        return mesh_dim(self.device_mesh, "dp_replicate" if self.zero_stage >= 2 else "dp").get_group()

    @property
    def tensor_parallel_group(self) -> Any:
        return self.device_mesh.get_group("tp")

    @property
    def pipeline_parallel_group(self) -> Any:
        return self.device_mesh.get_group("pp")

    @property
    def model_parallel_group(self) -> Any:
        """The ranks across which one replica's gradient elements are disjoint: pp × tp (same dp index), and
        with FSDP2 (``zero_stage >= 2``) pp × dp_shard × tp (same dp_replicate index)."""
        if self.zero_stage >= 2:
            return self.device_mesh["pp", "dp_shard", "tp"]._flatten("pp_dp_shard_tp").get_group()
        return self.device_mesh["pp", "tp"]._flatten("pp_tp").get_group()

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def is_distributed(self) -> bool:
        return True  # Lightning adds a DistributedSampler only for strategies that say so

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Tensor and pipeline peers must see the same batch: sample over the dp axis only.
        dp_mesh = mesh_dim(self.device_mesh, "dp")
        return {"num_replicas": dp_mesh.size(), "rank": dp_mesh.get_local_rank()}

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # load into the parallelized model

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return False  # optimizer state is loaded by load_checkpoint (DCP)

    # -- precision: every plugin is made mesh-aware --------------------------------------------------
    @property
    @override
    def precision_plugin(self) -> HybridPrecision:
        return self._precision_plugin if self._precision_plugin is not None else HybridPrecision()

    @precision_plugin.setter
    @override
    def precision_plugin(self, plugin: Precision | None) -> None:
        # Lightning builds the plugin from Trainer(precision=...); swap in the mesh-aware equivalent so
        # inf checks, loss scaling and clipping agree on every rank of the mesh.
        if plugin is not None:
            plugin = to_mesh_aware(plugin)
        self._precision_plugin = plugin

    # -- launch and setup --------------------------------------------------------------------------
    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        world_size = self.num_nodes * self.num_processes
        dims = ParallelDims.resolve(self._tp, self._pp, self._dp_arg, world_size)
        self.dims = dataclasses.replace(dims, dp_shard=self._sharding.resolve_shard_size(dims.dp),
                                        sharded=self.zero_stage > 0)
        for name, shown in self._dp.settings().items():
            if shown and self.dims.dp < 2:
                raise ConfigurationError(
                    f"{name}={shown} needs data parallelism, but dp={self.dims.dp} (tp={self.dims.tp}, "
                    f"pp={self.dims.pp}, world_size={world_size}); use more processes or drop it."
                )
            if shown and self.zero_stage >= 2 and self.dims.dp_replicate < 2:
                raise ConfigurationError(
                    f"{name}={shown} with zero_stage={self.zero_stage} acts on the replicate axis, but dp={self.dims.dp} "
                    f"is 1 replica x {self.dims.dp_shard} shards; set data_parallel_shard_size to a proper divisor of "
                    f"{self.dims.dp} (e.g. {self.dims.dp // 2 if self.dims.dp % 2 == 0 else 1}) or drop {name}."
                )
        if not self._is_parallelized():
            self._parallelizer.validate(self.lightning_module)  # every check that needs no collective
            self._parallelizer.check_sharding(self.lightning_module, self._sharding)
            self._meta_networks()  # networks built under init_module(empty_init=True): refused early
        self._process_group_backend = self._process_group_backend or _get_default_process_group_backend_for_device(
            self.root_device
        )
        self._dp.check_backend(self._process_group_backend)
        reset_seed()
        self.set_world_ranks()
        self._check_checkpoint_dirs()  # async_checkpoint: refuse an unwritable checkpoint directory here
        connect(self.cluster_environment, self._process_group_backend, self._timeout, self.root_device)
        start_hang_monitor(self, self.hang_timeout)
        self._setup_async_checkpoint()  # collective: the dedicated checkpoint group
        self._device_mesh = build_mesh(self.dims, self.root_device.type)
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh
        # Creating the flattened pp x tp group is collective: done here, where every rank is in step.
        self._context = ParallelContext(
            device=self.root_device, data_parallel_size=self.dims.dp, data_parallel_group=self.data_parallel_group,
            model_parallel_group=self.model_parallel_group, tensor_parallel_group=self.tensor_parallel_group,
            compressor=self.compressor, replica_sync_every=self.replica_sync_every, tied_copies=self._tied_copies,
            replicas_meet=self._dp.replicas_meet,
        )
        self.precision_plugin.attach(self._context)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    def _is_parallelized(self) -> bool:
        """Whether this module was already split and sharded by this strategy (fit, then test)."""
        return self._parallelized is not None and self._parallelized() is self.lightning_module

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.dims is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        if self._is_parallelized():
            self.model = module
            self._finish_setup(trainer)
            return
        # Full shapes and tied names before the split (configure_model may have built more networks on meta).
        self._meta_origins = {path: MetaOrigins.capture(net) for path, net in self._meta_networks().items()}
        self._pipeline, self._blocks = self._parallelizer.parallelize(module, self.device_mesh, self.root_device)
        if self._layer_sync is not None:
            # Trainer(sync_batchnorm=True): statistics over the dp axis only (tp/pp peers see the same batch).
            self._layer_sync = mesh_layer_sync(self._layer_sync, self.data_parallel_group)
            module = self._layer_sync.apply(module)
        self.model = self.precision_plugin.convert_module(module)
        # Activation checkpointing and FSDP2 come after the dtype conversion (FSDP2 shards the parameters as they
        # will train, and moves them to the mesh's device); meta-built networks get their shards only then.
        self._parallelizer.shard(module, self._blocks, self.device_mesh, self._sharding, self._pipeline,
                                 fsdp_replicates=not self._replicate_axis_ours)
        self._materialize()
        self.model_to_device()
        self._setup_dp_axis(module)
        self._parallelized = weakref.ref(module)
        self._finish_setup(trainer)

    def _local_parameters(self) -> list[Tensor]:
        """This rank's trainable parameters as plain tensors (the local shards of DTensors)."""
        return [local_tensor(p) for p in self.lightning_module.parameters() if p.requires_grad]

    def _finish_setup(self, trainer: pl.Trainer) -> None:
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)
            self._partition_optimizer_state()

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        self._reset_optimizers_and_schedulers()
        super().setup_optimizers(trainer)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # -- the step ----------------------------------------------------------------------------------
    def run_forward_loss(self, module: Any, batch: Any) -> tuple[Tensor, Any]:
        """One forward (and, under a pipeline, backward) on ``batch``; returns ``(loss, outputs)``.

        Called by :meth:`ParallelModule.forward_loss`. Without pipeline parallelism this is the plain
        forward. With it, the schedule runs forward and backward over the microbatches; the loss (and in
        evaluation the logits) come from the last stage and are broadcast to every pipeline rank.
        """
        if self._pipeline is None:
            args, kwargs = module.model_inputs(batch)
            outputs = module.model(*args, **kwargs)
            return module.compute_loss(outputs, batch), outputs
        runtime = self._pipeline
        args, kwargs = module.model_inputs(batch)
        stage_inputs = get_family(name=runtime.plan.family).stage_inputs
        inputs = positional_inputs(stage_inputs, args, kwargs) if runtime.has_first else ()
        target = module.loss_target(batch)
        if module.training and torch.is_grad_enabled():
            params = [p for p in module.parameters() if p.requires_grad]
            # Lightning's precision backward (which applies the fp16 loss scale) does not run the schedule's
            # backward, so the scale and Lightning's 1/accumulation go into the schedule's loss.
            loss = runtime.train_step(inputs, target, module.loss_fn, params, module.trainer.accumulate_grad_batches,
                                      scale_loss=self.precision_plugin.scale_loss)
            return loss, None
        return runtime.eval_step(inputs, target, module.loss_fn)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        """Lightning's backward, in every layout: hooks fire, then full gradients are on ``.grad``.

        Under a pipeline the schedule already ran every microbatch's backward inside ``training_step``
        (Lightning zeroes gradients between ``training_step`` and ``backward``, so they were set aside until
        now). On the last backward before an optimizer step, tied-weight sums and the data-parallel average
        finish here, so ``on_after_backward`` sees the gradients a single process would have.
        """
        module = self.lightning_module
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        if self._pipeline is not None:
            self._pipeline.restore_gradients()
        else:
            self.precision_plugin.backward(closure_loss, module, optimizer, *args, **kwargs)
        if not self._accumulating:
            self.sync_gradients()
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        def closure_then_sync() -> Any:
            self._synced = False
            result = closure()
            if not self._synced:  # no backward ran (training_step returned None)
                self.sync_gradients()
            return result

        output = super().optimizer_step(optimizer, closure_then_sync, model, **kwargs)
        if self._dp.state is None:
            check_replicas_now(self, self.replica_check_every_n_steps, self.replica_group)
        elif self._dp.after_optimizer_step(self._local_parameters()):
            check_replicas_after_round(self, self.replica_check_every_n_steps, self._dp.state, self.replica_group)
        return output

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Gradient accumulation: no overlapped all-reduce until the step's last backward."""
        self._accumulating = True
        self._dp.set_accumulating(True)
        try:
            yield
        finally:
            self._accumulating = False
            self._dp.set_accumulating(False)

    def sync_gradients(self) -> None:
        """Sum tied parameters' gradients across the stages that share them, then average over dp."""
        self._synced = True
        if self._pipeline is not None:
            self._pipeline.sync_tied_gradients(self.lightning_module.model)
        self._dp.sync_gradients()
        if self._tp > 1:  # after the dp sync: an overlapped bucket writes into the gradients it started from
            place_gradients_like_parameters(self.lightning_module.parameters())

    # -- collectives -------------------------------------------------------------------------------
    @override
    def barrier(self, name: str | None = None) -> None:
        if not _distributed_is_initialized():
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    @override
    def reduce(self, tensor: Tensor | Any, group: Any | None = None,
               reduce_op: ReduceOp | str | None = "mean") -> Tensor | Any:
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    @override
    def on_exception(self, exception: BaseException) -> None:
        exit_watchdog(self.world_size)
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        assert self.cluster_environment is not None and self.accelerator is not None
        self._finish_async_checkpoint()  # the pending background write published, older checkpoints deleted
        stop_hang_monitor(self)
        self._dp.close_exchange()
        module = self.lightning_module
        if module is not None and self._layer_sync is not None and module.trainer.state.fn == TrainerFn.FITTING:
            self._layer_sync.revert(module)  # as DDPStrategy: plain batch norm again after fit
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name, kwargs in _PRESETS.items():
            strategy_registry.register(name, cls, description=f"HybridParallelStrategy {kwargs or 'defaults'}",
                                       **kwargs)
