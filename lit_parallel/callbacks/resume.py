"""Exact resumption: every rank's random-number state travels with the checkpoint."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lit_parallel.checkpointing import capture_rng_state, restore_rng_state

__all__ = ["ExactResume"]

CHECKPOINT_KEY = "rng_states"


class ExactResume(Callback):
    """Save every rank's Python/NumPy/torch/CUDA RNG state; restore it when training resumes.

    Lightning checkpoints hold the model, optimizers, schedulers, precision (loss scaler), loops and
    stateful dataloaders, but not the random state, so dropout masks after a resume differ from an
    uninterrupted run. This callback gathers each rank's state into the checkpoint (only rank 0 writes
    it) and, on resume with the same world size, puts it back right before the first training batch,
    which is the point at which it was captured. The ``lit-parallel`` command adds it by default.

    Example::

        Trainer(callbacks=[ExactResume(), ModelCheckpoint(every_n_train_steps=100)])
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = capture_rng_state()
        states: list[Any] = [state]
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        checkpoint[CHECKPOINT_KEY] = states

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(CHECKPOINT_KEY)
        if states is None:
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(f"The checkpoint holds the random state of {len(states)} ranks, this run has "
                           f"{trainer.world_size}; random streams (dropout) continue from the seed instead.")
            return
        self._pending = states[trainer.global_rank]

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            restore_rng_state(self._pending)
            self._pending = None
