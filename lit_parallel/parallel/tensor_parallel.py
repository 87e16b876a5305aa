"""Tensor-parallel plans for the supported model families, built on torch DTensor.

Pure torch (no Lightning). One function shards a network in place over a 1-D tensor-parallel mesh::

    from torch.distributed.device_mesh import init_device_mesh
    from lit_parallel.parallel.tensor_parallel import apply_tensor_parallel, validate_tensor_parallel

    validate_tensor_parallel(model, tp_size=2)          # config checks only, before any collective
    tp_mesh = init_device_mesh("cpu", (2,))
    apply_tensor_parallel(model, tp_mesh)               # family detected from the model

The plans follow Megatron / torchtitan ``apply_tp``: attention q/k/v and MLP up projections are split
column-wise (by heads / by intermediate features), the following output projections row-wise, so each
attention and MLP needs one all-reduce in forward and one in backward. Token embeddings are split by vocabulary rows
(row-wise), a language-model head by vocabulary columns with its logits all-gathered, so outputs are plain
full tensors on every rank and the usual loss works unchanged. Vocabulary sizes not divisible by the
tensor-parallel size are sharded unevenly (``torch.chunk`` sizes: 51 + 50 rows for 101 on 2 ranks): no
padding, so parameter shapes and state dicts are those of the unsplit model.

Llama attention whose head counts the tensor-parallel size does not divide (SmolLM2-135M: 9 heads, 3
key/value heads, tp=2) is split unevenly by whole key/value-head groups, see :class:`GQAHeadParallel`.

Every other parameter (norms, position embeddings, classifier heads, convolutions, GPT-2's fused qkv
weight, see :class:`PackedConv1DColwiseParallel`, and unevenly split Llama attention) becomes a replicated
DTensor, so all parameters are DTensors on the tensor-parallel mesh: ``p.full_tensor()`` returns the
unsplit value, parameter names (FQNs) are unchanged, and ``torch.optim.AdamW(foreach=True)`` accepts them.

Modules that are absent on a pipeline stage (layers replaced by a parameter-less ``nn.Module()``,
embeddings/head/final norm replaced by ``nn.Identity()`` or deleted) are skipped.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Placement,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)
from torch.utils._pytree import tree_map_only

from lit_parallel.errors import ConfigurationError

__all__ = [
    "SUPPORTED_FAMILIES",
    "Conv1DColwiseParallel",
    "Conv1DRowwiseParallel",
    "GQAHeadParallel",
    "PackedConv1DColwiseParallel",
    "ReplicateParallel",
    "apply_plan",
    "apply_tensor_parallel",
    "detect_family",
    "tensor_parallel_plan",
    "validate_tensor_parallel",
]

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("sequential", "bert", "llama", "gpt2")

# Hugging Face ``config.model_type`` -> family whose plan fits its module layout.
_MODEL_TYPES = {"bert": "bert", "llama": "llama", "gpt2": "gpt2"}

# Modules that act on each feature independently: a column-sharded activation may pass through them.
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Dropout,
)


# --------------------------------------------------------------------------------------------------------
# Parallel styles
# --------------------------------------------------------------------------------------------------------


def _to_replicated_dtensor(mesh: DeviceMesh, value: Any) -> Any:
    return tree_map_only(
        torch.Tensor,
        lambda t: t if isinstance(t, DTensor) else DTensor.from_local(t, mesh, [Replicate()], run_check=False),
        value,
    )


def _to_local(value: Any) -> Any:
    return tree_map_only(DTensor, lambda t: t.to_local(), value)


class _WaitCollective(torch.autograd.Function):
    """Finish a pending asynchronous collective and return its result as a plain tensor (no copy)."""

    @staticmethod
    def forward(ctx: Any, tensor: AsyncCollectiveTensor) -> torch.Tensor:
        return tensor.trigger_wait()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _wait_outputs(_module: nn.Module, _args: Any, output: Any) -> Any:
    # torch's styles all-gather / all-reduce with async_op=True; what leaves a parallelized module must be
    # an ordinary, finished tensor (pipeline send/recv, user code).
    return tree_map_only(AsyncCollectiveTensor, _WaitCollective.apply, output)


class ReplicateParallel(ParallelStyle):
    """Replicate a module's own parameters as DTensors; its inputs and outputs stay plain tensors.

    Only the parameters the module holds directly are converted (its children get their own style), so
    a model can mix sharded and replicated modules and still hand every parameter to one foreach
    optimizer. Like torchtitan's ``NoParallel``: inputs are wrapped as replicated DTensors in a forward
    pre-hook and outputs unwrapped in a forward hook; gradients of the parameters are computed locally
    (every tensor-parallel rank sees the same activations and output gradients).
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        own = {name: Replicate() for name, _ in module.named_parameters(recurse=False)}
        _distribute_own(module, device_mesh, own, self.src_data_rank)
        module.register_forward_pre_hook(_replicate_inputs, with_kwargs=True)
        module.register_forward_hook(_local_outputs)
        return module


