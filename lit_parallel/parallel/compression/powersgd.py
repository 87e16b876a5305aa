"""PowerSGD: rank-r gradient approximation by one step of power iteration, warm-started (Vogels et al. 2019)."""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from lit_parallel.parallel.compression.base import Compressor, check_int

__all__ = ["PowerSGD"]


class PowerSGD(Compressor):
    """Each gradient matrix ``M`` (n x m) is sent as ``P = M Q`` (n x r) and ``Q = M^T P`` (m x r).

    Per step and bucket: ``M += error``; ``P = M Q``; all-reduce ``P``; orthogonalize ``P``;
    ``Q = M^T P``; all-reduce and average ``Q``; the gradient becomes ``P Q^T`` and ``error = M - P Q^T``.
    ``Q`` is kept for the next step (warm start), so one power-iteration step per training step tracks
    the top singular subspace. Tensors with fewer than 2 dimensions, or whose rank-r factors would not be
    smaller than the matrix, are packed together and all-reduced uncompressed.

    Unlike torch's ``powerSGD_hook`` this works on any backend and on any list of tensors (also
    tensor-parallel shards). Tuning guide, in order:

    1. Start with ``rank=1`` or ``2`` and raise it until accuracy matches uncompressed training;
       rank 4 is enough for most vision and language models.
    2. Set ``warmup_steps`` to a few hundred steps (or ~10 % of training) so the first, fast-changing
       gradients go uncompressed; larger ``rank`` needs less warm-up.
    3. Keep ``warm_start=True``: without it every step starts the power iteration from noise and the
       approximation is much worse at the same rank.
    4. Raise ``min_compress_numel`` if many small layers make latency, not bandwidth, dominate.

    Args:
        rank: rank ``r`` of the approximation, >= 1.
        warm_start: reuse last step's ``Q`` (otherwise draw a new random ``Q`` every step).
        error_feedback: add what the approximation missed to the next step's gradient.
        orthogonalization_epsilon: added to column norms in Gram-Schmidt (guards all-zero columns).
        seed: seed of the random initial ``Q`` (the same on every rank).
        warmup_steps: optimizer steps that use an exact all-reduce first.
        min_compress_numel: buckets, and matrices, with fewer elements are all-reduced uncompressed.

    Raises:
        ConfigurationError: ``rank < 1`` or a negative ``warmup_steps``/``min_compress_numel``.

    Example::

        Trainer(strategy=CompressedDDPStrategy(compression=PowerSGD(rank=4, warmup_steps=100)))
    """

    name = "powersgd"
    hparams = (*Compressor.hparams, "rank", "warm_start", "error_feedback", "orthogonalization_epsilon", "seed")

    def __init__(
        self,
        rank: int = 4,
        warm_start: bool = True,
        error_feedback: bool = True,
        orthogonalization_epsilon: float = 1e-8,
        seed: int = 0,
        warmup_steps: int = 0,
        min_compress_numel: int = 0,
    ) -> None:
        super().__init__(warmup_steps=warmup_steps, min_compress_numel=min_compress_numel)
        check_int("PowerSGD", "rank", rank, 1)
        self.rank = rank
        self.warm_start = bool(warm_start)
        self.error_feedback = bool(error_feedback)
        self.orthogonalization_epsilon = float(orthogonalization_epsilon)
        self.seed = seed

    def _low_rank(self, tensor: Tensor) -> bool:
        if tensor.ndim < 2 or tensor.numel() < self.min_compress_numel:
            return False
        n, m = tensor.shape[0], tensor.numel() // tensor.shape[0]
        return (n + m) * min(n, m, self.rank) < n * m

    def _reduce_compressed(self, key: str, tensors: list[Tensor], group: ProcessGroup | None) -> None:
        matrices = [i for i, t in enumerate(tensors) if self._low_rank(t)]
        dense = [t for t in tensors if not self._low_rank(t)]
        if dense:
            self._exact_average(dense, group)
        if not matrices:
            return
        ms, qs = [], []
        for i in matrices:
            m = tensors[i].reshape(tensors[i].shape[0], -1).to(torch.float32, copy=True)
            if self.error_feedback:
                m += self._buffer(f"err:{key}:{i}", m)
            ms.append(m)
            qs.append(self._initial_q(f"q:{key}:{i}", m))
        ps = self._all_reduce_many([m @ q for m, q in zip(ms, qs, strict=True)], group, average=False)
        for p in ps:
            _orthogonalize_(p, self.orthogonalization_epsilon)
        qs = self._all_reduce_many([m.T @ p for m, p in zip(ms, ps, strict=True)], group, average=True)
        for i, m, p, q in zip(matrices, ms, ps, qs, strict=True):
            approx = p @ q.T
            if self.error_feedback:
                self._memory[f"err:{key}:{i}"] = m - approx
            if self.warm_start:
                self._memory[f"q:{key}:{i}"] = q
            tensors[i].copy_(approx.view_as(tensors[i]))

    def _initial_q(self, name: str, m: Tensor) -> Tensor:
        rank = min(*m.shape, self.rank)
        q = self._memory.get(name) if self.warm_start else None
        if q is not None and q.shape == (m.shape[1], rank):
            return q.to(m.device)
        # Seeded by name (and step without warm start): identical on every rank, and after a resume.
        step = 0 if self.warm_start else self.step_count
        seed = zlib.crc32(f"{self.seed}:{step}:{name}".encode())
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(m.shape[1], rank, generator=generator).to(m.device)

    def _all_reduce_many(self, tensors: list[Tensor], group: ProcessGroup | None, average: bool) -> list[Tensor]:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self._all_reduce(flat, group)
        if average:
            flat /= dist.get_world_size(group)
        return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


def _orthogonalize_(matrix: Tensor, epsilon: float) -> None:
    """Gram-Schmidt on the columns, in place (deterministic, unlike a LAPACK QR across machines)."""
    for i in range(matrix.shape[1]):
        col = matrix[:, i : i + 1]
        col /= torch.linalg.vector_norm(col) + epsilon
        if i + 1 < matrix.shape[1]:
            rest = matrix[:, i + 1 :]
            rest -= (col * rest).sum(dim=0, keepdim=True) * col
