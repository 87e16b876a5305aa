"""Which networks of a LightningModule the hybrid strategy splits, how (:class:`ModelParallelizer`), and the
pipeline contract it checks. No Lightning import: it works on the module tree and the mesh."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.families import family_names, get_family
from lit_parallel.parallel.fsdp import ShardingOptions
from lit_parallel.parallel.pipeline_runtime import PipelineRuntime
from lit_parallel.parallel.pipeline_schedules import PipelineOptions

__all__ = ["PIPELINE_HOOKS", "ModelParallelizer", "check_pipeline_module", "find_networks", "guard_direct_calls",
           "has_dtensors"]

PIPELINE_HOOKS = ("model_inputs", "loss_target", "loss_fn")
"""What a LightningModule defines for pipeline parallelism (``lit_parallel.models.ParallelModule`` has them)."""

_CONTRACT = (
    "Under pipeline parallelism the strategy runs the network itself, microbatch by microbatch, so the "
    "LightningModule must (1) keep the network in `self.model`, (2) define `model_inputs(batch) -> (args, "
    "kwargs)`, `loss_target(batch) -> Tensor` and `loss_fn(outputs, target) -> Tensor` (mean loss), and (3) "
    "compute its loss in training/validation steps with `loss, outputs = self.trainer.strategy."
    "run_forward_loss(self, batch)`; subclassing lit_parallel.models.ParallelModule gives all three "
    "(its `forward_loss(batch)` calls it)."
)


def _covered(module: nn.Module) -> bool:
    try:
        get_family(module)
    except ConfigurationError:
        return False
    return True


def find_networks(module: nn.Module, pipeline: bool = False) -> dict[str, nn.Module]:
    """The networks to parallelize, by attribute path: ``{"model": module.model}`` when the module keeps
    one there (the :class:`~lit_parallel.models.ParallelModule` convention, and required under a pipeline);
    otherwise every outermost submodule a registered model family covers (``nn.Sequential``, supported
    Hugging Face models), e.g. ``{"net": ..., "head": ...}``; ``{}`` when there is none.
    """
    net = getattr(module, "model", None)
    if isinstance(net, nn.Module) or pipeline:
        return {"model": net} if isinstance(net, nn.Module) else {}
    found: dict[str, nn.Module] = {}
    for path, child in module.named_modules():
        if not path or any(path.startswith(p + ".") for p in found):
            continue
        if _covered(child):
            found[path] = child
    return found


def check_pipeline_module(module: Any, strategy: str) -> None:
    """Refuse, naming what to add, a LightningModule that cannot be pipelined.

    Raises:
        ConfigurationError: no ``self.model`` network, or a missing hook.
    """
    net = getattr(module, "model", None)
    if not isinstance(net, nn.Module):
        raise ConfigurationError(
            f"{strategy} with pipeline_parallel_size > 1 needs {type(module).__name__}.model to be the network "
            f"(got {type(net).__name__}). {_CONTRACT}"
        )
    missing = [hook for hook in PIPELINE_HOOKS if not callable(getattr(module, hook, None))]
    if missing:
        raise ConfigurationError(f"{type(module).__name__} lacks {missing} for pipeline parallelism. {_CONTRACT}")


def _refuse_direct_call(net: nn.Module, *_: Any) -> None:
    raise ConfigurationError(
        f"{type(net).__name__} was called directly, but under pipeline parallelism this rank holds only its "
        f"stages of it. {_CONTRACT}"
    )


def guard_direct_calls(net: nn.Module) -> None:
    """Make a direct call of a pipelined network fail loudly (the stages call its submodules, never it)."""
    net.register_forward_pre_hook(_refuse_direct_call)


def has_dtensors(net: nn.Module) -> bool:
    """Whether any parameter is a DTensor (a tensor-parallel plan was applied, e.g. in ``configure_model``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in net.parameters())


def _set_submodule(module: nn.Module, path: str, net: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, name, net)


