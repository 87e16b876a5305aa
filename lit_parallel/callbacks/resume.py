"""Exact resumption from any checkpoint Lightning writes: no step lost, none trained twice.

Three things stand between a Lightning 2.6 checkpoint and a resumed run that ends with the parameters of an
uninterrupted one; :class:`ExactResume` handles each:

1. **The loop state of an epoch-end checkpoint replays a batch.** ``ModelCheckpoint(every_n_epochs=...)``,
   ``save_last`` and checkpoints written on ``on_validation_end`` at the end of an epoch store an epoch whose
   batches are all trained but which is not yet marked completed. Resumed with ``max_steps`` set, Lightning
   restarts that epoch and trains one more batch in it (``batch_idx == num_training_batches``) before the next
   epoch begins. :meth:`ExactResume.on_load_checkpoint` rewrites such a state, before the loops load it, into
   the state of the next epoch's start.
2. **Plain DataLoaders do not know where the epoch stopped.** Lightning skips the batches already trained only
   for stateful loaders; a ``torch.utils.data.DataLoader`` resumed mid-epoch starts its epoch again. On resume
   the train iterator is rebuilt with its first ``k`` batches skipped at the index level (no sample of them is
   loaded), or, for a stateful loader, with its saved state applied to the rebuilt iterator.
3. **The data pipeline draws from the process-wide RNG.** ``RandomSampler`` takes its order, and every
   DataLoader iterator its worker seed, from the global torch generator, at a moment that differs between an
   uninterrupted and a resumed run. Each train DataLoader (and its sampler) gets its own generator seeded with
   ``seed + epoch`` at the start of every epoch, each validation DataLoader one seeded with ``seed``: the order
   of epoch ``e`` is ``torch.randperm(n, generator=seed + e)``, the one Lightning's ``DistributedSampler``
   draws, and the global stream is left to the model (dropout) and your hooks. That stream, every rank's, is
   saved with the checkpoint and put back right before the first resumed batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from lit_parallel.checkpointing import capture_rng_state, restore_rng_state
from lit_parallel.data.resumable import _SkipFirst

__all__ = ["ExactResume", "mark_epoch_end_completed"]

CHECKPOINT_KEY = "rng_states"
_FIT = "fit_loop"
_BATCH = "epoch_loop.batch_progress"
_EPOCH = "epoch_progress"
# Per-epoch counters of the training epoch loop that a new epoch starts from zero.
_PER_EPOCH = ("epoch_loop.scheduler_progress", "epoch_loop.manual_optimization.optim_step_progress")
_OPTIMIZER = "epoch_loop.automatic_optimization.optim_progress"


def _zero_current(progress: dict[str, Any]) -> None:
    for key in progress["current"]:
        progress["current"][key] = 0


def mark_epoch_end_completed(loops: dict[str, Any]) -> bool:
    """Rewrite the loop state of a checkpoint taken after an epoch's last batch into the next epoch's start.

    Lightning 2.6 writes such a state from ``on_train_batch_end`` of the last batch (``every_n_train_steps``
    landing there, a ``trainer.save_checkpoint`` call), from ``on_validation_end`` at the epoch's end and from
    ``on_train_epoch_end`` (``every_n_epochs``, ``save_last``). Resumed as is, the last case restarts the
    finished epoch and trains a batch past its end. The rewritten state is the one Lightning itself reaches
    between two epochs of an uninterrupted run: the epoch counted ready, started, processed and completed; the
    per-epoch batch, scheduler and optimizer counters at zero; the totals unchanged.

    Args:
        loops: ``checkpoint["loops"]``, changed in place.

    Returns:
        Whether the state was an epoch-end state (and was rewritten).

    Example::

        checkpoint = torch.load("last.ckpt", weights_only=True)
        mark_epoch_end_completed(checkpoint["loops"])  # what ExactResume.on_load_checkpoint does
    """
    fit = loops.get(_FIT)
    if not fit or _BATCH not in fit or _EPOCH not in fit:
        return False
    batch, epoch = fit[_BATCH], fit[_EPOCH]
    current = batch["current"]
    # Every batch fetched was processed (`started` lags behind when on_train_batch_start returned -1).
    if not batch.get("is_last_batch") or current["processed"] == 0 or current["processed"] != current["ready"]:
        return False
    # on_train_batch_end: the batch is processed but not yet completed, and the logger's step not yet counted.
    if batch["total"]["completed"] < batch["total"]["processed"]:
        batch["total"]["completed"] = batch["total"]["processed"]
        state = fit.setdefault("epoch_loop.state_dict", {})
        state["_batches_that_stepped"] = state.get("_batches_that_stepped", 0) + 1
    for part in ("total", "current"):
        started = epoch[part]["started"]
        epoch[part].update(ready=started, processed=started, completed=started)
    _zero_current(batch)
    batch["is_last_batch"] = False
    for key in _PER_EPOCH:
        if key in fit:
            _zero_current(fit[key])
    for progress in fit.get(_OPTIMIZER, {}).get("optimizer", {}).values():
        _zero_current(progress)
    return True


def _inside_step(loops: dict[str, Any]) -> int | None:
    """The batch index a checkpoint was written in the middle of (a signal handler), or ``None``."""
    batch = (loops.get(_FIT) or {}).get(_BATCH)
    if batch is None:
        return None
    current = batch["current"]
    return current["started"] - 1 if current["processed"] < current["started"] else None


class ExactResume(Callback):
    """Resume from any checkpoint Lightning writes exactly as if training had never stopped.

    Covers epoch-end checkpoints, ``last.ckpt``, ``ModelCheckpoint(every_n_train_steps=N)`` (also when a step
    lands on an epoch's last batch), SLURM ``hpc_ckpt_<n>.ckpt`` written by ``trainer.save_checkpoint`` and the
    ``lit-parallel`` step checkpoints, with plain ``DataLoader`` s (shuffled or not), stateful loaders and every
    strategy of the package: the resumed run trains the batches the uninterrupted run would have trained, in the
    same order, with the same random streams, and ends with bitwise equal parameters. How (see the module
    docstring): an epoch-end loop state is rewritten into the next epoch's start before Lightning loads it; the
    train iterator is rebuilt at ``on_train_start`` skipping the batches already trained; the train DataLoaders
    and their samplers draw from generators seeded ``seed + epoch`` instead of the global RNG; every rank's
    Python/NumPy/torch/CUDA RNG state travels with the checkpoint and is put back before the first resumed
    batch. The ``lit-parallel`` command adds it by default.

    Not exact (a warning says so): a checkpoint written inside a training step (an asynchronous signal handler)
    or between the micro-batches of an accumulation window; resuming with another number of ranks (the random
    streams restart from the seed); a sampler with a generator of your own (its state is not in the
    checkpoint). Random draws from the global RNG in hooks that run between a checkpoint and the next batch
    (``on_train_epoch_end``, ``on_train_epoch_start``) come out of a different place of the stream.

    Args:
        seed: base of the data-order generators; ``None`` takes ``PL_GLOBAL_SEED`` (set by
            ``seed_everything``) or 0, the seed Lightning gives its ``DistributedSampler``.

    Raises:
        ValueError: ``seed`` is not an integer.

    Example::

        Trainer(max_steps=1000, callbacks=[ExactResume(), ModelCheckpoint(every_n_epochs=1, save_last=True)])
        trainer.fit(model, DataLoader(dataset, batch_size=32, shuffle=True), ckpt_path="path/to/last.ckpt")
    """

    def __init__(self, seed: int | None = None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed={seed!r}; valid: an integer, or None for PL_GLOBAL_SEED (seed_everything).")
        self.seed = seed
        self._pending_rng: dict[str, Any] | None = None
        self._resumed = False
        self._loader_states: list[dict[str, Any]] = []
        self._assigned: dict[int, torch.Generator] = {}  # id(loader or sampler) -> the generator given to it
        self._warned_foreign = False

    # -- checkpoint ---------------------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = capture_rng_state()
        states: list[Any] = [state]
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        checkpoint[CHECKPOINT_KEY] = states

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Runs before the checkpoint is loaded, whichever strategy restores it when.
        self._resumed, self._loader_states, self._pending_rng = False, [], None

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Callbacks load before the loops (Trainer._run: _restore_modules_and_callbacks, then
        # restore_training_state), so the loop state can still be corrected here.
        loops = checkpoint.get("loops")
        if loops is not None and trainer.state.fn == TrainerFn.FITTING:
            self._resumed = True
            self._check_position(trainer, loops)
            mark_epoch_end_completed(loops)
            self._loader_states = list(loops.get(_FIT, {}).get("state_dict", {}).get("combined_loader", []))
        states = checkpoint.get(CHECKPOINT_KEY)
        if states is None:
            rank_zero_warn("The checkpoint holds no random state (it was written without ExactResume); dropout and "
                           "other random streams continue from this run's seed, not from where training stopped.")
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(f"The checkpoint holds the random state of {len(states)} ranks, this run has "
                           f"{trainer.world_size}; random streams (dropout) continue from the seed instead.")
            return
        self._pending_rng = states[trainer.global_rank]

    def _check_position(self, trainer: pl.Trainer, loops: dict[str, Any]) -> None:
        inside = _inside_step(loops)
        if inside is not None:
            rank_zero_warn(f"The checkpoint was written inside training step {inside} of its epoch (a signal "
                           "handler?): its parameters may hold part of that step. The resumed run trains the batch "
                           "again and is NOT exact; write checkpoints at step boundaries (ModelCheckpoint, or "
                           "trainer.save_checkpoint from on_train_batch_end).")
            return
        batch = loops.get(_FIT, {}).get(_BATCH)
        done = 0 if batch is None else batch["current"]["processed"]
        if done % trainer.accumulate_grad_batches and not batch.get("is_last_batch"):
            rank_zero_warn(f"The checkpoint was written after {done} batches of the epoch, inside an accumulation "
                           f"window of accumulate_grad_batches={trainer.accumulate_grad_batches}: the gradients "
                           "accumulated so far are not in it, and the resumed run is NOT exact.")

    # -- data order ---------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seed_val_loaders(trainer)
        self._restart_train_iterator(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning creates the iterator of every epoch but the first right after this hook.
        self._seed_train_loaders(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._seed_val_loaders(trainer)  # the next validation's iterator is created before its hooks run

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:
            restore_rng_state(self._pending_rng)
            self._pending_rng = None

    def _base_seed(self) -> int:
        return self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _assign(self, owner: Any, seed: int) -> bool:
        """Give ``owner`` (a loader or sampler) a fresh generator, unless it holds one of its own."""
        if owner.generator is not None and owner.generator is not self._assigned.get(id(owner)):
            return False
        owner.generator = self._assigned[id(owner)] = torch.Generator().manual_seed(seed)
        return True

    def _seed_loader(self, loader: Any, seed: int) -> None:
        if not isinstance(loader, DataLoader):
            return
        self._assign(loader, seed)  # the iterator draws its workers' base seed from it
        samplers = {id(s): s for s in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)) if s is not None}
        for sampler in samplers.values():
            if not hasattr(sampler, "generator"):
                continue  # DistributedSampler: its order is already a function of (seed, epoch)
            if not self._assign(sampler, seed) and not self._warned_foreign:
                self._warned_foreign = True
                rank_zero_warn(f"The sampler {type(sampler).__name__} of a dataloader has a generator of its own; "
                               "its state is not in checkpoints, so the data order after a resume differs from an "
                               "uninterrupted run. Leave `generator` unset and ExactResume seeds it with seed + epoch.")

    def _train_loaders(self, trainer: pl.Trainer) -> list[Any]:
        combined = getattr(trainer.fit_loop, "_combined_loader", None)
        return [] if combined is None else list(combined.flattened)

    def _seed_train_loaders(self, trainer: pl.Trainer) -> None:
        epoch = trainer.fit_loop.epoch_progress.current.processed
        for loader in self._train_loaders(trainer):
            self._seed_loader(loader, self._base_seed() + epoch)

    def _seed_val_loaders(self, trainer: pl.Trainer) -> None:
        combined = getattr(trainer.fit_loop.epoch_loop.val_loop, "_combined_loader", None)
        for loader in [] if combined is None else combined.flattened:
            self._seed_loader(loader, self._base_seed())

    def _restart_train_iterator(self, trainer: pl.Trainer) -> None:
        """Rebuild the train iterator Lightning created before any callback ran, at the resumed position.

        Lightning creates it in ``FitLoop.setup_data``, before ``on_train_start``, from the global RNG, with
        the sampler's epoch not yet set (a multi-worker loader fetches its first indices right then), and, for
        a loader without state, from the epoch's first batch.
        """
        fit_loop = trainer.fit_loop
        fetcher = getattr(fit_loop, "_data_fetcher", None)
        loaders = self._train_loaders(trainer)
        if fetcher is None or not loaders:
            return
        epoch = fit_loop.epoch_progress.current.processed
        done = fit_loop.epoch_loop.batch_progress.current.processed if self._resumed else 0
        self._seed_train_loaders(trainer)
        for loader in loaders:
            _set_sampler_epoch(loader, epoch)
        stateful = [loader for loader in loaders if isinstance(loader, _Stateful)]
        if stateful:
            if self._loader_states:  # consumed by the iterator Lightning created: apply them to ours
                fit_loop._combined_loader._load_state_dicts(self._loader_states)
            if len(stateful) != len(loaders) and done:
                rank_zero_warn("Some train dataloaders have state_dict/load_state_dict and some do not; only the "
                               f"stateful ones resume at batch {done} of the epoch, the others restart it.")
            iter(fetcher)
            return
        unskippable = [loader for loader in loaders if not isinstance(loader, DataLoader) or _is_iterable(loader)]
        if unskippable and done:
            rank_zero_warn(f"Resuming at batch {done} of an epoch of a train dataloader that is neither a map-style "
                           "DataLoader nor has state_dict/load_state_dict: it restarts the epoch from its first "
                           "batch (NOT exact). Give it state_dict/load_state_dict (e.g. torchdata's "
                           "StatefulDataLoader).")
            done = 0
        with _skip_batches(loaders, done):
            iter(fetcher)
        fetcher.reset()  # its length, taken inside the window, counted only the batches left


def _is_iterable(loader: DataLoader) -> bool:
    return isinstance(loader.dataset, torch.utils.data.IterableDataset)


@contextmanager
def _skip_batches(loaders: list[DataLoader], skip: int) -> Iterator[None]:
    """Make iterators created inside the block start ``skip`` batches into the epoch, at the index level.

    A DataLoader reads its index sampler when an iterator is created (a worker iterator dispatches its first
    indices right then), and forbids setting the sampler after construction, hence the direct attribute swap,
    undone on exit; a persistent-worker iterator keeps the unwrapped sampler for its next epochs.
    """
    if skip <= 0:
        yield
        return
    swapped = []
    for loader in loaders:
        name = "batch_sampler" if loader._auto_collation else "sampler"
        original = getattr(loader, name)
        if getattr(loader, "_iterator", None) is not None:
            loader._iterator = None  # persistent workers: build a fresh iterator that reads the skipping sampler
        object.__setattr__(loader, name, _SkipFirst(original, skip))
        swapped.append((loader, name, original))
    try:
        yield
    finally:
        for loader, name, original in swapped:
            object.__setattr__(loader, name, original)
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None:
                iterator._index_sampler = original
