"""Tensor-parallel styles the torch built-ins lack: HF ``Conv1D`` splits, packed q/k/v, uneven GQA heads.

Used by the family plans (:mod:`lit_parallel.parallel.families`) and re-exported by
:mod:`lit_parallel.parallel.tensor_parallel`. Every custom autograd function here computes its backward in
the dtype of the incoming gradient (as autocast's backward does) and returns each gradient in the dtype
of its input, so ``bf16-mixed``, ``16-mixed`` and ``bf16-true`` all work.
"""

from __future__ import annotations

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
from torch.distributed.tensor.parallel import ParallelStyle
from torch.utils._pytree import tree_map_only

from lit_parallel.errors import ConfigurationError

__all__ = [
    "Conv1DColwiseParallel",
    "Conv1DRowwiseParallel",
    "GQAHeadParallel",
    "HeadwiseReplicateParallel",
    "PackedConv1DColwiseParallel",
    "ReplicateParallel",
]


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


class HeadwiseReplicateParallel(ReplicateParallel):
    """Replicated parameters of a module applied to this rank's attention heads only (Qwen3's q/k norms).

    The module sees a disjoint part of the heads on every tensor-parallel rank, so each rank's weight
    gradient is a partial sum: a gradient hook all-reduces it over the tensor-parallel group, and the
    replicas receive the gradient of the full layer (even or uneven head splits alike).
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        super()._apply(module, device_mesh)
        # The hooks go on at each forward: ``module.to(...)`` may replace Parameter objects (and their hooks).
        module.register_forward_pre_hook(_hook_partial_grads)
        return module


def _hook_partial_grads(module: nn.Module, _args: Any) -> None:
    for param in module.parameters(recurse=False):
        if param.requires_grad and not getattr(param, "_tp_grad_summed", False):
            group = param.device_mesh.get_group()
            param.register_hook(lambda grad, group=group: _sum_over(grad, group))
            param._tp_grad_summed = True


def _sum_over(grad: torch.Tensor, group: Any) -> torch.Tensor:
    local = grad.to_local() if isinstance(grad, DTensor) else grad
    local = local.clone()
    dist.all_reduce(local, group=group)
    if isinstance(grad, DTensor):
        return DTensor.from_local(local, grad.device_mesh, grad.placements, run_check=False)
    return local


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
        if torch.is_autocast_enabled(x.device.type):
            # Custom Functions see autocast's inputs uncast: compute in its dtype, as nn.Linear would.
            dtype = torch.get_autocast_dtype(x.device.type)
            x2d, w_local = x2d.to(dtype), w_local.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        y = x2d @ w_local if bias is None else torch.addmm(bias.index_select(0, index), x2d, w_local)
        ctx.save_for_backward(x2d, w_local, index)
        ctx.group, ctx.x_shape, ctx.w_shape, ctx.has_bias = group, x.shape, weight.shape, bias is not None
        ctx.x_dtype, ctx.param_dtype = x.dtype, weight.dtype
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2d, w_local, index = ctx.saved_tensors
        g2d = grad.reshape(-1, grad.shape[-1])
        grad_x = (g2d @ w_local.t().to(g2d.dtype)).to(ctx.x_dtype)
        dist.all_reduce(grad_x, group=ctx.group)
        in_features, out_features = ctx.w_shape
        # Parameter gradients in the parameters' dtype (fp32 master weights under mixed precision).
        flat = torch.zeros(in_features + 1, out_features, dtype=ctx.param_dtype, device=g2d.device)
        flat[:in_features].index_copy_(1, index, (x2d.t().to(g2d.dtype) @ g2d).to(ctx.param_dtype))
        flat[in_features].index_copy_(0, index, g2d.sum(0).to(ctx.param_dtype))
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