@dataclass(frozen=True)
class ModelParallelizer:
    """Splits the networks of a LightningModule over the ``("pp", "dp", "tp")`` mesh: pipeline split first,
    then the tensor-parallel plan per stage (torchtitan's order). Checks everything it can before any
    process group (:meth:`validate`); :meth:`parallelize` runs once the mesh exists.

    Args:
        tp: tensor-parallel size.
        pipeline: the validated pipeline settings (``size`` is the pipeline-parallel size).
        model_family: ``"auto"`` or a registered family name.
        auto_tensor_parallel: apply the family's plan to networks without DTensor parameters.
        split_points: user stage boundaries, or ``None``.
        owner: the strategy's name, for messages.
    """

    tp: int
    pipeline: PipelineOptions
    model_family: str = "auto"
    auto_tensor_parallel: bool = True
    split_points: list[str] | None = None
    owner: str = "HybridParallelStrategy"

    def networks(self, module: nn.Module) -> dict[str, nn.Module]:
        return find_networks(module, pipeline=self.pipeline.size > 1)

    def _family(self, net: nn.Module) -> str | None:
        if self.split_points is not None and self.model_family == "auto":
            return None  # split_points choose the stages; the family is still detected for its stage forward
        return get_family(net, self.model_family).name

    def validate(self, module: nn.Module) -> None:
        """Every check that needs no collective: pipeline contract, family, TP divisibility, pipeline split."""
        from lit_parallel.parallel.pipeline import validate_pipeline
        from lit_parallel.parallel.tensor_parallel import validate_tensor_parallel

        pp = self.pipeline.size
        if self.tp == 1 and pp == 1:
            return
        if pp > 1:
            check_pipeline_module(module, self.owner)
        for net in self.networks(module).values():
            if self.tp > 1 and self.auto_tensor_parallel and not has_dtensors(net):
                validate_tensor_parallel(net, self.tp, get_family(net, self.model_family).name)
            if pp > 1:
                validate_pipeline(net, pp, self.pipeline.stages_per_rank, self.pipeline.schedule,
                                  self.pipeline.microbatches, None, self._family(net), self.split_points)

    def blocks(self, net: nn.Module) -> list[str]:
        """FQNs of ``net``'s repeated blocks (the family's pipeline units: FSDP units, checkpointed regions);
        ``[]`` for a network no family with a pipeline layout covers."""
        try:
            family = get_family(net, self.model_family)
        except ConfigurationError:
            return []
        if family.pipeline_layout is None:
            return []
        try:
            layout = family.pipeline_layout(net, None)
        except (AttributeError, ConfigurationError):
            return []
        return [fqn for unit in layout.units for fqn in unit]

    def check_sharding(self, module: nn.Module, sharding: ShardingOptions) -> None:
        """Refuse activation checkpointing of a module none of whose networks has known blocks.

        Raises:
            ConfigurationError: naming the networks found and what to do instead.
        """
        if sharding.activation_checkpointing == "none":
            return
        nets = self.networks(module)
        if not any(self.blocks(net) for net in nets.values()):
            raise ConfigurationError(
                f"activation_checkpointing={sharding.activation_checkpointing!r} checkpoints the blocks of a network "
                f"a model family covers (registered: {family_names()}), but {type(module).__name__} holds "
                f"{sorted(nets) or 'none'}; apply torch.distributed._composable.checkpoint to your blocks in "
                "configure_model, or use activation_checkpointing='none'."
            )

    def parallelize(self, module: nn.Module, mesh: DeviceMesh,
                    device: torch.device) -> tuple[PipelineRuntime | None, dict[str, list[str]]]:
        """Split and shard ``module``'s networks in place.

        Returns:
            This rank's pipeline runtime (or ``None``) and, per network path, its blocks (:meth:`blocks`,
            found before the split, as FQNs of the unsplit network).

        Raises:
            ConfigurationError: tensor parallelism requested but nothing to shard.
        """
        from lit_parallel.parallel.tensor_parallel import apply_tensor_parallel

        runtime = None
        networks = self.networks(module)
        blocks = {path: self.blocks(net) for path, net in networks.items()}
        for path, net in networks.items():
            user_parallelized = has_dtensors(net)  # a plan applied in configure_model
            if self.pipeline.size > 1:
                net, runtime = self._split(net, mesh, device)
            if self.tp > 1 and self.auto_tensor_parallel and not user_parallelized:
                apply_tensor_parallel(net, mesh["tp"], get_family(net, self.model_family).name)
            _set_submodule(module, path, net)
        if self.tp > 1 and not has_dtensors(module):
            raise ConfigurationError(
                f"tensor_parallel_size={self.tp} but {type(module).__name__} holds no network a model family covers "
                f"(registered: {family_names()}) and configure_model applied no plan; shard it yourself in "
                "configure_model with self.device_mesh['tp'] (docs/hybrid.md, 'Your own LightningModule'), keep it "
                "in self.model with model_family=..., or use tensor_parallel_size=1."
            )
        return runtime, blocks

    @staticmethod
    def shard(module: nn.Module, blocks: dict[str, list[str]], mesh: DeviceMesh, sharding: ShardingOptions,
              runtime: PipelineRuntime | None, fsdp_replicates: bool = True) -> None:
        """Activation checkpointing, then FSDP2 (``zero_stage >= 2``) per network, after the split and TP.

        The FSDP mesh is ``mesh["dp_shard"]``, or ``mesh["dp_replicate", "dp_shard"]`` (HSDP) when shards are
        replicated and ``fsdp_replicates`` (else the caller averages over ``dp_replicate`` itself); under a
        pipeline each of this rank's stage modules is an FSDP root.
        """
        from lit_parallel.parallel.fsdp import apply_activation_checkpointing, apply_fsdp

        for path, net_blocks in blocks.items():
            net = module.get_submodule(path)
            apply_activation_checkpointing(net, net_blocks, sharding.activation_checkpointing)
            if sharding.zero_stage < 2:
                continue
            hsdp = fsdp_replicates and mesh["dp_replicate"].size() > 1
            dp_mesh = mesh["dp_replicate", "dp_shard"] if hsdp else mesh["dp_shard"]
            apply_fsdp(net, net_blocks, dp_mesh, sharding.zero_stage, pipelined=runtime is not None,
                       roots=runtime.stage_modules if runtime is not None else None)

    def _split(self, net: nn.Module, mesh: DeviceMesh, device: torch.device) -> tuple[nn.Module, PipelineRuntime]:
        from lit_parallel.parallel.pipeline import build_local_model, plan_pipeline, stage_ids_for_rank

        options = self.pipeline
        plan = plan_pipeline(net, options.size * options.stages_per_rank, family=self._family(net),
                             split_points=self.split_points)
        stage_ids = stage_ids_for_rank(mesh["pp"].get_local_rank(), options.size, options.schedule,
                                       options.stages_per_rank)
        local_model, stage_modules = build_local_model(net, plan, stage_ids)
        guard_direct_calls(local_model)
        runtime = PipelineRuntime(plan, stage_ids, stage_modules, mesh.get_group("pp"), device, options.schedule,
                                  options.microbatches)
        return local_model, runtime