def _replicate_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    mesh = next(module.parameters(recurse=False)).device_mesh
    return _to_replicated_dtensor(mesh, args), _to_replicated_dtensor(mesh, kwargs)


def _local_outputs(_module: nn.Module, _args: Any, output: Any) -> Any:
    return _to_local(output)


def _distribute_own(module: nn.Module, mesh: DeviceMesh, placements: dict[str, Placement],
                    src_data_rank: int | None) -> None:
    """Turn the named parameters the module holds directly into DTensors with the given placements."""
    for name, placement in placements.items():
        param = getattr(module, name, None)
        if isinstance(param, nn.Parameter) and not isinstance(param, DTensor):
            dist_param = distribute_tensor(param.detach(), mesh, [placement], src_data_rank=src_data_rank)
            module.register_parameter(name, nn.Parameter(dist_param, requires_grad=param.requires_grad))


def _check_conv1d(module: nn.Module, style: str) -> None:
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or nf != weight.shape[1]:
        raise ConfigurationError(
            f"{style} expects a Hugging Face Conv1D (weight [in, out], attribute nf == out); "
            f"got {type(module).__name__}."
        )


class Conv1DColwiseParallel(ParallelStyle):
    """Column-wise split of a Hugging Face ``Conv1D`` (``y = x @ W + b`` with ``W`` of shape [in, out]).

    ``W`` and ``b`` are sharded along the output features (``Shard(1)`` / ``Shard(0)``); the input is
    replicated, the output holds this rank's ``out / tp`` features.

    Args:
        use_local_output: return a plain local tensor (``True``) rather than a DTensor.
    """

    def __init__(self, *, use_local_output: bool = True) -> None:
        super().__init__()
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check_conv1d(module, type(self).__name__)
        _distribute_own(module, device_mesh, {"weight": Shard(1), "bias": Shard(0)}, self.src_data_rank)
        use_local = self.use_local_output
        return distribute_module(
            module, device_mesh,
            input_fn=lambda _mod, inputs, mesh: _to_replicated_dtensor(mesh, inputs),
            output_fn=lambda _mod, output, _mesh: output.to_local() if use_local else output,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(use_local_output={self.use_local_output})"


class _PackedColumns(torch.autograd.Function):
    """``x @ W[:, index] + b[index]`` on this rank's columns, with the gradients of a full-width layer.

    Backward all-reduces the input gradient (every rank's heads contribute to it) and the zero-padded
    weight/bias gradients, so the replicated parameters receive the full gradient on every rank.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                index: torch.Tensor, group: Any) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        w_local = weight.index_select(1, index)
        y = x2d @ w_local if bias is None else torch.addmm(bias.index_select(0, index), x2d, w_local)
        ctx.save_for_backward(x2d, w_local, index)
        ctx.group, ctx.x_shape, ctx.w_shape, ctx.has_bias = group, x.shape, weight.shape, bias is not None
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2d, w_local, index = ctx.saved_tensors
        g2d = grad.reshape(-1, grad.shape[-1])
        grad_x = g2d @ w_local.t()
        dist.all_reduce(grad_x, group=ctx.group)
        in_features, out_features = ctx.w_shape
        flat = torch.zeros(in_features + 1, out_features, dtype=g2d.dtype, device=g2d.device)
        flat[:in_features].index_copy_(1, index, x2d.t() @ g2d)
        flat[in_features].index_copy_(0, index, g2d.sum(0))
        dist.all_reduce(flat, group=ctx.group)  # weight and bias gradients in one collective
        grad_b = flat[in_features] if ctx.has_bias else None
        return grad_x.view(ctx.x_shape), flat[:in_features], grad_b, None, None


class _PackedColwiseConv1D(nn.Module):
    """Forward of a Conv1D parallelized by :class:`PackedConv1DColwiseParallel` (mixed into its class)."""

    tp_num_packed: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        mesh = weight.device_mesh
        tp, rank = mesh.size(), mesh.get_local_rank()
        block = weight.shape[1] // self.tp_num_packed
        width = block // tp
        index = torch.cat([torch.arange(i * block + rank * width, i * block + (rank + 1) * width, device=x.device)
                           for i in range(self.tp_num_packed)])
        return _PackedColumns.apply(x, weight.to_local(), None if bias is None else bias.to_local(), index,
                                    mesh.get_group())


_FORWARD_CLASSES: dict[tuple[type, type], type] = {}


def _swap_forward(module: nn.Module, mixin: type) -> None:
    """Give ``module`` the ``forward`` of ``mixin`` by swapping in a subclass (as FSDP2's ``fully_shard`` does).

    Names, parameters, hooks and ``isinstance(module, OriginalClass)`` stay, and the module still deep-copies.
    """
    cls = type(module)
    if (mixin, cls) not in _FORWARD_CLASSES:
        _FORWARD_CLASSES[mixin, cls] = type(f"TensorParallel{cls.__name__}", (mixin, cls), {})
    module.__class__ = _FORWARD_CLASSES[mixin, cls]


class PackedConv1DColwiseParallel(ParallelStyle):
    """Column-wise split, block by block, of a ``Conv1D`` whose outputs pack several projections.

    GPT-2's ``c_attn`` computes ``[q | k | v]`` in one [hidden, 3 * hidden] weight. Each of the
    ``num_packed`` blocks is split by heads, so rank ``r`` computes ``[q_r | k_r | v_r]`` and its attention
    sees whole heads of each. The weight and bias are stored as *replicated* DTensors: a shard made of
    three separate column ranges has no torch 2.13 placement that distributed checkpointing can save
    (``_StridedShard`` on one mesh dimension gives overlapping checkpoint chunks), and replicated storage
    keeps state dicts, optimizer states and checkpoints loadable into any layout. Compute and activations
    are still split ``tp`` ways; backward adds one all-reduce of the layer's weight gradient.

    Args:
        num_packed: number of equal blocks packed along the output features (3 for q, k, v).
    """

    def __init__(self, *, num_packed: int = 3) -> None:
        super().__init__()
        self.num_packed = num_packed

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check_conv1d(module, type(self).__name__)
        nf = module.weight.shape[1]
        if nf % (self.num_packed * device_mesh.size()):
            raise ConfigurationError(
                f"{type(self).__name__}: out features {nf} must split into num_packed={self.num_packed} blocks "
                f"of a multiple of tp={device_mesh.size()}."
            )
        _distribute_own(module, device_mesh, {"weight": Replicate(), "bias": Replicate()}, self.src_data_rank)
        _swap_forward(module, _PackedColwiseConv1D)
        module.tp_num_packed = self.num_packed
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_packed={self.num_packed})"


class Conv1DRowwiseParallel(ParallelStyle):
    """Row-wise split of a Hugging Face ``Conv1D``: input features sharded, output all-reduced.

    The input is the last-dim-sharded local output of a :class:`Conv1DColwiseParallel` (or any tensor
    holding this rank's ``in / tp`` features); the output is a plain replicated tensor.

    Args:
        use_local_output: return a plain local tensor (``True``) rather than a DTensor.
    """

    def __init__(self, *, use_local_output: bool = True) -> None:
        super().__init__()
        self.use_local_output = use_local_output

    @staticmethod
    def _prepare_input(_mod: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh) -> tuple[Any, ...]:
        return tuple(
            DTensor.from_local(t, mesh, [Shard(t.dim() - 1)], run_check=False)
            if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) else t
            for t in inputs
        )

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check_conv1d(module, type(self).__name__)
        _distribute_own(module, device_mesh, {"weight": Shard(0), "bias": Replicate()}, self.src_data_rank)
        use_local = self.use_local_output

        def output_fn(_mod: nn.Module, output: DTensor, _mesh: DeviceMesh) -> torch.Tensor | DTensor:
            output = output.redistribute(placements=[Replicate()])
            return output.to_local() if use_local else output

        return distribute_module(module, device_mesh, input_fn=self._prepare_input, output_fn=output_fn)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(use_local_output={self.use_local_output})"


def _kv_head_share(num_kv_heads: int, tp_size: int, rank: int) -> tuple[int, int]:
    """First key/value head and number of key/value heads of ``rank``: as even as possible, larger shares first."""
    base, extra = divmod(num_kv_heads, tp_size)
    return rank * base + min(rank, extra), base + (rank < extra)


def _grad_buffer(weight_shape: torch.Size, has_bias: bool, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zeroed weight and bias gradients as views of one flat buffer (both go out in one all-reduce)."""
    numel = weight_shape.numel()
    flat = torch.zeros(numel + (weight_shape[0] if has_bias else 0), dtype=dtype, device=device)
    return flat, flat[:numel].view(weight_shape), flat[numel:]


def _local_linear_backward(grad: torch.Tensor, x: torch.Tensor,
                           w_local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``x @ w_local.T`` on this rank: ``(grad as 2-D, input gradient, weight gradient)``.

    Computed in the dtype of the incoming gradient (as autocast's backward does); the input gradient is
    returned in ``x``'s dtype and shape.
    """
    g2d = grad.reshape(-1, grad.shape[-1])
    x2d = x.reshape(-1, x.shape[-1]).to(grad.dtype)
    grad_x = (g2d @ w_local.to(grad.dtype)).to(x.dtype).view(x.shape)
    return g2d, grad_x, g2d.t() @ x2d


class _LinearOutputSlice(torch.autograd.Function):
    """``x @ W[a:b].T + bias[a:b]``: output features ``a:b`` of a Linear, with the gradients of the full layer.

    Backward all-reduces the input gradient (every rank's features contribute to it) and the zero-padded
    weight/bias gradients, so the replicated parameters receive the full gradient on every rank.
    Gradients are computed in the dtype of the incoming gradient (as autocast's backward does).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                rows: tuple[int, int], group: Any) -> torch.Tensor:
        start, stop = rows
        w_local = weight[start:stop]
        ctx.save_for_backward(x, w_local)
        ctx.rows, ctx.group, ctx.w_shape, ctx.has_bias = rows, group, weight.shape, bias is not None
        ctx.param_dtype = weight.dtype
        return nn.functional.linear(x, w_local, None if bias is None else bias[start:stop])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        start, stop = ctx.rows
        g2d, grad_x, grad_w_local = _local_linear_backward(grad, *ctx.saved_tensors)
        dist.all_reduce(grad_x, group=ctx.group)
        flat, grad_w, grad_b = _grad_buffer(ctx.w_shape, ctx.has_bias, ctx.param_dtype, grad.device)
        grad_w[start:stop] = grad_w_local
        if ctx.has_bias:
            grad_b[start:stop] = g2d.sum(0)
        dist.all_reduce(flat, group=ctx.group)
        return grad_x, grad_w, grad_b if ctx.has_bias else None, None, None


class _LinearInputSlice(torch.autograd.Function):
    """``all_reduce(x_r @ W[:, a:b].T) + bias``: a Linear fed only its input features ``a:b`` on each rank.

    ``x_r`` holds this rank's input features; the partial outputs are summed over ``group``, so the output
    is the full layer's on every rank. Backward needs no all-reduce for the input gradient (the output
    gradient is the same on every rank) and all-reduces the zero-padded weight gradient; the bias
    gradient is complete on every rank.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                cols: tuple[int, int], group: Any) -> torch.Tensor:
        start, stop = cols
        w_local = weight[:, start:stop]
        ctx.save_for_backward(x, w_local)
        ctx.cols, ctx.group, ctx.w_shape, ctx.param_dtype = cols, group, weight.shape, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        y = nn.functional.linear(x, w_local)
        dist.all_reduce(y, group=group)
        return y if bias is None else y.add_(bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        start, stop = ctx.cols
        g2d, grad_x, grad_w_local = _local_linear_backward(grad, *ctx.saved_tensors)
        flat, grad_w, _ = _grad_buffer(ctx.w_shape, False, ctx.param_dtype, grad.device)
        grad_w[:, start:stop] = grad_w_local
        dist.all_reduce(flat, group=ctx.group)
        grad_b = None if ctx.bias_dtype is None else g2d.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


class _SliceLinear(nn.Module):
    """Forward of a Linear with replicated DTensor parameters that computes only its slice ``tp_slice``."""

    tp_slice: tuple[int, int]
    _function: Any  # the autograd Function doing the sliced product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        return self._function.apply(x, weight.to_local(), None if bias is None else bias.to_local(),
                                    self.tp_slice, weight.device_mesh.get_group())


class _OutputSliceLinear(_SliceLinear):
    """Computes only the output features ``tp_slice`` (see :class:`GQAHeadParallel`)."""

    _function = _LinearOutputSlice


class _InputSliceLinear(_SliceLinear):
    """Is fed only the input features ``tp_slice`` (see :class:`GQAHeadParallel`)."""

    _function = _LinearInputSlice


class GQAHeadParallel(ParallelStyle):
    """Split a grouped-query attention module by whole key/value-head groups, unevenly where needed.

    For Llama-style attention (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` Linears; ``head_dim`` and
    ``num_key_value_groups`` attributes) whose head counts the tensor-parallel size does not divide, e.g.
    SmolLM2-135M's 9 query / 3 key-value heads on 2 ranks. The key/value heads are dealt out as evenly as
    possible, larger shares first (3 over 2 ranks: 2 + 1), and each rank takes the query heads of its
    key/value heads (6 + 3), so ``num_key_value_groups`` is the same on every rank and attention runs
    unchanged on whole groups. Rank ``r`` computes its rows of q, k and v and multiplies its attention
    output by the matching input columns of ``o_proj``; the partial outputs are all-reduced.

    A 384 + 192 row split has no DTensor placement, so the four weights (and biases) are stored
    *replicated*, as in :class:`PackedConv1DColwiseParallel`: compute and activations are split, the
    parameters and their optimizer state are not. Backward all-reduces the q/k/v input gradient and each
    weight's zero-padded gradient, so every rank holds the full gradients and the replicas stay
    bit-identical through the optimizer step.

    The attention module's per-rank counts (``num_heads``, ``num_key_value_heads``, ``hidden_size``: read
    by transformers releases before 5, which reshape with them) are set to this rank's where present.

    Example::

        parallelize_module(model.model.layers[0].self_attn, tp_mesh, GQAHeadParallel())

    Raises:
        ConfigurationError: not a Llama-style attention, or fewer key/value heads than ranks.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        projections = [getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        head_dim, groups = getattr(module, "head_dim", None), getattr(module, "num_key_value_groups", None)
        if not (all(isinstance(p, nn.Linear) for p in projections)
                and isinstance(head_dim, int) and isinstance(groups, int)):
            raise ConfigurationError(
                f"{type(self).__name__} expects a Llama-style attention (q_proj, k_proj, v_proj, o_proj "
                f"Linears, int head_dim and num_key_value_groups); got {type(module).__name__}."
            )
        q, k, v, o = cast(list[nn.Linear], projections)
        kv_heads, tp = k.out_features // head_dim, device_mesh.size()
        if kv_heads < tp or q.out_features != kv_heads * groups * head_dim:
            raise ConfigurationError(
                f"{type(self).__name__}: {kv_heads} key/value heads (q_proj out {q.out_features}, head_dim "
                f"{head_dim}, num_key_value_groups {groups}) cannot be split over tp={tp} ranks; valid: "
                f"tp <= {kv_heads} and q_proj out = key/value heads * groups * head_dim."
            )
        first, count = _kv_head_share(kv_heads, tp, device_mesh.get_local_rank())
        q_rows = (first * groups * head_dim, (first + count) * groups * head_dim)
        kv_rows = (first * head_dim, (first + count) * head_dim)
        for proj, rows, forward in ((q, q_rows, _OutputSliceLinear), (k, kv_rows, _OutputSliceLinear),
                                    (v, kv_rows, _OutputSliceLinear), (o, q_rows, _InputSliceLinear)):
            _distribute_own(proj, device_mesh, {"weight": Replicate(), "bias": Replicate()}, self.src_data_rank)
            _swap_forward(proj, forward)
            proj.tp_slice = rows
        for attr, value in (("num_heads", count * groups), ("num_key_value_heads", count),
                            ("hidden_size", count * groups * head_dim)):
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, value)
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


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
# Families
# --------------------------------------------------------------------------------------------------------


def detect_family(model: nn.Module) -> str:
    """The tensor-parallel family of ``model``: one of :data:`SUPPORTED_FAMILIES`.

    ``nn.Sequential`` networks are ``"sequential"``; Hugging Face models map through
    ``config.model_type`` (``"bert"``, ``"llama"``, ``"gpt2"``), whatever their task head.

    Raises:
        ConfigurationError: the model belongs to no supported family.
    """
    if isinstance(model, nn.Sequential):
        return "sequential"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise ConfigurationError(
        f"no tensor-parallel plan for {type(model).__name__} (config.model_type={model_type!r}); supported "
        f"families: {list(SUPPORTED_FAMILIES)} (Hugging Face model types {sorted(_MODEL_TYPES)}). "
        "Pass family=... for a model laid out like one of them, or shard it with your own plan through "
        "lit_parallel.parallel.tensor_parallel.apply_plan(model, tp_mesh, plan)."
    )


def _resolve_family(model: nn.Module, family: str | None) -> str:
    if family is None:
        return detect_family(model)
    if family not in SUPPORTED_FAMILIES:
        raise ConfigurationError(f"tensor-parallel family={family!r} is unknown; valid: {list(SUPPORTED_FAMILIES)}.")
    return family


def _base(model: nn.Module) -> tuple[nn.Module, str]:
    """The Hugging Face base model (``model.bert`` / ``.model`` / ``.transformer``) and its FQN prefix."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, nn.Module):
        return base, f"{prefix}."
    return model, ""


def _present(layers: Any, child: str) -> Iterator[tuple[int, nn.Module]]:
    """Entries of a layer ``ModuleList`` that this rank holds (placeholders have no ``child``)."""
    if isinstance(layers, nn.ModuleList):
        for i, layer in enumerate(layers):
            if isinstance(getattr(layer, child, None), nn.Module):
                yield i, layer


def _is(module: nn.Module, attr: str, kind: type | tuple[type, ...]) -> bool:
    return isinstance(getattr(module, attr, None), kind)


def _config(model: nn.Module, family: str) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigurationError(f"tensor-parallel family {family!r} needs a Hugging Face model with a .config; "
                                 f"got {type(model).__name__}.")
    return config


def _require_divisible(what: dict[str, int], tp_size: int, family: str) -> None:
    bad = {name: value for name, value in what.items() if value % tp_size}
    if bad:
        listed = ", ".join(f"{name}={value}" for name, value in bad.items())
        raise ConfigurationError(
            f"tensor_parallel_size={tp_size} must divide {listed} ({family}); valid sizes divide "
            f"every one of {what}."
        )


# sequential ----------------------------------------------------------------------------------------------


def _linear_pairs(model: nn.Sequential) -> list[tuple[str, str]]:
    """Consecutive (Linear, Linear) entries joined only by element-wise modules, paired from the front."""
    children = list(model.named_children())
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(children):
        name, module = children[i]
        if isinstance(module, nn.Linear):
            j = i + 1
            while j < len(children) and isinstance(children[j][1], _ELEMENTWISE):
                j += 1
            if j < len(children) and isinstance(children[j][1], nn.Linear):
                pairs.append((name, children[j][0]))
                i = j + 1
                continue
        i += 1
    return pairs


def _sequential_plan(model: nn.Module, _tp_size: int | None) -> dict[str, ParallelStyle]:
    plan: dict[str, ParallelStyle] = {}
    for first, second in _linear_pairs(model):  # type: ignore[arg-type]
        plan[first] = ColwiseParallel()
        plan[second] = RowwiseParallel()
    return plan


def _sequential_validate(model: nn.Module, tp_size: int) -> None:
    if not isinstance(model, nn.Sequential):
        raise ConfigurationError(f"tensor-parallel family 'sequential' needs an nn.Sequential; got {type(model).__name__}.")
    widths = {f"{first}.out_features": model.get_submodule(first).out_features for first, _ in _linear_pairs(model)}
    _require_divisible(widths, tp_size, "sequential: hidden widths of the column-sharded Linear layers")


# bert ----------------------------------------------------------------------------------------------------


def _bert_plan(model: nn.Module, _tp_size: int | None) -> dict[str, ParallelStyle]:
    base, p = _base(model)
    plan: dict[str, ParallelStyle] = {}
    embeddings = getattr(base, "embeddings", None)
    if isinstance(embeddings, nn.Module) and _is(embeddings, "word_embeddings", nn.Embedding):
        plan[f"{p}embeddings.word_embeddings"] = RowwiseParallel(input_layouts=Replicate())
    for i, _ in _present(getattr(getattr(base, "encoder", None), "layer", None), "attention"):
        q = f"{p}encoder.layer.{i}"
        for name in ("query", "key", "value"):
            plan[f"{q}.attention.self.{name}"] = ColwiseParallel()
        plan[f"{q}.attention.output.dense"] = RowwiseParallel()
        plan[f"{q}.intermediate.dense"] = ColwiseParallel()
        plan[f"{q}.output.dense"] = RowwiseParallel()
    # Masked-LM head (BertForMaskedLM / BertForPreTraining), tied to the word embeddings.
    if isinstance(getattr(getattr(getattr(model, "cls", None), "predictions", None), "decoder", None), nn.Linear):
        plan["cls.predictions.decoder"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def _bert_localize(model: nn.Module, tp_size: int) -> None:
    base, _ = _base(model)
    for _, layer in _present(getattr(getattr(base, "encoder", None), "layer", None), "attention"):
        _divide(layer.attention.self, tp_size, ("num_attention_heads", "all_head_size"))


def _bert_validate(model: nn.Module, tp_size: int) -> None:
    c = _config(model, "bert")
    _require_divisible({"num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size},
                       tp_size, "bert")


# llama ---------------------------------------------------------------------------------------------------


def _llama_heads(config: Any) -> tuple[int, int]:
    heads = config.num_attention_heads
    return heads, config.num_key_value_heads or heads


def _llama_uneven(model: nn.Module, tp_size: int | None) -> bool:
    """Whether ``tp_size`` splits the attention heads unevenly (:class:`GQAHeadParallel`) rather than by DTensor shards."""
    config = getattr(model, "config", None)
    if tp_size is None or tp_size == 1 or config is None:
        return False
    return any(n % tp_size for n in _llama_heads(config))


def _llama_plan(model: nn.Module, tp_size: int | None) -> dict[str, ParallelStyle]:
    base, p = _base(model)
    uneven = _llama_uneven(model, tp_size)
    plan: dict[str, ParallelStyle] = {}
    if _is(base, "embed_tokens", nn.Embedding):
        plan[f"{p}embed_tokens"] = RowwiseParallel(input_layouts=Replicate())
    for i, _ in _present(getattr(base, "layers", None), "self_attn"):
        q = f"{p}layers.{i}"
        if uneven:
            plan[f"{q}.self_attn"] = GQAHeadParallel()
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                plan[f"{q}.self_attn.{name}"] = ColwiseParallel()
            plan[f"{q}.self_attn.o_proj"] = RowwiseParallel()
        plan[f"{q}.mlp.gate_proj"] = ColwiseParallel()
        plan[f"{q}.mlp.up_proj"] = ColwiseParallel()
        plan[f"{q}.mlp.down_proj"] = RowwiseParallel()
    if _is(model, "lm_head", nn.Linear):
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def _llama_localize(model: nn.Module, tp_size: int) -> None:
    # transformers 5 reshapes with -1 heads and keeps num_key_value_groups (heads / kv-heads) per rank;
    # older releases read these attributes, which then must hold the per-rank counts.
    if _llama_uneven(model, tp_size):
        return  # GQAHeadParallel set each rank's own counts
    base, _ = _base(model)
    for _, layer in _present(getattr(base, "layers", None), "self_attn"):
        _divide(layer.self_attn, tp_size, ("num_heads", "num_key_value_heads", "hidden_size"))


def _llama_validate(model: nn.Module, tp_size: int) -> None:
    c = _config(model, "llama")
    heads, kv_heads = _llama_heads(c)
    _require_divisible({"intermediate_size": c.intermediate_size}, tp_size, "llama: the MLP is sharded evenly")
    if (heads % tp_size or kv_heads % tp_size) and kv_heads < tp_size:
        # Uneven head splits (GQAHeadParallel) give every rank at least one whole key/value head.
        valid = [t for t in range(1, kv_heads + 1) if c.intermediate_size % t == 0]
        raise ConfigurationError(
            f"tensor_parallel_size={tp_size} cannot split num_attention_heads={heads}, "
            f"num_key_value_heads={kv_heads} (llama): it must divide both, or be at most num_key_value_heads "
            f"so that every rank gets whole key/value-head groups; valid sizes (also dividing "
            f"intermediate_size={c.intermediate_size}): {valid}."
        )


# gpt2 ----------------------------------------------------------------------------------------------------


def _gpt2_plan(model: nn.Module, _tp_size: int | None) -> dict[str, ParallelStyle]:
    base, p = _base(model)
    plan: dict[str, ParallelStyle] = {}
    if _is(base, "wte", nn.Embedding):
        plan[f"{p}wte"] = RowwiseParallel(input_layouts=Replicate())
    for i, _ in _present(getattr(base, "h", None), "attn"):
        q = f"{p}h.{i}"
        plan[f"{q}.attn.c_attn"] = PackedConv1DColwiseParallel(num_packed=3)  # fused [q | k | v]
        plan[f"{q}.attn.c_proj"] = Conv1DRowwiseParallel()
        plan[f"{q}.mlp.c_fc"] = Conv1DColwiseParallel()
        plan[f"{q}.mlp.c_proj"] = Conv1DRowwiseParallel()
    if _is(model, "lm_head", nn.Linear):
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def _gpt2_localize(model: nn.Module, tp_size: int) -> None:
    # GPT2Attention splits the fused projection with split_size and reshapes with -1 heads.
    base, _ = _base(model)
    for _, layer in _present(getattr(base, "h", None), "attn"):
        _divide(layer.attn, tp_size, ("num_heads", "split_size", "embed_dim"))


def _gpt2_validate(model: nn.Module, tp_size: int) -> None:
    c = _config(model, "gpt2")
    if getattr(c, "add_cross_attention", False):
        raise ConfigurationError("tensor parallelism for gpt2 with add_cross_attention=True is not supported; "
                                 "valid: add_cross_attention=False.")
    inner = c.n_inner if c.n_inner is not None else 4 * c.hidden_size
    _require_divisible({"n_head": c.num_attention_heads, "n_inner": inner}, tp_size, "gpt2")


def _divide(module: nn.Module, tp_size: int, attrs: tuple[str, ...]) -> None:
    for attr in attrs:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, getattr(module, attr) // tp_size)


# Plans may depend on the tensor-parallel size (Llama heads it does not divide); None: one that divides them.
_PLANS: dict[str, Callable[[nn.Module, int | None], dict[str, ParallelStyle]]] = {
    "sequential": _sequential_plan, "bert": _bert_plan, "llama": _llama_plan, "gpt2": _gpt2_plan,
}
_LOCALIZE: dict[str, Callable[[nn.Module, int], None]] = {
    "bert": _bert_localize, "llama": _llama_localize, "gpt2": _gpt2_localize,
}
_VALIDATE: dict[str, Callable[[nn.Module, int], None]] = {
    "sequential": _sequential_validate, "bert": _bert_validate, "llama": _llama_validate, "gpt2": _gpt2_validate,
}


# --------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------


def tensor_parallel_plan(model: nn.Module, family: str | None = None,
                         tp_size: int | None = None) -> dict[str, ParallelStyle]:
    """The plan :func:`apply_tensor_parallel` uses for ``model`` (only modules present on this stage).

    A starting point for custom plans: edit the dict and pass it to :func:`apply_plan`.

    Args:
        model: the network (possibly a pipeline stage of it).
        family: one of :data:`SUPPORTED_FAMILIES`; detected from the model when ``None``.
        tp_size: the tensor-parallel size the plan is for. It matters only for Llama models whose head
            counts it does not divide: their attention modules get :class:`GQAHeadParallel`. ``None``:
            a size that divides them (q/k/v colwise, o rowwise).

    Raises:
        ConfigurationError: unknown or undetectable family.
    """
    return _PLANS[_resolve_family(model, family)](model, tp_size)


def validate_tensor_parallel(model: nn.Module, tp_size: int, family: str | None = None) -> None:
    """Check that ``model`` can be split ``tp_size`` ways; configuration only, no collectives.

    Args:
        model: the network (possibly a pipeline stage of it).
        tp_size: tensor-parallel size.
        family: one of :data:`SUPPORTED_FAMILIES`; detected from the model when ``None``.

    Raises:
        ConfigurationError: bad ``tp_size``, unknown family, or a head count / hidden width not divisible
            by ``tp_size``; Llama head counts need not be divisible but then ``tp_size`` must not exceed
            ``num_key_value_heads`` (the message names the numbers and the valid sizes).
    """
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ConfigurationError(f"tensor_parallel_size={tp_size!r} must be an integer >= 1.")
    _VALIDATE[_resolve_family(model, family)](model, tp_size)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, family: str | None = None) -> nn.Module:
    """Shard ``model`` in place over ``tp_mesh`` with its family's plan.

    After the call every parameter is a DTensor on ``tp_mesh`` (sharded or replicated) with its original
    name and global shape, attention modules hold their per-rank head counts, and the model's outputs are
    plain tensors, identical on every rank. A mesh of size 1 leaves the model unchanged.

    Args:
        model: the network, possibly pruned by the pipeline split.
        tp_mesh: 1-D tensor-parallel device mesh (all ranks of it must call this with the same model).
        family: one of :data:`SUPPORTED_FAMILIES`; detected from the model when ``None``.

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
    family = _resolve_family(model, family)
    tp_size = tp_mesh.size()
    validate_tensor_parallel(model, tp_size, family)
    if tp_size == 1:
        return model
    apply_plan(model, tp_mesh, _PLANS[family](model, tp_size))
    if family in _LOCALIZE:
        _LOCALIZE[family](model, tp_size)
    return model
