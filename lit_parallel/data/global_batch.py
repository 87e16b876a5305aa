"""Data order over the *global* batch, independent of the number of data-parallel ranks.

Lightning's ``DistributedSampler`` deals samples to ranks by interleaving (``perm[rank::num_replicas]``): the
samples of an optimizer step depend on the number of ranks, so a run resized from 2 to 1 rank trains other
batches. :class:`GlobalBatchSampler` fixes the samples of every optimizer step instead: epoch ``e`` draws one
permutation ``torch.randperm(n, generator=seed + e)`` (the one ``DistributedSampler`` draws), optimizer step
``k`` of the epoch trains its slice ``perm[k * G:(k + 1) * G]`` (``G`` = global batch), and that slice is cut
into ``dp * accumulate`` micro-batches of ``b`` samples: micro-batch ``m`` is ``[m * b, (m + 1) * b)`` of the
slice, and rank ``r`` trains micro-batches ``m = j * dp + r`` for ``j = 0 .. accumulate - 1``. Two ranks
without accumulation and one rank accumulating two micro-batches therefore put the same samples into every
optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["GlobalBatchSampler", "global_batch_indices"]


def global_batch_indices(num_samples: int, global_batch_size: int, *, seed: int, epoch: int,
                         shuffle: bool = True) -> list[list[int]]:
    """The samples of every optimizer step of one epoch: a function of (seed, epoch) and the global batch only.

    The last incomplete global batch is dropped, whatever the number of ranks, so that every step has exactly
    ``global_batch_size`` samples.

    Args:
        num_samples: length of the dataset.
        global_batch_size: samples per optimizer step, over all ranks and micro-batches.
        seed: base seed; the epoch's permutation is drawn from ``torch.Generator().manual_seed(seed + epoch)``.
        epoch: the epoch.
        shuffle: ``False`` keeps the dataset order.

    Returns:
        One list of sample indices per optimizer step.

    Example::

        global_batch_indices(8, 4, seed=0, epoch=0, shuffle=False)  # [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    if shuffle:
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = list(range(num_samples))
    steps = num_samples // global_batch_size
    return [order[k * global_batch_size:(k + 1) * global_batch_size] for k in range(steps)]


class GlobalBatchSampler:
    """Batch sampler of one data-parallel rank: its micro-batches of every global batch, in step order.

    Used as a DataLoader's ``batch_sampler`` (:class:`~lit_parallel.callbacks.ElasticResume` installs it on
    the train loaders); ``set_epoch`` selects the epoch's permutation, as for ``DistributedSampler``.

    Args:
        num_samples: length of the dataset.
        batch_size: samples per micro-batch of this rank (the DataLoader's ``batch_size``).
        data_parallel_size: number of data-parallel ranks.
        rank: this rank's data-parallel index.
        accumulate_grad_batches: micro-batches per rank per optimizer step.
        seed: base seed of the permutations (``seed + epoch``).
        shuffle: ``False`` keeps the dataset order.

    Raises:
        ValueError: a size is not positive, or ``rank`` is not in ``[0, data_parallel_size)``.

    Example::

        sampler = GlobalBatchSampler(64, batch_size=4, data_parallel_size=2, rank=0, accumulate_grad_batches=2, seed=0)
        sampler.set_epoch(1)
        list(sampler)[:2]  # rank 0's micro-batches 0 and 2 of step 0 of epoch 1 (global batch 16)
    """

    def __init__(self, num_samples: int, batch_size: int, data_parallel_size: int, rank: int,
                 accumulate_grad_batches: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        for name, value in (("num_samples", num_samples), ("batch_size", batch_size),
                            ("data_parallel_size", data_parallel_size),
                            ("accumulate_grad_batches", accumulate_grad_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; valid: a positive integer.")
        if not 0 <= rank < data_parallel_size:
            raise ValueError(f"rank={rank!r}; valid: 0 <= rank < data_parallel_size ({data_parallel_size}).")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.data_parallel_size, self.rank = data_parallel_size, rank
        self.accumulate_grad_batches, self.seed, self.shuffle = accumulate_grad_batches, seed, shuffle
        self.epoch = 0

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step: ``batch_size * data_parallel_size * accumulate_grad_batches``."""
        return self.batch_size * self.data_parallel_size * self.accumulate_grad_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` for the next iteration."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        b, dp = self.batch_size, self.data_parallel_size
        for step in global_batch_indices(self.num_samples, self.global_batch_size, seed=self.seed,
                                         epoch=self.epoch, shuffle=self.shuffle):
            for j in range(self.accumulate_grad_batches):
                micro = j * dp + self.rank
                yield step[micro * b:(micro + 1) * b]

    def __len__(self) -> int:
        return self.num_samples // self.global_batch_size * self.accumulate_grad_batches
