"""Sharded checkpoints as one atomic folder: a DCP checkpoint plus the trainer's own state.

Pure torch (no Lightning). Every rank writes its shards into ``<path>.incomplete``; once all have finished,
one rank renames the folder to ``<path>``, so a folder under the final name is always complete and a crash
leaves only an ``.incomplete`` folder that is never loaded::

    save_sharded(path, {"model": msd, "optimizer_0": osd}, meta, is_writer=rank == 0, barrier=dist.barrier)
    meta = read_meta(path)
    load_sharded(path, state)          # in place, resharded into this run's layout

:func:`async_save_sharded` is the asynchronous variant: it returns once the state is copied to CPU and
writes, then renames, on a background thread (docs/fault_tolerance.md, "Asynchronous checkpoints").

Folder contents: DCP's ``.metadata`` and ``__<rank>_0.distcp`` shard files, :data:`META_FILE` (the trainer's
state: loops, schedulers, layout), and any per-rank files the caller adds (``rank_files``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter

from lit_parallel.parallel.async_checkpoint import incomplete_path, stage_to_cpu
from lit_parallel.parallel.safe_load import SafeFileSystemReader, load_dcp_metadata, safe_torch_load

__all__ = ["COMPRESSION_KEY", "DP_SYNC_FILE", "DP_SYNC_SHARD_FILE", "META_FILE", "REPLICA_KEY", "async_save_sharded",
           "load_sharded", "read_meta", "remove_path", "save_sharded"]

META_FILE = "meta.pt"
COMPRESSION_KEY = "gradient_compression"
REPLICA_KEY = "replica_dp{}"  # per-replica model/optimizer entries when the dp axis runs local SGD / DiLoCo
DP_SYNC_FILE = "dp_sync_tp{}_pp{}.pt"  # the dp-sync algorithm state of one (tp, pp) shard
DP_SYNC_SHARD_FILE = "dp_sync_tp{}_pp{}_shard{}.pt"  # the same, per FSDP2 dp_shard index (zero_stage 2-3)


def remove_path(path: Path) -> None:
    """Delete a checkpoint folder or file if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def save_sharded(path: Path, state: dict[str, Any], meta: dict[str, Any], *, is_writer: bool,
                 barrier: Callable[[], None], replica_key: str | None = None,
                 rank_files: dict[str, Any] | None = None) -> None:
    """Write ``state`` (DCP, every rank its shards) and ``meta`` (one rank) into ``path``, atomically.

    Args:
        path: the final folder (replaced if it exists).
        state: this rank's state dict, DTensors for sharded entries.
        meta: the non-sharded state, written by the writer rank only.
        is_writer: whether this rank writes ``meta`` and renames the folder (one rank must).
        barrier: a barrier over every rank that saves.
        replica_key: store ``state`` under this key (replicas that differ keep separate entries).
        rank_files: extra ``torch.save`` files this rank writes into the folder, by file name.
    """
    import torch.distributed.checkpoint as dcp

    tmp = incomplete_path(path)
    if is_writer and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    dcp.save(state if replica_key is None else {replica_key: state}, checkpoint_id=tmp)
    for name, obj in (rank_files or {}).items():
        torch.save(obj, tmp / name)
    if is_writer:
        torch.save(meta, tmp / META_FILE)
    barrier()
    if is_writer:
        remove_path(path)
        os.replace(tmp, path)
    barrier()


class _PublishingWriter(FileSystemWriter):
    """DCP's file writer that also writes this rank's extra files, and on the coordinator publishes the folder.

    DCP calls :meth:`write_data` on every rank, then gathers the results on the coordinator, which calls
    :meth:`finish`: at that point every rank's shards *and* extra files are on disk, so the coordinator writes
    ``.metadata`` and :data:`META_FILE` and renames ``<path>.incomplete`` to ``<path>``, without a further
    collective or store round trip (``dcp.async_save`` offers no completion hook across ranks).
    """

    def __init__(self, tmp: Path, final: Path, rank_files: dict[str, Any], meta: dict[str, Any] | None) -> None:
        super().__init__(tmp)
        self._tmp, self._final, self._rank_files, self._meta = tmp, final, rank_files, meta

    def write_data(self, plan: Any, planner: Any) -> Any:
        for name, obj in self._rank_files.items():
            torch.save(obj, self._tmp / name)
        return super().write_data(plan, planner)

    def finish(self, metadata: Any, results: Any) -> None:
        super().finish(metadata, results)
        assert self._meta is not None, "the coordinator of an asynchronous save must be the writer rank"
        torch.save(self._meta, self._tmp / META_FILE)
        remove_path(self._final)
        os.replace(self._tmp, self._final)


