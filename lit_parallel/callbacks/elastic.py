"""Resume a checkpoint on another number of data-parallel ranks, on the same global batch and the same batches.

:class:`ElasticResume` is :class:`~lit_parallel.callbacks.ExactResume` (loop state, mid-epoch position, random
streams) plus three things that make the data-parallel size a free choice at every restart:

1. **Data order over the global batch.** Every train DataLoader gets a
   :class:`~lit_parallel.data.global_batch.GlobalBatchSampler`: optimizer step ``k`` of epoch ``e`` trains the
   ``k``-th slice of ``randperm(n, generator=seed + e)`` whatever the number of ranks, each rank taking its
   micro-batches of that slice.
2. **The global batch travels with the checkpoint** (``checkpoint["elastic"]``: global batch, per-rank batch,
   dp, accumulation). Resumed on another dp, ``trainer.accumulate_grad_batches`` is set to
   ``global_batch / (per_rank_batch * dp)``, or the run is refused, with the numbers, when that is no integer.
3. **The loop's micro-batch counters are rescaled** to the new accumulation, so that the resumed epoch
   continues at the same optimizer step (Lightning counts a rank's micro-batches, not optimizer steps).

What cannot be resized starts afresh, with a warning: per-rank random streams (dropout) and per-rank gradient
compression memory (error feedback) when the number of ranks changes.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.data import sized_len
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler
from typing_extensions import override

from lit_parallel.callbacks.resume import ExactResume
from lit_parallel.data.global_batch import GlobalBatchSampler
from lit_parallel.data.resumable import ResumableDataLoader
from lit_parallel.errors import ConfigurationError

__all__ = ["ElasticResume"]

CHECKPOINT_KEY = "elastic"


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigurationError(f"{name}={value!r}; valid: a positive integer, or None.")


class ElasticResume(ExactResume):
    """Exact resume that also survives a change of the data-parallel size (dp=2 → dp=1, dp=4, tp2×dp2 → tp2×dp1).

    The global batch of a run is ``global_batch_size`` when given, else the DataLoader's ``batch_size`` × dp ×
    the Trainer's ``accumulate_grad_batches``. A resumed run keeps the checkpoint's global batch: when only the
    number of ranks changed, the accumulation is adjusted so that ``per_rank_batch × dp × accumulation`` equals
    it, and the resumed run trains the batches the uninterrupted run would have trained (same samples in every
    optimizer step; the mean loss and gradient equal up to float rounding). With ``torchrun
    --nnodes=MIN:MAX`` and ``ckpt_path=auto`` a job restarted on fewer or more nodes continues this way.

    Args:
        seed: base of the data order (``randperm(n, generator=seed + epoch)``); ``None`` takes
            ``PL_GLOBAL_SEED`` or 0.
        global_batch_size: samples per optimizer step over all ranks; ``None``: the loader's batch size × dp ×
            the Trainer's ``accumulate_grad_batches`` on a fresh run, the checkpoint's when only dp changed.
        allow_global_batch_change: resume a checkpoint whose global batch differs from the configured one,
            training on with the configured one (a warning names both); the default refuses.

    Raises:
        ConfigurationError: ``global_batch_size`` is not a positive integer. During ``fit``: the global batch is
            not a multiple of per-rank batch × dp (all three named); the checkpoint's global batch differs from
            the configured one (both named, and how to override); a train loader without ``batch_size``, with an
            iterable dataset, with a sampler other than random, sequential or distributed, or stateful other than
            :class:`~lit_parallel.data.ResumableDataLoader`.

    Example::

        trainer = L.Trainer(devices=1, max_steps=1000, callbacks=[ElasticResume(), ModelCheckpoint(every_n_train_steps=100)])
        # written with devices=2: resumed on 1 device with accumulate_grad_batches=2, same global batch
        trainer.fit(model, DataLoader(dataset, batch_size=32, shuffle=True), ckpt_path="checkpoints/step=400.ckpt")
    """

    def __init__(self, seed: int | None = None, global_batch_size: int | None = None,
                 allow_global_batch_change: bool = False) -> None:
        super().__init__(seed)
        _check_positive("global_batch_size", global_batch_size)
        self.global_batch_size = global_batch_size
        self.allow_global_batch_change = bool(allow_global_batch_change)
        self._configured_accumulation = 1
        self._record: dict[str, int] | None = None  # the checkpoint's
        self._current: dict[str, int] | None = None  # this run's

    # -- checkpoint ---------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._configured_accumulation = int(trainer.accumulate_grad_batches)
        self._record = self._current = None

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._current is not None:
            checkpoint[CHECKPOINT_KEY] = dict(self._current)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._record = checkpoint.get(CHECKPOINT_KEY)
        if self._record is not None and trainer.state.fn == TrainerFn.FITTING:
            # ExactResume checks the position against the accumulation the checkpoint was written with.
            trainer.accumulate_grad_batches = int(self._record["accumulate_grad_batches"])
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        trainer.accumulate_grad_batches = self._configured_accumulation

    # -- data order and accumulation ----------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaders = self._train_loaders(trainer)
        if loaders:
            self._install(trainer, loaders)
        super().on_train_start(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        loaders = self._train_loaders(trainer)
        reloaded = [loader for loader in loaders if not isinstance(getattr(loader, "batch_sampler", None),
                                                                       GlobalBatchSampler)]
        if reloaded and self._current is not None:  # reload_dataloaders_every_n_epochs built new loaders
            self._wrap(trainer, reloaded)
        epoch = trainer.fit_loop.epoch_progress.current.processed
        for loader in loaders:
            loader.batch_sampler.set_epoch(epoch)  # the iterator of this epoch is created after this hook

    def _layout(self, trainer: pl.Trainer) -> tuple[int, int]:
        kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))

    def _accumulation(self, batch: int, dp: int) -> int:
        """This run's accumulation, from the configured and the checkpoint's global batch."""
        configured = self.global_batch_size or batch * dp * self._configured_accumulation
        record, target = self._record, configured
        if record is None and self._resumed:
            rank_zero_warn("The checkpoint holds no global batch (it was written without ElasticResume): this run "
                           f"trains global batches of {configured} in ElasticResume's order from here on; resuming "
                           "it on another number of ranks is not exact.")
        if record is not None:
            saved = int(record["global_batch_size"])
            resized = (self.global_batch_size is None and dp != record["data_parallel_size"]
                       and batch == record["per_rank_batch_size"]
                       and self._configured_accumulation == record["accumulate_grad_batches"])
            if resized:
                target = saved  # only the number of ranks changed: keep the checkpoint's global batch
            elif saved != configured:
                if not self.allow_global_batch_change:
                    raise ConfigurationError(
                        f"The checkpoint was trained with global batch {saved} (per-rank batch "
                        f"{record['per_rank_batch_size']} x dp {record['data_parallel_size']} x accumulate_grad_batches "
                        f"{record['accumulate_grad_batches']}); this run is configured for {configured} (per-rank batch "
                        f"{batch} x dp {dp} x accumulate_grad_batches {self._configured_accumulation}"
                        f"{'' if self.global_batch_size is None else f', global_batch_size={self.global_batch_size}'}). "
                        f"Set ElasticResume(global_batch_size={saved}) to keep the checkpoint's, or "
                        "ElasticResume(allow_global_batch_change=True) to continue with the new one.")
                rank_zero_warn(f"Continuing with global batch {configured} instead of the checkpoint's {saved} "
                               "(allow_global_batch_change=True): the steps after the checkpoint train other batches "
                               "than the interrupted run would have.")
        if target % (batch * dp):
            raise ConfigurationError(
                f"Global batch {target} cannot be split over dp={dp} ranks with per-rank batch {batch}: it is not a "
                f"multiple of {batch} x {dp} = {batch * dp}. Valid: a dp and per-rank batch whose product divides "
                f"{target}.")
        return target // (batch * dp)

    def _install(self, trainer: pl.Trainer, loaders: list[Any]) -> None:
        """Replace every train loader's index sampler by this rank's :class:`GlobalBatchSampler`."""
        for loader in loaders:
            self._check_loader(loader)
        dp, _ = self._layout(trainer)
        batches = {loader.batch_size for loader in loaders}
        if len(batches) != 1:
            raise ConfigurationError(f"The train loaders have batch sizes {sorted(batches)}; ElasticResume needs one "
                                     "per-rank batch size for all of them.")
        batch = batches.pop()
        accumulation = self._accumulation(batch, dp)
        old = int(self._record["accumulate_grad_batches"]) if self._record is not None else accumulation
        if self._record is not None and dp != self._record["data_parallel_size"]:
            rank_zero_info(f"ElasticResume: dp {self._record['data_parallel_size']} -> {dp}, accumulate_grad_batches "
                           f"{old} -> {accumulation}, global batch {batch * dp * accumulation}.")
        trainer.accumulate_grad_batches = accumulation
        self._current = {"global_batch_size": batch * dp * accumulation, "per_rank_batch_size": batch,
                         "data_parallel_size": dp, "accumulate_grad_batches": accumulation}
        if self._resumed and old != accumulation:
            self._rescale_position(trainer, old, accumulation)
            self._loader_states = [{"batches_done": int(state.get("batches_done", 0)) // old * accumulation}
                                   for state in self._loader_states]  # ResumableDataLoader's (the only stateful one)
        self._wrap(trainer, loaders)

    def _wrap(self, trainer: pl.Trainer, loaders: list[Any]) -> None:
        """Give each loader this rank's sampler of this run's layout; also for loaders reloaded at an epoch."""
        current = self._current
        dp, rank = self._layout(trainer)
        epoch = trainer.fit_loop.epoch_progress.current.processed
        for loader in loaders:
            self._check_loader(loader)
            if loader.batch_size != current["per_rank_batch_size"]:
                raise ConfigurationError(f"A reloaded train loader has batch_size={loader.batch_size}; this run "
                                         f"trains per-rank batches of {current['per_rank_batch_size']}.")
            sampler = GlobalBatchSampler(len(loader.dataset), current["per_rank_batch_size"], dp, rank,
                                         current["accumulate_grad_batches"], self._base_seed(),
                                         self._shuffled(loader.sampler))
            sampler.set_epoch(epoch)
            if getattr(loader, "_iterator", None) is not None:
                loader._iterator = None  # persistent workers read the index sampler when their iterator is built
            # DataLoader forbids setting its samplers after construction; the loader is Lightning's own copy.
            object.__setattr__(loader, "batch_sampler", sampler)
        self._update_lengths(trainer)

    @staticmethod
    def _check_loader(loader: Any) -> None:
        if not isinstance(loader, DataLoader) or getattr(loader, "batch_size", None) is None:
            raise ConfigurationError(f"ElasticResume needs map-style train DataLoaders with batch_size set; got "
                                     f"{type(loader).__name__} with batch_size={getattr(loader, 'batch_size', None)!r}.")
        if isinstance(loader.dataset, IterableDataset):
            raise ConfigurationError("ElasticResume needs a map-style dataset (its order is a permutation of "
                                     f"indices); got the iterable {type(loader.dataset).__name__}.")
        if isinstance(loader, _Stateful) and not isinstance(loader, ResumableDataLoader):
            raise ConfigurationError(f"ElasticResume replaces the train loader's index sampler; the stateful "
                                     f"{type(loader).__name__} keeps a position of its own that it cannot rescale. "
                                     "Valid: a plain DataLoader or lit_parallel's ResumableDataLoader.")
        ElasticResume._shuffled(loader.sampler)

    @staticmethod
    def _shuffled(sampler: Any) -> bool:
        if type(sampler) is DistributedSampler:  # not Lightning's wrapper around a custom sampler
            return bool(sampler.shuffle)
        if isinstance(sampler, (RandomSampler, SequentialSampler)):
            return isinstance(sampler, RandomSampler)
        raise ConfigurationError(f"ElasticResume replaces the train sampler by one over the global batch; the "
                                 f"sampler {type(sampler).__name__} is not one it can replace (valid: shuffle=True "
                                 "or False, i.e. RandomSampler or SequentialSampler, or Lightning's "
                                 "DistributedSampler over them).")

    @staticmethod
    def _rescale_position(trainer: pl.Trainer, old: int, new: int) -> None:
        """Lightning counts a rank's micro-batches; the same optimizer step is ``new / old`` times as many."""
        progress = trainer.fit_loop.epoch_loop.batch_progress
        for tracker in (progress.current, progress.total):
            base = tracker.processed
            if base % old:
                rank_zero_warn(f"The checkpoint was written after {base} micro-batches, inside an accumulation window "
                               f"of {old}; the resized run continues at the window's start.")
            scaled = base // old * new
            for field in ("ready", "started", "processed", "completed"):
                setattr(tracker, field, scaled + getattr(tracker, field) - base)

    @staticmethod
    def _update_lengths(trainer: pl.Trainer) -> None:
        """The epoch length Lightning took from the replaced samplers (before any callback ran)."""
        fit_loop = trainer.fit_loop
        combined = fit_loop._combined_loader
        combined.limits = [_parse_num_batches(RunningStage.TRAINING, len(loader), trainer.limit_train_batches)
                           for loader in combined.flattened]
        length = sized_len(combined)
        fit_loop.max_batches = length if length is not None else float("inf")
        if isinstance(trainer.val_check_interval, float) and trainer.val_check_batch != float("inf"):
            trainer.val_check_batch = max(1, int(fit_loop.max_batches * trainer.val_check_interval))
