"""HybridPrecision: fp32 training with gradient clipping over the whole (tp × pp) model."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.context import ParallelContext
from lit_parallel.precision.clipping import clip_grad_norm_, clip_grad_value_

__all__ = ["HybridPrecision"]


def _check_bf16_supported(device_type: str, precision: str) -> None:
    """Raise if ``precision`` uses bfloat16 on a CUDA device that lacks it.

    Raises:
        ConfigurationError: bf16 on a GPU without bfloat16 support (compute capability < 8.0).
    """
    if (precision.startswith("bf16") and device_type == "cuda" and torch.cuda.is_available()
            and not torch.cuda.is_bf16_supported()):
        name = torch.cuda.get_device_name()
        raise ConfigurationError(
            f"precision={precision!r} needs bfloat16, which {name} does not support (compute capability >= 8.0 "
            "is required); valid on this GPU: '16-mixed' or '32-true'."
        )


class HybridPrecision(Precision):
    """fp32 precision plugin for :class:`~lit_parallel.HybridParallelStrategy`; base of the other plugins.

    Lightning clips each rank's gradients on their own, which under tensor or pipeline parallelism
    computes the norm of a shard. This plugin clips by the global norm: the local ``|g|²`` sums are
    all-reduced over the model-parallel group (pp × tp of one replica), parameters replicated over the
    tensor-parallel ranks and copies of weights tied across pipeline stages counted once, so
    ``Trainer(gradient_clip_val=c)`` clips exactly as on one device. Clipping by value is element-wise and
    needs no communication.

    ``Trainer(precision="32-true", strategy=HybridParallelStrategy(...))`` selects it automatically.

    Example::

        trainer = Trainer(strategy=HybridParallelStrategy(tensor_parallel_size=2, pipeline_parallel_size=2),
                          plugins=[HybridPrecision()], gradient_clip_val=1.0, devices=4)
    """

    _context: ParallelContext | None = None

    def attach(self, context: ParallelContext) -> None:
        """Take the mesh's layout (called by the strategy once the mesh exists, on every rank).

        Raises:
            ConfigurationError: bf16 on a CUDA device without bfloat16 support.
        """
        _check_bf16_supported(context.device.type, str(self.precision))
        self._context = context

    def scale_loss(self, loss: Tensor) -> Tensor:
        """The loss a pipeline schedule backpropagates (loss scaling is fp16-only; identity here)."""
        return loss

    def _group_kwargs(self) -> dict[str, Any]:
        context = self._context
        if context is None or not dist.is_initialized():
            return {}
        return {"group": context.model_parallel_group, "replicated_group": context.tensor_parallel_group,
                "exclude": context.tied_copies()}

    @override
    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: int | float) -> None:
        clip_grad_norm_(list(self.main_params(optimizer)), clip_val, **self._group_kwargs())

    @override
    def clip_grad_by_value(self, optimizer: Optimizer, clip_val: int | float) -> None:
        clip_grad_value_(list(self.main_params(optimizer)), clip_val)
