"""Loading checkpoints without running code from them.

A pickle can name any importable callable and have it called while it is read, so a checkpoint from a shared
filesystem or a download could run code on every rank at resume. Every load in this project goes through here:

- ``torch.save`` files (Lightning ``.ckpt``, the hybrid strategy's ``meta.pt`` and dp-sync files):
  :func:`safe_torch_load` lists the file's globals *without unpickling* (torch's
  ``get_unsafe_globals_in_checkpoint``), refuses any outside :data:`SAFE_GLOBALS` with the file and the global
  named, then loads with ``weights_only=True``.
- DCP ``.metadata`` (which torch 2.13's ``FileSystemReader`` reads with plain ``pickle.load``):
  :func:`load_dcp_metadata` / :class:`SafeFileSystemReader` unpickle it with :class:`RestrictedUnpickler`,
  which resolves only DCP's own metadata classes, ``torch.Size``, dtypes and layouts, and paths.

Pure torch: no Lightning import.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

from lit_parallel.errors import ConfigurationError

__all__ = [
    "DCP_METADATA_GLOBALS",
    "SAFE_GLOBALS",
    "RestrictedUnpickler",
    "SafeFileSystemReader",
    "UnsafeCheckpointError",
    "check_safe",
    "load_dcp_metadata",
    "safe_torch_load",
    "unsafe_globals",
]

SAFE_GLOBALS: tuple[Any, ...] = ()
"""Types beyond torch's weights-only set that the project's ``torch.save`` files need: none. Every file it
writes holds plain Python types, tensors and numpy-free RNG states (docs/fault_tolerance.md)."""

_DCP_METADATA_CLASSES = ("Metadata", "ChunkStorageMetadata", "TensorProperties", "TensorStorageMetadata",
                         "BytesStorageMetadata", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING")
DCP_METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("torch.distributed.checkpoint.metadata", name) for name in _DCP_METADATA_CLASSES}
    | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("builtins", "set"),
       ("builtins", "frozenset"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
       ("pathlib", "PureWindowsPath")}
)
"""The globals a DCP ``.metadata`` file may name (plus every ``torch.<dtype>``)."""


class UnsafeCheckpointError(ConfigurationError):
    """A checkpoint names a global outside the allow-list; nothing from it was loaded or run.

    Attributes:
        path: the refused file.
        globals: the offending globals, ``"module.name"``.
    """

    def __init__(self, path: Path, names: list[str]) -> None:
        super().__init__(
            f"{path} refers to {names}, outside the allow-list of checkpoint types; loading it could run code, so "
            "it is refused (nothing was unpickled). Inspect it with `lit-parallel-inspect`; if you trust it and it "
            "holds your own types, add them with torch.serialization.add_safe_globals before loading."
        )
        self.path, self.globals = path, names

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across run_distributed and multiprocessing
        return type(self), (self.path, self.globals)


def _is_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`DCP_METADATA_GLOBALS` and torch dtypes; anything else raises.

    Args:
        file: the open binary file.
        path: its name, for the error message.
    """

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in DCP_METADATA_GLOBALS or _is_dtype(module, name):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(self.path, [f"{module}.{name}"])


def load_dcp_metadata(folder: str | Path) -> Metadata:
    """The ``.metadata`` of a DCP folder, read with :class:`RestrictedUnpickler`.

    Raises:
        UnsafeCheckpointError: the file names a global outside the allow-list (nothing of it is run).
        FileNotFoundError: no ``.metadata``.
    """
    path = Path(folder) / ".metadata"
    with path.open("rb") as handle:
        metadata = RestrictedUnpickler(handle, path).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(path, [f"{type(metadata).__module__}.{type(metadata).__qualname__}"])
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """torch's ``FileSystemReader`` reading ``.metadata`` with :class:`RestrictedUnpickler` (shards are tensors,
    which torch reads with ``weights_only=True`` already)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        path = Path(self._get_metadata_path(rank))
        with path.open("rb") as handle:
            metadata = RestrictedUnpickler(handle, path).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def unsafe_globals(path: str | Path) -> list[str]:
    """Globals of a ``torch.save`` file outside torch's weights-only set and :data:`SAFE_GLOBALS`, found
    without unpickling it."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if g not in allowed]


def check_safe(path: str | Path) -> None:
    """Raise :class:`UnsafeCheckpointError`, naming the globals, if a ``torch.save`` file needs any outside the
    allow-list (read from its opcodes; nothing is unpickled)."""
    bad = unsafe_globals(path)
    if bad:
        raise UnsafeCheckpointError(Path(path), bad)


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, refusing first, by name, a file that needs anything else.

    Raises:
        UnsafeCheckpointError: the file names globals outside the allow-list (nothing of it is run).
    """
    check_safe(path)
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        return torch.load(path, map_location=map_location, weights_only=True)
