"""A DataLoader that continues mid-epoch after a resume, at the exact batch where training stopped.

Lightning saves the state of every training dataloader that has ``state_dict``/``load_state_dict``
and restores it before iterating again. This loader's state is the number of batches the *trainer*
consumed in the current epoch (read from the fit loop, so batches prefetched but not trained are not
counted); on resume the first iteration skips that many batches at the index level (no data is
loaded for them). Combined with a deterministic sampler (Lightning's ``DistributedSampler`` with
``set_epoch``, or this project's datamodules) the resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader

__all__ = ["ResumableDataLoader", "trainer_batch_position"]


def trainer_batch_position(trainer: Any) -> int:
    """Batches the trainer has consumed in the current training epoch (0 at an epoch boundary)."""
    if trainer is None:
        return 0
    ready = int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
    total = trainer.num_training_batches
    return 0 if isinstance(total, (int, float)) and ready >= total else ready


class _SkipFirst:
    """Index sampler view without its first ``skip`` entries."""

    def __init__(self, base: Any, skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.base) - self.skip, 0)


class ResumableDataLoader(DataLoader):
    """:class:`~torch.utils.data.DataLoader` with Lightning's stateful-loader protocol.

    Args:
        *args: as for :class:`~torch.utils.data.DataLoader`.
        position: returns the batches consumed so far in this epoch (default: 0, i.e. not resumable
            mid-epoch); the datamodules pass ``lambda: trainer_batch_position(self.trainer)``.
        **kwargs: as for :class:`~torch.utils.data.DataLoader`.
    """

    def __init__(self, *args: Any, position: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = position
        self._skip_next = 0
        self._skipping = 0

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": int(self.position()) if self.position is not None else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._skip_next = int(state.get("batches_done", 0))

    def __iter__(self) -> Any:
        self._skipping, self._skip_next = self._skip_next, 0
        try:
            return super().__iter__()
        finally:
            self._skipping = 0

    @property
    def _index_sampler(self) -> Any:
        base = super()._index_sampler
        return _SkipFirst(base, self._skipping) if getattr(self, "_skipping", 0) else base
