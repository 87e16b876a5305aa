"""Synchronized batch norm on every backend (gloo included), exact against one process on the global batch.

torch's :class:`~torch.nn.SyncBatchNorm` runs only on GPU-like devices. :class:`SyncBatchNorm` here is
plain torch ops and autograd-aware all-reduces, so it runs wherever ``torch.distributed`` does; it is
what ``Trainer(sync_batchnorm=True)`` applies under the strategies of :mod:`lit_parallel`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` whose backward all-reduces the gradient too.

    Every rank's loss depends on the reduced value, so the gradient of the sum of all ranks' losses
    with respect to a rank's input is the sum of the output gradients of all ranks.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


class SyncBatchNorm(_BatchNorm):
    """Batch norm whose training-mode statistics are those of the whole process group's batch.

    In training mode, with ``torch.distributed`` initialized and more than one rank in ``process_group``,
    the per-channel count, mean (an all-reduce of the sums and counts) and biased variance (a second
    all-reduce of the squared deviations from that mean: two passes, as accurate as one process) are
    computed over the concatenation of every rank's batch; local batch sizes may differ. The input is
    normalized with the biased variance and ``running_mean`` / ``running_var`` are updated with the
    unbiased one, exactly as :class:`~torch.nn.BatchNorm2d` on the global batch (``momentum=None``:
    cumulative average; ``num_batches_tracked`` counts). Statistics are computed in float32 and the
    output has the input's dtype (fp16 / bf16 inputs, autocast).

    The backward all-reduces the statistics' gradients, so each rank's input gradient is that of the sum
    of all ranks' losses; averaging parameter gradients over the group (DDP) then gives the gradients of
    one process on the global batch. Eval mode, a single process and a group of one are plain batch norm.

    Every rank of the group must run the layer's forward (and backward) the same number of times.

    Args:
        num_features: number of channels ``C`` of an ``(N, C, ...)`` input (2-D to 5-D and beyond).
        eps: added to the variance for numerical stability.
        momentum: running-statistics momentum; ``None`` for a cumulative moving average.
        affine: learnable per-channel ``weight`` (and ``bias``).
        track_running_stats: keep ``running_mean`` / ``running_var`` for eval mode.
        process_group: the ranks whose batches are pooled (``None``: the default group); under a
            device mesh, the data-parallel group.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
        bias: with ``affine``, learn a bias as well.

    Raises:
        ValueError: an input of fewer than 2 dimensions or 0 channels, or training on a global batch of
            a single value per channel.

    Example::

        import torch.distributed as dist
        from lit_parallel.parallel.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

        dist.init_process_group("gloo")  # e.g. under torchrun --nproc-per-node 2
        net = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)))
        assert isinstance(net[1], SyncBatchNorm)
        net(torch.randn(4, 3, 16, 16)).sum().backward()  # statistics of both ranks' 8 images
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        # ``bias`` is only passed when it matters: torch < 2.10 has no such argument.
        extra = {} if bias else {"bias": False}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **extra)
        self.process_group = process_group
        # The plain class revert_sync_batchnorm() builds: the converted layer's, or any-dimensional.
        self._revert_to: type[_BatchNorm] = _BatchNormNd

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _group_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` of shape ``(N, C, ...)`` with the group's batch statistics (training)."""
        self._check_input_dim(input)
        if not self.training or self._group_size() == 1:
            return super().forward(input)
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        channels = input.size(1)
        dims = [0, *range(2, input.dim())]
        shape = [1, channels] + [1] * (input.dim() - 2)
        x = input.float()

        # Pass 1: global count and mean (the count travels with the sums: one collective).
        local = torch.cat([x.sum(dims), x.new_full((1,), input.numel() // channels)])
        total = _AllReduceSum.apply(local, group)
        count = total[-1].detach()
        size = int(count.item())
        if size <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {size} over the group")
        mean = total[:-1] / count
        # Pass 2: biased variance from the squared deviations around the global mean.
        centered = x - mean.view(shape)
        var = _AllReduceSum.apply((centered * centered).sum(dims), group) / count

        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.float().view(shape)
        if self.bias is not None:
            out = out + self.bias.float().view(shape)
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            with torch.no_grad():
                self.running_mean.mul_(1.0 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1.0 - factor).add_(var.detach() * (size / (size - 1)), alpha=factor)
        return out.to(input.dtype)


class _BatchNormNd(_BatchNorm):
    """Plain batch norm of any input dimensionality (what a SyncBatchNorm not built by conversion reverts to)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _rebuild(module: _BatchNorm, cls: type[_BatchNorm], **kwargs: Any) -> _BatchNorm:
    """A ``cls`` layer sharing ``module``'s parameters and buffers (so optimizers and requires_grad carry over)."""
    like = module.weight if module.weight is not None else module.running_mean
    extra = {"bias": False} if module.affine and module.bias is None else {}
    new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
              device=None if like is None else like.device, dtype=None if like is None else like.dtype,
              **extra, **kwargs)
    if module.affine:
        new.weight = module.weight
        new.bias = module.bias
    new.running_mean = module.running_mean
    new.running_var = module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    new.training = module.training
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def convert_sync_batchnorm(module: nn.Module, process_group: ProcessGroup | None = None) -> nn.Module:
    """Replace every batch-norm layer of ``module`` by a :class:`SyncBatchNorm` over ``process_group``.

    Like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: ``BatchNorm1d/2d/3d``, torch's own
    ``SyncBatchNorm`` and :class:`SyncBatchNorm` layers are converted; the new layers share the old ones'
    parameters and buffers (weight, bias, running statistics, ``num_batches_tracked``, hence device,
    dtype and ``requires_grad``) and keep their training mode. Each remembers its original class for
    :func:`revert_sync_batchnorm`.

    Args:
        module: a model, or a batch-norm layer itself.
        process_group: the ranks whose batches are pooled (``None``: the default group).

    Returns:
        ``module`` with its batch-norm layers converted in place, or a new :class:`SyncBatchNorm` when
        ``module`` is a batch-norm layer.

    Example::

        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16))
        net = convert_sync_batchnorm(net, process_group=dp_group)
        assert isinstance(net[1], SyncBatchNorm) and net[1].process_group is dp_group
    """
    output = module
    if isinstance(module, _BatchNorm):
        output = _rebuild(module, SyncBatchNorm, process_group=process_group)
        if isinstance(module, SyncBatchNorm):
            output._revert_to = module._revert_to
        else:
            output._revert_to = next((cls for cls in _PLAIN if isinstance(module, cls)), _BatchNormNd)
    for name, child in module.named_children():
        output.add_module(name, convert_sync_batchnorm(child, process_group))
    return output


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm`: every :class:`SyncBatchNorm` becomes plain batch norm again.

    A converted layer goes back to its original ``BatchNorm1d/2d/3d`` (a converted torch
    ``SyncBatchNorm``, or a layer built directly, to a batch norm that accepts any input dimensionality),
    sharing the parameters and buffers.

    Args:
        module: a model, or a :class:`SyncBatchNorm` itself.

    Returns:
        ``module`` with its layers reverted in place, or a new layer when ``module`` is a :class:`SyncBatchNorm`.

    Example::

        net = revert_sync_batchnorm(convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(4))))
        assert type(net[0]) is torch.nn.BatchNorm2d
    """
    output = module
    if isinstance(module, SyncBatchNorm):
        output = _rebuild(module, module._revert_to)
    for name, child in module.named_children():
        output.add_module(name, revert_sync_batchnorm(child))
    return output
