"""Half-precision all-reduce: FP16 and BF16 (2x fewer bytes, no memory)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from lit_parallel.parallel.compression.base import Compressor, copy_back, flatten

__all__ = ["BF16", "FP16"]


class _CastCompressor(Compressor):
    """All-reduce the average in a 16-bit dtype; each rank divides by the world size before casting."""

    dtype: ClassVar[torch.dtype]

    def _reduce_compressed(self, key: str, tensors: list[Tensor], group: ProcessGroup | None) -> None:
        # Dividing in fp32 before the cast keeps the sum of world_size terms inside the 16-bit range.
        buf = flatten(tensors, torch.float32).div_(dist.get_world_size(group)).to(self.dtype)
        self._all_reduce(buf, group)
        copy_back(buf, tensors)


class FP16(_CastCompressor):
    """Gradients all-reduced in float16: half the bytes, ~3 significant digits, range ±65504.

    Like torch's ``fp16_compress_hook``, but on every backend (gloo included).

    Args:
        warmup_steps: optimizer steps that use an exact all-reduce first.
        min_compress_numel: buckets with fewer elements are all-reduced uncompressed.

    Example::

        Trainer(strategy=CompressedDDPStrategy(compression=FP16()))
    """

    name = "fp16"
    dtype = torch.float16


class BF16(_CastCompressor):
    """Gradients all-reduced in bfloat16: half the bytes, fp32's range, ~2 significant digits.

    torch's ``bf16_compress_hook`` needs NCCL; this one works on gloo too.

    Args:
        warmup_steps: optimizer steps that use an exact all-reduce first.
        min_compress_numel: buckets with fewer elements are all-reduced uncompressed.

    Example::

        Trainer(strategy=CompressedDDPStrategy(compression=BF16()))
    """

    name = "bf16"
    dtype = torch.bfloat16
