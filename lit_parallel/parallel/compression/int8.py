"""Int8 quantization with a scale per chunk, optional stochastic rounding and error feedback."""

from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from lit_parallel.parallel.compression.base import Compressor, check_int, copy_back, flatten, pack, unpack

__all__ = ["Int8"]


class Int8(Compressor):
    """Each rank sends its gradient as int8 with one fp32 scale per chunk (about 4x fewer bytes).

    Sums of int8 values overflow, so the payloads are all-gathered and every rank dequantizes and adds
    them in rank order (the same result everywhere). With error feedback the quantization error of a
    step is added to the next step's gradient, so nothing is lost in the long run.

    Args:
        chunk_size: elements sharing one scale (``max|x| / 127`` of the chunk).
        stochastic_rounding: round up with probability equal to the fractional part (unbiased) instead
            of to nearest; the random stream depends only on ``seed``, rank, step and bucket, so a
            resumed run draws the same numbers.
        error_feedback: carry each step's quantization error into the next step.
        seed: seed of the stochastic rounding.
        warmup_steps: optimizer steps that use an exact all-reduce first.
        min_compress_numel: buckets with fewer elements are all-reduced uncompressed.

    Raises:
        ConfigurationError: ``chunk_size < 1`` or a negative ``warmup_steps``/``min_compress_numel``.

    Example::

        Trainer(strategy=CompressedDDPStrategy(compression=Int8(stochastic_rounding=True)))
    """

    name = "int8"
    hparams = (*Compressor.hparams, "chunk_size", "stochastic_rounding", "error_feedback", "seed")

    def __init__(
        self,
        chunk_size: int = 1024,
        stochastic_rounding: bool = False,
        error_feedback: bool = True,
        seed: int = 0,
        warmup_steps: int = 0,
        min_compress_numel: int = 0,
    ) -> None:
        super().__init__(warmup_steps=warmup_steps, min_compress_numel=min_compress_numel)
        check_int("Int8", "chunk_size", chunk_size, 1)
        self.chunk_size = chunk_size
        self.stochastic_rounding = bool(stochastic_rounding)
        self.error_feedback = bool(error_feedback)
        self.seed = seed

    def _reduce_compressed(self, key: str, tensors: list[Tensor], group: ProcessGroup | None) -> None:
        flat = flatten(tensors, torch.float32)
        if self.error_feedback:
            flat += self._buffer(f"ef:{key}", flat)
        numel, chunks = flat.numel(), math.ceil(flat.numel() / self.chunk_size)
        blocks = F.pad(flat, (0, chunks * self.chunk_size - numel)).view(chunks, self.chunk_size)
        scales = blocks.abs().amax(dim=1, keepdim=True) / 127
        scaled = blocks / scales.clamp_min(torch.finfo(torch.float32).tiny)
        if self.stochastic_rounding:
            noise = torch.rand(scaled.shape, generator=self._generator(key, flat), device=flat.device)
            scaled = torch.floor(scaled + noise)
        else:
            scaled = torch.round(scaled)
        quantized = scaled.clamp_(-127, 127).to(torch.int8)
        if self.error_feedback:
            self._memory[f"ef:{key}"] = flat - (quantized * scales).view(-1)[:numel]
        payloads = self._all_gather(pack([scales, quantized]), group)
        total = torch.zeros_like(blocks)
        for payload in payloads:  # rank order: every rank adds the same terms in the same order
            peer_scales, peer_q = unpack(payload, [(torch.float32, chunks), (torch.int8, blocks.numel())])
            total += peer_q.view_as(blocks) * peer_scales.view(chunks, 1)
        copy_back(total.view(-1)[:numel].div_(len(payloads)), tensors)

    def _generator(self, key: str, like: Tensor) -> torch.Generator:
        seed = zlib.crc32(f"{self.seed}:{dist.get_rank()}:{self.step_count}:{key}".encode())
        return torch.Generator(device=like.device).manual_seed(seed)