def async_save_sharded(path: Path, state: dict[str, Any], meta: dict[str, Any], *, is_writer: bool,
                       barrier: Callable[[], None], process_group: dist.ProcessGroup | None,
                       replica_key: str | None = None, rank_files: dict[str, Any] | None = None) -> Future:
    """:func:`save_sharded`, returning once ``state``, ``meta`` and ``rank_files`` are copied to CPU memory.

    ``torch.distributed.checkpoint.async_save`` stages ``state`` (DCP's stager allocates new CPU tensors and
    copies into them, so training may update the parameters right away) and writes it on a background thread;
    its planning collectives run on ``process_group``, which must be a CPU (gloo) group used by nothing else,
    so they never interleave with training collectives. The folder is renamed to ``path`` by the writer rank's
    background thread once every rank has written (see :class:`_PublishingWriter`); a job that dies before
    that leaves only ``<path>.incomplete``.

    Args:
        path: the final folder (replaced if it exists).
        state: this rank's state dict, DTensors for sharded entries.
        meta: the non-sharded state, written by the writer rank only.
        is_writer: whether this rank is the coordinator (rank 0 of ``process_group``) that writes ``meta``
            and renames the folder.
        barrier: a barrier over every rank that saves (run once, before any write, after a stale
            ``.incomplete`` folder is removed).
        process_group: the dedicated checkpoint group (``None``: the default group, for tests only).
        replica_key: store ``state`` under this key.
        rank_files: extra ``torch.save`` files this rank writes into the folder, by file name.

    Returns:
        The future of the background write; ``result()`` raises what the write raised.

    Example::

        group = dist.new_group(backend="gloo")    # once, collectively, at setup
        future = async_save_sharded(path, state, meta, is_writer=rank == 0, barrier=dist.barrier,
                                    process_group=group)
        ...                                       # train on
        future.result()                           # the folder is complete under its final name
    """
    import torch.distributed.checkpoint as dcp

    tmp = incomplete_path(path)
    if is_writer and tmp.exists():
        shutil.rmtree(tmp)  # the leftover of a job that died while writing this name
    barrier()
    writer = _PublishingWriter(tmp, path, stage_to_cpu(rank_files or {}), stage_to_cpu(meta) if is_writer else None)
    return dcp.async_save(state if replica_key is None else {replica_key: state}, storage_writer=writer,
                          process_group=process_group)


def read_meta(path: Path, owner: str = "sharded") -> dict[str, Any]:
    """The trainer state of a complete checkpoint folder.

    Raises:
        FileNotFoundError: ``path`` is not a complete folder (``.metadata`` and :data:`META_FILE`).
        UnsafeCheckpointError: ``.metadata`` or :data:`META_FILE` names a global outside the allow-list (nothing
            is run).
    """
    if not (path / ".metadata").is_file() or not (path / META_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not a complete {owner} checkpoint (a DCP folder with .metadata and {META_FILE}); "
            "incomplete checkpoints end in '.incomplete' and are never loaded."
        )
    load_dcp_metadata(path)  # refuses a crafted .metadata before any state is touched
    return safe_torch_load(path / META_FILE)


def load_sharded(path: Path, state: dict[str, Any], replica_key: str | None = None) -> None:
    """Fill ``state`` in place from the folder, resharded to the DTensor layouts ``state`` holds.

    Raises:
        UnsafeCheckpointError: ``.metadata`` names a global outside DCP's own classes (nothing is run).
    """
    import torch.distributed.checkpoint as dcp

    load_dcp_metadata(path)  # our error, by name, before DCP's collective wraps it
    dcp.load(state if replica_key is None else {replica_key: state}, storage_reader=SafeFileSystemReader(path))
