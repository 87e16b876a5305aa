"""1-bit compression: scaled sign with error feedback (EF-SignSGD)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.compression.base import Compressor, check_int, copy_back, flatten, pack, unpack

__all__ = ["OneBit"]

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_BIT_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


class OneBit(Compressor):
    """Each rank sends the sign of every entry (1 bit) and one fp32 scale per chunk (~32x fewer bytes).

    The chunk's scale is its mean absolute value, so ``scale * sign(x)`` has the chunk's l1 norm
    (EF-SignSGD, Karimireddy et al. 2019). Error feedback carries what the sign lost into the next
    step; without it sign compression does not converge in general, so it cannot be turned off. The
    bit-packed payloads are all-gathered and every rank unpacks and adds them in rank order.

    Args:
        chunk_size: entries sharing one scale; a multiple of 8 (whole bytes of signs).
        warmup_steps: optimizer steps that use an exact all-reduce first.
        min_compress_numel: buckets with fewer elements are all-reduced uncompressed.

    Raises:
        ConfigurationError: ``chunk_size`` not a positive multiple of 8, or a negative
            ``warmup_steps``/``min_compress_numel``.

    Example::

        Trainer(strategy=CompressedDDPStrategy(compression=OneBit(warmup_steps=100)))
    """

    name = "onebit"
    hparams = (*Compressor.hparams, "chunk_size")

    def __init__(self, chunk_size: int = 4096, warmup_steps: int = 0, min_compress_numel: int = 0) -> None:
        super().__init__(warmup_steps=warmup_steps, min_compress_numel=min_compress_numel)
        check_int("OneBit", "chunk_size", chunk_size, 8)
        if chunk_size % 8:
            raise ConfigurationError(f"OneBit(chunk_size={chunk_size}): chunk_size must be a multiple of 8.")
        self.chunk_size = chunk_size

    def _reduce_compressed(self, key: str, tensors: list[Tensor], group: ProcessGroup | None) -> None:
        flat = flatten(tensors, torch.float32)
        flat += self._buffer(f"ef:{key}", flat)
        numel, chunks = flat.numel(), math.ceil(flat.numel() / self.chunk_size)
        padding = chunks * self.chunk_size - numel
        blocks = F.pad(flat, (0, padding)).view(chunks, self.chunk_size)
        counts = torch.full((chunks, 1), float(self.chunk_size), device=flat.device)
        counts[-1] -= padding  # the zero padding must not shrink the last chunk's mean
        scales = blocks.abs().sum(dim=1, keepdim=True) / counts
        positive = blocks >= 0
        self._memory[f"ef:{key}"] = flat - torch.where(positive, scales, -scales).view(-1)[:numel]
        signs = (positive.view(-1, 8).to(torch.uint8) * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)
        payloads = self._all_gather(pack([scales, signs]), group)
        total = torch.zeros_like(blocks)
        for payload in payloads:  # rank order: every rank adds the same terms in the same order
            peer_scales, peer_signs = unpack(payload, [(torch.float32, chunks), (torch.uint8, signs.numel())])
            bits = (peer_signs.unsqueeze(1) >> _BIT_SHIFTS.to(flat.device)) & 1
            peer_scales = peer_scales.view(chunks, 1)
            total += torch.where(bits.view_as(blocks).bool(), peer_scales, -peer_scales)
        copy_back(total.view(-1)[:numel].div_(len(payloads)), tensors)
