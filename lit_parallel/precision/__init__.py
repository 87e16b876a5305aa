"""Precision plugins that keep mixed precision correct on the (pp, dp, tp) mesh.

With tensor and pipeline parallelism each rank sees part of the gradients: loss-scale overflow checks
and gradient norms must be agreed on across ranks, or replicas silently diverge. See ``docs/precision.md``.

- :class:`HybridMixedPrecision` — ``16-mixed`` (mesh-wide loss scaling) and ``bf16-mixed``.
- :class:`HybridHalfPrecision` — ``bf16-true``, with fp32 master weights by default.
- :class:`HybridPrecision` — ``32-true``; the global-norm clipping all three share.
- :class:`MeshGradScaler` and :mod:`lit_parallel.precision.clipping` — the pure-torch pieces.
"""

from __future__ import annotations

from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision

from lit_parallel.errors import ConfigurationError
from lit_parallel.precision.clipping import clip_grad_norm_, clip_grad_value_, global_grad_norm
from lit_parallel.precision.grad_scaler import MeshGradScaler
from lit_parallel.precision.half import MASTER_WEIGHT_KEY, HybridHalfPrecision
from lit_parallel.precision.mixed import HybridMixedPrecision
from lit_parallel.precision.precision import HybridPrecision

__all__ = [
    "MASTER_WEIGHT_KEY",
    "SUPPORTED_PRECISIONS",
    "HybridHalfPrecision",
    "HybridMixedPrecision",
    "HybridPrecision",
    "MeshGradScaler",
    "clip_grad_norm_",
    "clip_grad_value_",
    "global_grad_norm",
    "to_mesh_aware",
]

SUPPORTED_PRECISIONS = ("16-mixed", "bf16-mixed", "bf16-true", "32-true")
"""``Trainer(precision=...)`` values that HybridParallelStrategy supports."""


def to_mesh_aware(plugin: Precision) -> Precision:
    """The mesh-aware equivalent of a precision plugin, as the hybrid strategy installs it.

    Lightning builds a plain plugin from ``Trainer(precision=...)``; this returns the matching plugin of
    this package (keeping a mixed-precision plugin's device and its scaler's settings). Plugins of this
    package are returned as they are.

    Raises:
        ConfigurationError: a precision (or a custom plugin) the hybrid strategy does not support; the
            message lists the supported ones.

    Example::

        to_mesh_aware(MixedPrecision("bf16-mixed", "cpu"))   # HybridMixedPrecision("bf16-mixed", "cpu")
    """
    if isinstance(plugin, HybridPrecision):
        return plugin
    if type(plugin) is MixedPrecision:
        settings = {}
        if plugin.scaler is not None:
            scaler = plugin.scaler
            settings = {"init_scale": scaler.get_scale(), "growth_factor": scaler.get_growth_factor(),
                        "backoff_factor": scaler.get_backoff_factor(), "growth_interval": scaler.get_growth_interval()}
        return HybridMixedPrecision(plugin.precision, device=plugin.device, **settings)
    if type(plugin) is HalfPrecision and plugin.precision == "bf16-true":
        return HybridHalfPrecision("bf16-true")
    if type(plugin) is Precision:
        return HybridPrecision()
    raise ConfigurationError(
        f"{type(plugin).__name__}(precision={getattr(plugin, 'precision', None)!r}) is not supported by "
        f"HybridParallelStrategy; valid: Trainer(precision=...) in {list(SUPPORTED_PRECISIONS)}, or a "
        "HybridMixedPrecision / HybridHalfPrecision / HybridPrecision instance in plugins=[...]."
    )
