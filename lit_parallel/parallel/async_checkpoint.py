"""Asynchronous, atomic checkpoints: copy to CPU now, write in the background, publish by a rename.

Pure torch (no Lightning). Training blocks only while the state is copied to CPU memory ("staging"); the
write runs on a background thread into a temporary name (``<name>.incomplete``) that is renamed to the final
name once everything is on disk. A job killed during the background write therefore leaves only an
``.incomplete`` leftover, which :func:`lit_parallel.checkpointing.find_resume_checkpoint` never picks, and the
previous checkpoint: :class:`BackgroundCheckpointWriter` holds back deletions of older checkpoints (a rotation
such as ``ModelCheckpoint(save_top_k=k)``) until the pending write is published::

    writer = BackgroundCheckpointWriter()
    writer.submit(save_file_atomic, stage_to_cpu(checkpoint), path)   # returns once the copy is made
    writer.remove(older_path)                                         # queued while the write is pending
    writer.wait()                                                     # publishes, then deletes older_path

Folder checkpoints of many ranks (DCP) use the same writer with the future of
:func:`lit_parallel.parallel.sharded_checkpoint.async_save_sharded`.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from lit_parallel.errors import ConfigurationError

__all__ = ["INCOMPLETE_SUFFIX", "BackgroundCheckpointWriter", "check_writable", "incomplete_path",
           "save_file_atomic", "stage_to_cpu"]

# Suffix of a checkpoint that is still being written (or whose writer died); never loaded.
INCOMPLETE_SUFFIX = ".incomplete"


def incomplete_path(path: str | os.PathLike[str]) -> Path:
    """The temporary name ``path`` is written under until it is complete."""
    path = Path(path)
    return path.with_name(path.name + INCOMPLETE_SUFFIX)


def stage_to_cpu(obj: Any, _memo: dict[Any, Any] | None = None) -> Any:
    """A copy of ``obj`` that training can no longer change: every tensor copied to new CPU memory.

    Dicts, lists and tuples are rebuilt (their types kept), tensors are copied (also CPU tensors: ``.to("cpu")``
    would return the same tensor, which the optimizer keeps updating in place), anything else is deep-copied.
    Tensors that share a storage (tied weights: ``state_dict()`` returns one detached tensor per name) share
    their copy, so the file is as large as a synchronous ``torch.save`` of ``obj``, which also writes each storage
    once. Lightning's ``AsyncCheckpointIO`` clones tensors only, one by one, and keeps the rest by reference;
    torch's DCP stagers take DCP state dicts, not a Lightning checkpoint with arbitrary callback state.

    Example::

        staged = stage_to_cpu(checkpoint)   # training may step right after this returns
    """
    memo: dict[Any, Any] = {} if _memo is None else _memo
    if isinstance(obj, torch.Tensor):
        return _stage_tensor(obj, memo)
    if isinstance(obj, dict):
        staged = copy.copy(obj)  # keeps OrderedDict and friends
        for key, value in obj.items():
            staged[key] = stage_to_cpu(value, memo)
        return staged
    if isinstance(obj, list):
        return [stage_to_cpu(v, memo) for v in obj]
    if isinstance(obj, tuple):
        values = [stage_to_cpu(v, memo) for v in obj]
        return type(obj)(*values) if hasattr(obj, "_fields") else type(obj)(values)
    return copy.deepcopy(obj)


def _stage_tensor(tensor: torch.Tensor, memo: dict[Any, Any]) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.layout != torch.strided or type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return tensor.to("cpu", copy=True)  # sparse, quantized, subclasses: copied on their own
    storage = tensor.untyped_storage()
    key = (tensor.device, storage.data_ptr(), storage.nbytes())
    staged = memo.get(key)
    if staged is None:
        staged = memo[key] = storage.cpu() if tensor.device.type != "cpu" else storage.clone()
    return torch.empty(0, dtype=tensor.dtype).set_(staged, tensor.storage_offset(), tensor.size(), tensor.stride())


def save_file_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` into ``<path>.incomplete``, flush it to disk, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = incomplete_path(path)
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def check_writable(directory: str | os.PathLike[str], what: str = "checkpoint directory") -> None:
    """Refuse a directory checkpoints cannot be written into, before anything runs.

    The directory need not exist yet: its nearest existing ancestor must be a directory in which a file can be
    created (tried for real, so a read-only mount is caught even for root).

    Raises:
        ConfigurationError: naming ``directory`` and the reason.

    Example::

        check_writable("outputs/run/checkpoints")
    """
    directory = Path(directory).absolute()
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    reason = None
    if not existing.is_dir():
        reason = f"{existing} is not a directory"
    else:
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as err:
            reason = f"cannot create a file in {existing} ({err.strerror or err})"
    if reason is not None:
        raise ConfigurationError(f"{what} {str(directory)!r} is not writable: {reason}. Valid: a directory this "
                                 "process can create files in.")


class BackgroundCheckpointWriter:
    """One checkpoint write in flight at a time; deletions of older checkpoints wait until it is published.

    Errors of a background write are raised by the next :meth:`submit`, :meth:`track`, :meth:`remove` or
    :meth:`wait`; the deletions queued behind a failed write are dropped (the older checkpoints stay).

    Args:
        remove: deletes one checkpoint (a file or folder).

    Example::

        writer = BackgroundCheckpointWriter(remove_path)
        writer.submit(save_file_atomic, stage_to_cpu(state), "ckpt/step10.ckpt")
        ...
        writer.close()   # end of training: wait for the write, run the queued deletions
    """

    __slots__ = ("_executor", "_pending", "_removals", "_remove")

    def __init__(self, remove: Callable[[Path], None]) -> None:
        self._remove = remove
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._removals: list[Path] = []

    @property
    def pending(self) -> bool:
        """Whether a write was started and not yet waited for."""
        return self._pending is not None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Wait for the previous write, then run ``fn(*args)`` on the background thread."""
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lit_parallel_checkpoint")
        self._pending = self._executor.submit(fn, *args)

    def track(self, future: Future) -> None:
        """Make ``future`` (a write started elsewhere, e.g. by DCP) the pending write."""
        self.wait()
        self._pending = future

    def remove(self, path: str | os.PathLike[str]) -> None:
        """Delete ``path`` now, or once the pending write is published."""
        if self._pending is not None and not self._pending.done():
            self._removals.append(Path(path))
            return
        self.wait()
        self._remove(Path(path))

    def poll(self) -> None:
        """Finish a write that has completed (raise its error, run the queued deletions) without blocking."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def wait(self) -> None:
        """Block until the pending write is published, then run the queued deletions.

        Raises:
            Exception: whatever the background write raised (the queued deletions are dropped).
        """
        pending, self._pending = self._pending, None
        removals, self._removals = self._removals, []
        if pending is not None:
            pending.result()
        for path in removals:
            self._remove(path)

    def close(self) -> None:
        """:meth:`wait`, then stop the background thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __getstate__(self) -> dict[str, Any]:
        # Strategies and checkpoint IOs get pickled by spawn launchers before training: nothing is in flight then.
        return {"_remove": self._remove, "_executor": None, "_pending": None, "_removals": []}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
