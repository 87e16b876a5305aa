"""Tensor parallelism on DTensor: the plan engine. Family plans live in :mod:`lit_parallel.parallel.families`.

Pure torch (no Lightning). One function shards a network in place over a 1-D tensor-parallel mesh::

    from torch.distributed.device_mesh import init_device_mesh
    from lit_parallel.parallel.tensor_parallel import apply_tensor_parallel, validate_tensor_parallel

    validate_tensor_parallel(model, tp_size=2)          # config checks only, before any collective
    tp_mesh = init_device_mesh("cpu", (2,))
    apply_tensor_parallel(model, tp_mesh)               # family detected from the model

The family plans follow Megatron / torchtitan ``apply_tp``: attention q/k/v and MLP up projections are split
column-wise (by heads / by intermediate features), the following output projections row-wise, so each
attention and MLP needs one all-reduce in forward and one in backward. Token embeddings are split by
vocabulary rows (row-wise), a language-model head by vocabulary columns with its logits all-gathered, so
outputs are plain full tensors on every rank and the usual loss works unchanged. Vocabulary sizes not
divisible by the tensor-parallel size are sharded unevenly (``torch.chunk`` sizes: 51 + 50 rows for 101 on 2
ranks): no padding, so parameter shapes and state dicts are those of the unsplit model.

Every parameter no plan entry shards becomes a replicated DTensor (:func:`apply_plan`), so all parameters
are DTensors on the tensor-parallel mesh: ``p.full_tensor()`` returns the unsplit value, parameter names
(FQNs) are unchanged, and ``torch.optim.AdamW(foreach=True)`` accepts them. Modules absent on a pipeline
stage (placeholders) are skipped.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.tp_styles import (
    Conv1DColwiseParallel,
    Conv1DRowwiseParallel,
    GQAHeadParallel,
    PackedConv1DColwiseParallel,
    ReplicateParallel,
    _wait_outputs,
)

__all__ = [
    "Conv1DColwiseParallel",
    "Conv1DRowwiseParallel",
    "GQAHeadParallel",
    "PackedConv1DColwiseParallel",
    "ReplicateParallel",
    "apply_plan",
    "apply_tensor_parallel",
    "detect_family",
    "place_gradients_like_parameters",
    "supported_families",
    "tensor_parallel_plan",
    "validate_tensor_parallel",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# Applying a plan
# --------------------------------------------------------------------------------------------------------


def _matching_modules(model: nn.Module, pattern: str) -> Iterator[tuple[str, nn.Module]]:
    depth = pattern.count(".")
    for fqn, module in model.named_modules():
        if fqn and fqn.count(".") == depth and fnmatch.fnmatchcase(fqn, pattern):
            yield fqn, module


def _tied_groups(model: nn.Module) -> list[list[tuple[nn.Module, str, str]]]:
    """Groups of (module, attribute, fqn) that share one Parameter object (tied weights)."""
    groups: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for mod_fqn, module in model.named_modules(remove_duplicate=False):
        for name, param in module.named_parameters(recurse=False):
            fqn = f"{mod_fqn}.{name}" if mod_fqn else name
            entries = groups.setdefault(id(param), [])
            if all(e[0] is not module or e[1] != name for e in entries):
                entries.append((module, name, fqn))
    return [g for g in groups.values() if len(g) > 1]


def _retie(groups: list[list[tuple[nn.Module, str, str]]]) -> None:
    # Plan styles register new Parameters, which unties shared weights; point every owner at the sharded
    # one. Owners the plan did not touch (e.g. BERT's ``cls.predictions.bias`` beside the decoder's)
    # follow it too, so a tie is never silently broken.
    for group in groups:
        params = [getattr(module, name) for module, name, _ in group]
        sharded = [p for p in params if isinstance(p, DTensor)]
        if not sharded:
            continue
        if any(p.placements != sharded[0].placements for p in sharded):
            fqns = [fqn for _, _, fqn in group]
            raise ConfigurationError(
                f"tied parameters {fqns} got different tensor-parallel placements "
                f"{[p.placements for p in sharded]}; give every module sharing the weight a style with the "
                "same placement (token embedding RowwiseParallel and lm_head ColwiseParallel both shard "
                "the weight by vocabulary rows)."
            )
        for module, name, _ in group:
            if getattr(module, name) is not sharded[0]:
                module.register_parameter(name, sharded[0])


def _replicate_rest(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    # Tied parameters stay tied: a later owner reuses the DTensor made for the first. The map keeps the
    # old parameter alive so its id cannot be recycled by a new tensor while we walk the model.
    done: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    style = ReplicateParallel()
    for module in list(model.modules()):
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if not isinstance(p, DTensor)]
        if not own:
            continue
        for name, param in own:
            if id(param) in done:
                module.register_parameter(name, done[id(param)][1])
        style._apply(module, tp_mesh)
        for name, param in own:
            done.setdefault(id(param), (param, getattr(module, name)))


def apply_plan(model: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, ParallelStyle]) -> nn.Module:
    """Apply a tensor-parallel plan in place, then replicate every remaining parameter as a DTensor.

    Args:
        model: the network (possibly one pipeline stage of it).
        tp_mesh: 1-D tensor-parallel device mesh.
        plan: submodule FQN (``fnmatch`` patterns per dotted level, e.g. ``"layers.*.mlp.up_proj"``) to
            a :class:`~torch.distributed.tensor.parallel.ParallelStyle`. Entries that match no module
            holding parameters are skipped: a pipeline stage holds only part of the model.

    Returns:
        ``model``, with every parameter a DTensor on ``tp_mesh`` and tied weights still tied; every module
        the plan matched returns plain tensors (pending asynchronous collectives are finished in a
        forward hook), so its outputs can be sent between pipeline stages.

    Raises:
        ConfigurationError: tied parameters would get different layouts.

    Example::

        plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}   # nn.Sequential(Linear, ReLU, Linear)
        apply_plan(net, tp_mesh, plan)
    """
    tied = _tied_groups(model)
    for pattern, style in plan.items():
        matched = [(fqn, m) for fqn, m in _matching_modules(model, pattern) if any(True for _ in m.parameters())]
        if not matched:
            log.debug("tensor-parallel plan entry %r matches no module with parameters; skipped", pattern)
        for _, module in matched:
            parallelize_module(module, tp_mesh, style)
            # On the module itself, not the model root: pipeline stages call submodules directly.
            module.register_forward_hook(_wait_outputs)
    _retie(tied)
    _replicate_rest(model, tp_mesh)
    return model


# --------------------------------------------------------------------------------------------------------
# Public entry points: the family comes from the registry
# --------------------------------------------------------------------------------------------------------


def _family(model: nn.Module, family: str | None):  # -> ModelFamily (import deferred: families import styles)
    from lit_parallel.parallel.families import get_family

    return get_family(model, family)


def supported_families() -> list[str]:
    """Names of the registered model families (:func:`lit_parallel.parallel.families.register_family`)."""
    from lit_parallel.parallel.families import family_names

    return family_names()


def detect_family(model: nn.Module) -> str:
    """The name of the registered family covering ``model`` (``nn.Sequential``, or by ``config.model_type``).

    Raises:
        ConfigurationError: no registered family covers it (the message lists them).
    """
    return _family(model, None).name


def tensor_parallel_plan(model: nn.Module, family: str | None = None,
                         tp_size: int | None = None) -> dict[str, ParallelStyle]:
    """The plan :func:`apply_tensor_parallel` uses for ``model`` (only modules present on this stage).

    A starting point for custom plans: edit the dict and pass it to :func:`apply_plan`.

    Args:
        model: the network (possibly a pipeline stage of it).
        family: a registered family name; detected from the model when ``None``.
        tp_size: the tensor-parallel size the plan is for. It matters only for Llama-like models whose head
            counts it does not divide: their attention modules get :class:`GQAHeadParallel`. ``None``:
            a size that divides them.

    Raises:
        ConfigurationError: unknown or undetectable family.
    """
    return _family(model, family).tp_plan(model, tp_size)


def validate_tensor_parallel(model: nn.Module, tp_size: int, family: str | None = None) -> None:
    """Check that ``model`` can be split ``tp_size`` ways; configuration only, no collectives.

    Args:
        model: the network (possibly a pipeline stage of it).
        tp_size: tensor-parallel size.
        family: a registered family name; detected from the model when ``None``.

    Raises:
        ConfigurationError: bad ``tp_size``, unknown family, or a head count / hidden width not divisible
            by ``tp_size`` (the message names the numbers and the valid sizes).
    """
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ConfigurationError(f"tensor_parallel_size={tp_size!r} must be an integer >= 1.")
    _family(model, family).validate_tp(model, tp_size)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, family: str | None = None) -> nn.Module:
    """Shard ``model`` in place over ``tp_mesh`` with its family's plan.

    After the call every parameter is a DTensor on ``tp_mesh`` (sharded or replicated) with its original
    name and global shape, attention modules hold their per-rank head counts, and the model's outputs are
    plain tensors, identical on every rank. A mesh of size 1 leaves the model unchanged.

    Args:
        model: the network, possibly pruned by the pipeline split.
        tp_mesh: 1-D tensor-parallel device mesh (all ranks of it must call this with the same model).
        family: a registered family name; detected from the model when ``None``.

    Returns:
        ``model``.

    Raises:
        ConfigurationError: see :func:`validate_tensor_parallel` (checked before any collective).

    Example::

        tp_mesh = init_device_mesh("cpu", (2,))
        model = apply_tensor_parallel(GPT2LMHeadModel(GPT2Config(n_layer=2)), tp_mesh)
        logits = model(input_ids).logits          # full logits on both ranks
    """
    if tp_mesh.ndim != 1:
        raise ConfigurationError(f"tensor parallelism needs a 1-D mesh; got mesh.ndim={tp_mesh.ndim} "
                                 "(pass mesh['tp']).")
    spec = _family(model, family)
    tp_size = tp_mesh.size()
    validate_tensor_parallel(model, tp_size, spec.name)
    if tp_size == 1:
        return model
    apply_plan(model, tp_mesh, spec.tp_plan(model, tp_size))
    if spec.localize_tp is not None:
        spec.localize_tp(model, tp_size)
    return model


@torch.no_grad()
def place_gradients_like_parameters(params: Iterable[torch.Tensor]) -> None:
    """Give every DTensor gradient its parameter's placements.

    DTensor's backward of a vocabulary-sharded embedding (``Shard(0)`` weight) returns a ``Replicate()``
    gradient: the full table on every tp rank (measured: +47 MiB per rank for a 32k x 768 embedding). Going
    from ``Replicate`` to ``Shard`` is local (each rank keeps its slice). Called once the step's gradients are
    complete (post-accumulate-grad hooks do not fire for this parameter); FSDP2 does the same for the
    parameters it manages.
    """
    for param in params:
        grad = param.grad
        if isinstance(grad, DTensor) and tuple(grad.placements) != tuple(param.placements):  # type: ignore[attr-defined]
            param.grad = grad.redistribute(param.device_mesh, param.placements)  # type: ignore[attr-defined]
