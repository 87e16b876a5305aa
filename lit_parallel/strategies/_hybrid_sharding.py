"""The hybrid strategy's sharded data-parallel axis and meta-device init: Lightning glue over
:mod:`lit_parallel.parallel.fsdp` (ZeRO 1-3 with FSDP2, the replicate axis) and
:mod:`lit_parallel.parallel.materialize` (per-shard materialization); mixed into
:class:`~lit_parallel.HybridParallelStrategy`.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lit_parallel.compression import Hierarchical
from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.fsdp import OptimizerStatePartition, compress_replicate_axis, fsdp_managed
from lit_parallel.parallel.materialize import (
    WEIGHTS_ATTR,
    MetaOrigins,
    check_initializable,
    has_meta,
    materialize,
)
from lit_parallel.parallel.mesh import mesh_dim, new_dp_groups

__all__ = ["ShardedDataParallelMixin"]


class ShardedDataParallelMixin:
    """ZeRO stage, replicate-axis and meta-device hooks of :class:`~lit_parallel.HybridParallelStrategy` (uses its
    mesh, dp axis, parallelizer and pipeline runtime)."""

    # Provided by the strategy.
    _sharding: Any  # ShardingOptions
    _dp: Any  # DataParallelAxis
    _parallelizer: Any  # ModelParallelizer
    _pipeline: Any  # PipelineRuntime | None
    _meta_origins: dict[str, MetaOrigins]
    _accumulating: bool
    _tied_ids: set[int]  # parameters tied across pipeline stages (their dp exchange waits for the stage sum)
    _zero1: OptimizerStatePartition | None
    materialized_bytes: int

    def _check_sharding_combination(self) -> None:
        """Refuse, before any process group, what a sharded dp axis does not support."""
        stage = self._sharding.zero_stage
        compression = self._dp.compression
        if stage >= 2 and isinstance(compression, Hierarchical):
            node = compression.node_size if compression.node_size is not None else "<ranks per node>"
            outer = None if compression.config()["outer"] is None else compression.outer
            raise ConfigurationError(
                f"gradient_compression={compression!r} with zero_stage={stage} is not supported: FSDP2 already "
                f"reduce-scatters over dp_shard, and HSDP with data_parallel_shard_size={node} plus "
                f"gradient_compression={outer!r} already is this topology (exact inside a node, the shard exchanged "
                "between nodes). Use that, or zero_stage=0/1 with Hierarchical."
            )
        if stage == 1 and self._dp.sync is not None:
            raise ConfigurationError(
                f"zero_stage=1 with data_parallel_sync={self._dp.sync!r} is not supported: ZeRO-1 partitions the "
                "optimizer step of gradients averaged every step, which local SGD / DiLoCo do not average. Use "
                "zero_stage=2 or 3 (each replica shards its state over dp_shard, the rounds run over dp_replicate) "
                "or zero_stage=0."
            )

    @property
    def _replicate_axis_ours(self) -> bool:
        """With FSDP2 (zero 2/3): the replicate axis runs our compressed averaging or local SGD / DiLoCo rounds
        instead of FSDP2's own HSDP all-reduce."""
        return self.zero_stage >= 2 and (self._dp.sync is not None or self._dp.compression is not None)

    @property
    def zero_stage(self) -> int:
        """0 (replicated dp axis), 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters)."""
        return self._sharding.zero_stage

    @property
    def activation_checkpointing(self) -> str:
        return self._sharding.activation_checkpointing

    def _meta_networks(self) -> dict[str, Any]:
        """The networks built on the meta device, by path; refuses a meta tensor that has no weight source and no
        init rule, or that lies outside the networks (called before any process group, and again at setup for
        what ``configure_model`` built)."""
        module = self.lightning_module
        networks = self._parallelizer.networks(module)
        meta = {path: net for path, net in networks.items() if has_meta(net)}
        for path, net in meta.items():
            check_initializable(net, getattr(net, WEIGHTS_ATTR, None), path)
        from torchmetrics import Metric

        covered = {id(t) for net in networks.values() for t in (*net.parameters(), *net.buffers())}
        stray = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta and id(t) not in covered]
        stray += [n for n, m in module.named_modules() if isinstance(m, Metric)
                  and any(isinstance(getattr(m, k, None), Tensor) and getattr(m, k).is_meta for k in m._defaults)]
        if stray:
            raise ConfigurationError(
                f"{type(module).__name__} holds meta-device tensors outside the networks this strategy materializes "
                f"({sorted(networks)}): {stray[:3]}; create them in configure_model or outside empty_init."
            )
        return meta

    @contextmanager
    @override
    def model_sharded_context(self) -> Generator[None, None, None]:
        """``configure_model`` builds on the meta device too (only what it creates: networks made in
        ``__init__`` keep their weights); each rank materializes its shards at setup.

        Raises:
            ConfigurationError: ``from_pretrained`` in ``configure_model`` (transformers refuses to load weights
                onto the meta device); the message says what works instead.
        """
        try:
            with torch.device("meta"):
                yield
        except RuntimeError as err:
            if "from_pretrained" not in str(err):
                raise
            raise ConfigurationError(
                f"{type(self).__name__} runs configure_model on the meta device (each rank then loads only its "
                "shards), where transformers' from_pretrained cannot load weights. Build the model there with "
                "lit_parallel.models.loading.load_causal_lm / load_sequence_classifier (or from_config plus "
                "SafetensorsSource, docs/hybrid.md 'Meta-device init'), or call from_pretrained in __init__."
            ) from err

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """``trainer.init_module(empty_init=True)`` builds on the meta device: nothing is allocated until each
        rank materializes its own shards after the split (:mod:`lit_parallel.parallel.materialize`)."""
        if not empty_init:
            with super().tensor_init_context(empty_init):
                yield
            return
        with torch.device("meta"), self.precision_plugin.tensor_init_context():
            yield

    def _setup_dp_axis(self, module: Any) -> None:
        """What the dp axis does each step besides FSDP2.

        FSDP2 reduce-scatters the gradients of what it manages (under a pipeline its roots are the stage
        modules); the dp axis averages the rest. With FSDP2 and ``gradient_compression`` (no rounds) the replicate
        axis exchange is compressed from FSDP2's all-reduce hook, per FSDP unit, during backward; with
        ``data_parallel_sync`` the rounds run over ``dp_replicate`` on each rank's FSDP2 shards.
        """
        roots = [module, *(self._pipeline.stage_modules if self._pipeline is not None else [])]
        # Collective (new_group): the ranks of every dp group, in mesh order (the sharded mesh's dp is
        # dp_replicate x dp_shard flattened), on every rank.
        grid = self.device_mesh.mesh
        grid = grid.reshape(grid.shape[0], -1, grid.shape[-1])  # (pp, dp, tp)
        dp_groups = grid.permute(0, 2, 1).reshape(-1, grid.shape[1]).tolist()
        if isinstance(self.compressor, Hierarchical):
            self.compressor.setup_groups(dp_groups, default_node_size=self.num_processes or None)
        else:
            self.compressor.setup_groups(dp_groups)
        sharded = fsdp_managed(roots)
        rest = [(n, p) for n, p in module.named_parameters() if id(p) not in sharded and p.requires_grad]
        if self._replicate_axis_ours and self._dp.sync is not None:
            if rest:
                raise ConfigurationError(
                    f"data_parallel_sync={self._dp.sync!r} with zero_stage={self.zero_stage} needs every trainable "
                    f"parameter inside an FSDP2 unit, but {[n for n, _ in rest][:3]} are outside the networks the "
                    "strategy shards; move them into self.model or use zero_stage=0."
                )
            replicate = mesh_dim(self.device_mesh, "dp_replicate")
            self._dp.setup([], self._local_parameters(), replicate.get_group(), overlap=False,
                           new_group=lambda: new_dp_groups(self.device_mesh, self._process_group_backend,
                                                           "dp_replicate"))
            return
        if self._replicate_axis_ours:
            replicate_group = mesh_dim(self.device_mesh, "dp_replicate").get_group()
            compress_replicate_axis(roots, self.compressor, replicate_group)
        # Under a pipeline, gradients are final when a stage's last microbatch backward has run (the hooks on
        # parameters fire once per microbatch): the runtime reports that from inside the schedule.
        self._dp.setup(rest, self._local_parameters(), self.data_parallel_group, overlap=self.overlap_grad_sync,
                       new_group=lambda: new_dp_groups(self.device_mesh, self._process_group_backend),
                       ready_from_hooks=self._pipeline is None)
        if self._pipeline is not None:
            model = self.lightning_module.model
            tied = {name for names in self._pipeline.plan.tied_parameters for name in names}
            # Tied weights are summed over their stages first (sync_gradients), so they wait for it.
            self._tied_ids = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in tied}
            self._pipeline.after_stage_backward = self._stage_backward_done if self.overlap_grad_sync else None

    def _stage_backward_done(self, stage: Any) -> None:
        """Start the dp exchange of a pipeline stage's gradients while the schedule goes on.

        Not under gradient accumulation: the step's gradients are added to the earlier ones only after the
        schedule, and it is the sum that is averaged.
        """
        if self._accumulating or self.lightning_module.trainer.accumulate_grad_batches != 1:
            return
        self._dp.parameters_done(p for p in stage.parameters() if id(p) not in self._tied_ids)

    def _materialize(self) -> None:
        """Allocate and fill this rank's shards of meta-built networks (pretrained slices or seeded init)."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        for path, origins in self._meta_origins.items():
            net = self.lightning_module.get_submodule(path)
            self.materialized_bytes += materialize(net, origins, self.root_device, seed,
                                                   getattr(net, WEIGHTS_ATTR, None))
        self._meta_origins = {}

    def _partition_optimizer_state(self) -> None:
        """ZeRO stage 1: each dp_shard rank steps and keeps state for its share of the parameters."""
        if self._zero1 is not None:
            self._zero1.detach()
            self._zero1 = None
        if self.zero_stage != 1 or self.device_mesh["dp_shard"].size() == 1:
            return
        self._zero1 = OptimizerStatePartition([p for p in self.lightning_module.parameters() if p.requires_grad],
                                              self.device_mesh.get_group("dp_shard"))
        for optimizer in self.optimizers:
            self._zero1.attach(getattr(optimizer, "_optimizer", optimizer))
