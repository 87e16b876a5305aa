"""Gradient compressors for :class:`~lit_parallel.CompressedDDPStrategy` and the hybrid strategy.

Example::

    from lit_parallel.compression import PowerSGD, get_compressor

    Trainer(strategy=CompressedDDPStrategy(compression=PowerSGD(rank=4)))
    Trainer(strategy="ddp_powersgd")                       # the same with default arguments
    get_compressor("topk", ratio=0.01)                     # by name (used by config files)
    Hierarchical(outer=PowerSGD(rank=4))                   # exact inside a node, PowerSGD between nodes
"""

from __future__ import annotations

from typing import Any

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.compression import (
    BF16,
    FP16,
    CommStats,
    Compressor,
    Hierarchical,
    HierarchicalCommStats,
    Int8,
    NoCompression,
    OneBit,
    PowerSGD,
    TopK,
)

__all__ = ["BF16", "COMPRESSORS", "FP16", "CommStats", "Compressor", "Hierarchical", "HierarchicalCommStats", "Int8",
           "NoCompression", "OneBit", "PowerSGD", "TopK", "get_compressor", "resolve_compressor"]

COMPRESSORS: dict[str, type[Compressor]] = {
    cls.name: cls for cls in (NoCompression, FP16, BF16, Int8, TopK, PowerSGD, OneBit, Hierarchical)
}


def get_compressor(name: str, **kwargs: Any) -> Compressor:
    """The compressor registered as ``name``, built with ``kwargs``.

    Raises:
        ConfigurationError: ``name`` is unknown (the message lists the valid names), or an argument is.
    """
    if name not in COMPRESSORS:
        raise ConfigurationError(f"compression={name!r} is unknown; valid: {sorted(COMPRESSORS)}.")
    return COMPRESSORS[name](**kwargs)


def resolve_compressor(compression: Compressor | str | None) -> Compressor | None:
    """A strategy's ``compression=`` argument: ``None``, a registered name, or a compressor instance.

    Raises:
        ConfigurationError: an unknown name, or an object that is not a :class:`Compressor`.
    """
    if isinstance(compression, str):
        return get_compressor(compression)
    if compression is not None and not isinstance(compression, Compressor):
        raise ConfigurationError(
            f"compression={compression!r} is not a compressor; valid: None, a name in {sorted(COMPRESSORS)} "
            "or an instance from lit_parallel.compression."
        )
    return compression
