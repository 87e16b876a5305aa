"""Finding the newest *complete* checkpoint, and per-rank RNG state for exact resumption.

Two kinds of checkpoint are written by this project's strategies:

* a single ``torch.save`` file (``*.ckpt``; Lightning's DDP family, :class:`CompressedDDPStrategy`,
  :class:`LocalSGDStrategy`, :class:`DiLoCoStrategy`), which is a zip archive with a CRC per member;
* a torch distributed-checkpoint folder (:class:`HybridParallelStrategy`): ``.metadata`` naming every
  shard file with the byte range of each tensor, plus ``meta.pt`` (the Lightning part, itself a zip).

:func:`checkpoint_problem` verifies either kind without loading tensors into the model: every zip CRC,
every shard file named by the metadata, and every byte range inside those files. :func:`find_resume_checkpoint`
walks a directory, newest first, and returns the first checkpoint without a problem, warning (with the
file's name and the reason) about every newer one it skips. A checkpoint is therefore never loaded half.
"""

from __future__ import annotations

import os
import pickle
import random
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from lit_parallel.parallel.sharded_checkpoint import META_FILE

__all__ = [
    "INCOMPLETE_SUFFIX",
    "capture_rng_state",
    "checkpoint_problem",
    "find_resume_checkpoint",
    "list_checkpoints",
    "restore_rng_state",
]

# Suffix of a checkpoint that is still being written (renamed away once complete on every rank).
INCOMPLETE_SUFFIX = ".incomplete"
_DCP_META = ".metadata"
_LIGHTNING_META = META_FILE


def _zip_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"{path.name} is not a readable torch.save archive ({type(err).__name__}: {err}); truncated?"
    if bad is not None:
        return f"member {bad!r} of {path.name} fails its CRC check"
    return None


def _dcp_problem(folder: Path) -> str | None:
    metadata_file = folder / _DCP_META
    if not metadata_file.is_file():
        return f"{_DCP_META} is missing"
    if not (folder / _LIGHTNING_META).is_file():
        return f"{_LIGHTNING_META} is missing"
    try:
        with open(metadata_file, "rb") as handle:
            metadata = pickle.load(handle)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a damaged file
        return f"{_DCP_META} cannot be read ({type(err).__name__}: {err})"
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        shard = folder / name
        if not shard.is_file():
            return f"shard {name} is missing"
        size = shard.stat().st_size
        if size < end:
            return f"shard {name} is truncated ({size} bytes, the metadata needs {end})"
    # meta.pt and any other torch.save file of the folder (e.g. the hybrid strategy's dp-sync state).
    for archive in [folder / _LIGHTNING_META, *sorted(p for p in folder.glob("*.pt") if p.name != _LIGHTNING_META)]:
        problem = _zip_problem(archive)
        if problem is not None:
            return problem
    return None


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with a checkpoint, or ``None`` when it is complete and intact."""
    path = Path(path)
    if path.name.endswith(INCOMPLETE_SUFFIX):
        return "it is still being written (or its writer died)"
    if path.is_dir():
        return _dcp_problem(path)
    if path.is_file():
        if path.stat().st_size == 0:
            return "the file is empty"
        return _zip_problem(path)
    return "it does not exist"


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Every checkpoint below ``root`` (files ``*.ckpt`` and DCP folders), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found: list[Path] = []
    for current, dirs, files in os.walk(root):
        here = Path(current)
        if (here / _DCP_META).exists() or here.name.endswith(INCOMPLETE_SUFFIX) or here.suffix == ".ckpt":
            if here != root:
                found.append(here)
            dirs[:] = []  # a checkpoint folder holds shards, not further checkpoints
            continue
        found.extend(here / name for name in files if name.endswith(".ckpt"))
    # Newest first; a folder's mtime changes on rename, so take the newest file inside it as well.
    return sorted(found, key=_mtime, reverse=True)


def _mtime(path: Path) -> float:
    try:
        if path.is_dir():
            return max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.iterdir()])
        return path.stat().st_mtime
    except OSError:
        return 0.0


def find_resume_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint below ``root``, or ``None`` when there is none.

    Every newer checkpoint that is incomplete, truncated or missing a shard is skipped with a
    :class:`UserWarning` that names it and says what is wrong.
    """
    for candidate in list_checkpoints(root):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        warnings.warn(f"Skipping checkpoint {candidate}: {problem}.", UserWarning, stacklevel=2)
    return None


def capture_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and CUDA random states."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": (version, list(internal), gauss), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        # Plain types and a tensor only, so checkpoints load with torch.load(weights_only=True).
        state["numpy"] = (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    except ImportError:  # pragma: no cover - numpy is a torch dependency in practice
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
