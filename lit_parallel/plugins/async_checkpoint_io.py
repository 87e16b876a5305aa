"""AsyncAtomicCheckpointIO: single-file Lightning checkpoints written in the background, published atomically.

Lightning glue over :mod:`lit_parallel.parallel.async_checkpoint` for the DDP-family strategies
(``CompressedDDPStrategy``, ``LocalSGDStrategy``, ``DiLoCoStrategy``, Lightning's ``DDPStrategy``), which write
one ``torch.save`` file through their ``checkpoint_io``. ``HybridParallelStrategy`` writes DCP folders itself
(its ``async_checkpoint=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

from lit_parallel.parallel.async_checkpoint import (
    BackgroundCheckpointWriter,
    check_writable,
    save_file_atomic,
    stage_to_cpu,
)
from lit_parallel.parallel.sharded_checkpoint import remove_path

__all__ = ["AsyncAtomicCheckpointIO", "check_checkpoint_dirs", "wait_for_checkpoint"]


class AsyncAtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` on a background thread into ``<name>.incomplete``, renamed to ``<name>`` when written.

    ``save_checkpoint`` returns once every tensor of the checkpoint is copied to new CPU memory and everything
    else is deep-copied, so training may step right after. At most one write is in flight: the next save waits
    for the previous one. ``remove_checkpoint`` (``ModelCheckpoint``'s ``save_top_k`` rotation, the
    ``keep_checkpoints`` of ``lit-parallel``) is held back until the pending write is published, so a job killed
    during the write still has its previous complete checkpoint. ``teardown`` (end of fit) waits for the write.

    Lightning's ``AsyncCheckpointIO`` is not used: it clones only the tensors (other state is written by
    reference while training goes on) and deletes the previous checkpoint while the new one is still being
    written.

    Example::

        trainer = Trainer(strategy=CompressedDDPStrategy(checkpoint_io=AsyncAtomicCheckpointIO()),
                          callbacks=[ModelCheckpoint(every_n_train_steps=100, save_top_k=1)])
    """

    def __init__(self) -> None:
        self._writer = BackgroundCheckpointWriter(remove_path)

    @property
    def pending(self) -> bool:
        """Whether a write is in flight (or finished and not yet waited for)."""
        return self._writer.pending

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Stage ``checkpoint`` to CPU, then write it on the background thread.

        Raises:
            TypeError: ``storage_options`` is given (not supported).
            Exception: what the previous background write raised.
        """
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options.")
        self._writer.wait()
        self._writer.submit(save_file_atomic, stage_to_cpu(checkpoint), Path(path))

    @override
    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        self._writer.wait()  # the file may be this run's own checkpoint, still in flight
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    @override
    def remove_checkpoint(self, path: _PATH) -> None:
        """Delete ``path`` now, or once the pending write is published."""
        self._writer.remove(Path(path))

    @override
    def teardown(self) -> None:
        self._writer.close()


def check_checkpoint_dirs(trainer: Any) -> None:
    """Refuse, before training, checkpoint directories of ``trainer`` that cannot be written.

    Checks every ``ModelCheckpoint``'s ``dirpath`` (or the trainer's ``default_root_dir``, under which it
    defaults). Remote (``scheme://``) paths are left to their filesystem.

    Raises:
        ConfigurationError: naming the directory.

    Example::

        check_checkpoint_dirs(strategy.lightning_module.trainer)   # in setup_environment
    """
    if trainer is None:
        return
    dirs = [getattr(cb, "dirpath", None) or trainer.default_root_dir for cb in trainer.checkpoint_callbacks]
    for directory in dict.fromkeys(str(d) for d in dirs):
        if "://" not in directory:
            check_writable(directory)


def wait_for_checkpoint(strategy: Any) -> None:
    """Block until this rank's pending asynchronous checkpoint is published (a no-op for synchronous saves).

    For code that must not go on before a checkpoint is on disk, e.g. the preemption callback before it exits.

    Example::

        trainer.save_checkpoint(path)
        wait_for_checkpoint(trainer.strategy)
    """
    writer = getattr(strategy, "_checkpoint_writer", None)  # HybridParallelStrategy(async_checkpoint=True)
    if writer is not None:
        writer.wait()
    io = getattr(strategy, "checkpoint_io", None)
    if isinstance(io, AsyncAtomicCheckpointIO):
        io._writer.wait()
