"""HybridMixedPrecision: autocast fp16/bf16 with loss scaling and clipping agreed on the whole mesh."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.optim import LBFGS, Optimizer
from typing_extensions import override

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.context import ParallelContext
from lit_parallel.precision.grad_scaler import MeshGradScaler
from lit_parallel.precision.precision import HybridPrecision, _check_bf16_supported

__all__ = ["HybridMixedPrecision"]

_PRECISIONS = ("16-mixed", "bf16-mixed")
_DEVICES = ("auto", "cpu", "cuda")


class HybridMixedPrecision(HybridPrecision, MixedPrecision):
    """Automatic mixed precision on the ``(pp, dp, tp)`` mesh of :class:`~lit_parallel.HybridParallelStrategy`.

    Forward passes run under ``torch.autocast`` (fp16 or bf16); parameters, gradients and optimizer state
    stay fp32. With ``"16-mixed"`` a :class:`MeshGradScaler` scales the loss — also inside pipeline
    schedules, through :meth:`scale_loss` — and after the data-parallel gradient sync unscales the
    gradients and all-reduces the inf/NaN flag over every rank, so all ranks skip the same steps and keep
    the same scale. Clipping (``Trainer(gradient_clip_val=...)``) then uses the global gradient norm.

    Order inside one optimizer step: training_step and backward (scaled loss) → dp-axis gradient sync
    (a compressor sees scaled gradients) → unscale + mesh-wide overflow check → ``on_before_optimizer_step``
    hooks → clipping → optimizer step, skipped everywhere on overflow → scale update.

    ``Trainer(precision="16-mixed" | "bf16-mixed")`` with the hybrid strategy selects this plugin with the
    defaults below; pass it in ``plugins=[...]`` for other settings. Lightning turns ``"16-mixed"`` into
    ``"bf16-mixed"`` on CPU, so fp16 on CPU needs the explicit plugin.

    Args:
        precision: ``"16-mixed"`` (fp16 with loss scaling) or ``"bf16-mixed"`` (no scaling needed).
        device: autocast and scaler device: ``"cpu"``, ``"cuda"``, or ``"auto"`` (the strategy's device).
        init_scale: initial fp16 loss scale.
        growth_factor: scale multiplier after ``growth_interval`` overflow-free steps (> 1).
        backoff_factor: scale multiplier after an overflow (in (0, 1)).
        growth_interval: overflow-free steps before the scale grows (>= 1).

    Raises:
        ConfigurationError: an unknown precision or device, invalid scaler settings, bf16 on a GPU
            without bfloat16, or (at setup) a fused optimizer with fp16.

    Example::

        trainer = Trainer(accelerator="cpu", devices=4,
                          strategy=HybridParallelStrategy(tensor_parallel_size=2, pipeline_parallel_size=2),
                          plugins=[HybridMixedPrecision("16-mixed", device="cpu", init_scale=2.0**12)],
                          gradient_clip_val=1.0)
    """

    def __init__(
        self,
        precision: Literal["16-mixed", "bf16-mixed"] = "16-mixed",
        device: Literal["auto", "cpu", "cuda"] = "auto",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        if precision not in _PRECISIONS:
            raise ConfigurationError(
                f"HybridMixedPrecision(precision={precision!r}) is unknown; valid: {list(_PRECISIONS)} "
                "(use HybridHalfPrecision for 'bf16-true', HybridPrecision for '32-true')."
            )
        if device not in _DEVICES:
            raise ConfigurationError(f"HybridMixedPrecision(device={device!r}) is unknown; valid: {list(_DEVICES)}.")
        if not init_scale > 0:
            raise ConfigurationError(f"init_scale={init_scale} must be > 0.")
        if not growth_factor > 1:
            raise ConfigurationError(f"growth_factor={growth_factor} must be > 1.")
        if not 0 < backoff_factor < 1:
            raise ConfigurationError(f"backoff_factor={backoff_factor} must be in (0, 1).")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise ConfigurationError(f"growth_interval={growth_interval!r} must be an integer >= 1.")
        self._device_arg = device
        resolved = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        _check_bf16_supported(resolved, precision)
        self._scaler_settings = {"init_scale": float(init_scale), "growth_factor": float(growth_factor),
                                 "backoff_factor": float(backoff_factor), "growth_interval": growth_interval}
        super().__init__(precision, resolved, scaler=self._new_scaler(precision, resolved))

    def _new_scaler(self, precision: str, device: str) -> MeshGradScaler | None:
        return MeshGradScaler(device, **self._scaler_settings) if precision == "16-mixed" else None

    @override
    def attach(self, context: ParallelContext) -> None:
        device = context.device.type
        if self._device_arg == "auto" and device != self.device:
            self.device = device
            self.scaler = self._new_scaler(self.precision, device)
        super().attach(context)

    @override
    def connect(
        self, model: nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[nn.Module, list[Optimizer], list[Any]]:
        """Reject optimizers that cannot work with mesh-wide fp16 loss scaling (before the first step).

        Raises:
            ConfigurationError: with ``"16-mixed"``, a fused optimizer (it unscales and checks for
                overflow inside its own step, rank by rank, and cannot be clipped) or LBFGS.
        """
        if self.scaler is not None:
            for optimizer in optimizers:
                if _optimizer_handles_unscaling(optimizer):
                    raise ConfigurationError(
                        f"{type(optimizer).__name__}(fused=True) unscales gradients and checks for overflow "
                        "inside its own step, so the overflow check cannot be agreed on across the mesh and "
                        "gradients cannot be clipped; valid with precision='16-mixed': the same optimizer "
                        "with fused=False (foreach is fine), or precision='bf16-mixed'."
                    )
                if isinstance(optimizer, LBFGS):
                    raise ConfigurationError(
                        "LBFGS re-evaluates the closure inside its step and cannot be used with "
                        "precision='16-mixed'; valid: another optimizer, or precision='32-true'."
                    )
        return super().connect(model, optimizers, lr_schedulers)

    @override
    def scale_loss(self, loss: Tensor) -> Tensor:
        """Multiply a pipeline microbatch's loss by the current fp16 scale (identity for bf16)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    @property
    def loss_scale(self) -> float | None:
        """The current fp16 loss scale (``None`` for bf16)."""
        return self.scaler.get_scale() if self.scaler is not None else None
