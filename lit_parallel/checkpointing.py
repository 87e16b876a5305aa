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
import random
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from lit_parallel.parallel.async_checkpoint import INCOMPLETE_SUFFIX
from lit_parallel.parallel.safe_load import UnsafeCheckpointError, load_dcp_metadata, unsafe_globals
from lit_parallel.parallel.sharded_checkpoint import META_FILE

__all__ = [
    "INCOMPLETE_SUFFIX",
    "capture_rng_state",
    "checkpoint_problem",
    "find_resume_checkpoint",
    "inspect",
    "list_checkpoints",
    "restore_rng_state",
]

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
    unsafe = unsafe_globals(path)  # read from the pickle's opcodes, nothing is run
    if unsafe:
        return f"{path.name} refers to {unsafe}, outside the allow-list of checkpoint types (it could run code)"
    return None


def _dcp_problem(folder: Path) -> str | None:
    metadata_file = folder / _DCP_META
    if not metadata_file.is_file():
        return f"{_DCP_META} is missing"
    if not (folder / _LIGHTNING_META).is_file():
        return f"{_LIGHTNING_META} is missing"
    try:
        metadata = load_dcp_metadata(folder)  # restricted: only DCP's own classes are resolved
    except UnsafeCheckpointError as err:
        return str(err)
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
        # A single-file checkpoint still being written (or whose writer died) is listed, and then skipped by name.
        found.extend(here / name for name in files if name.endswith((".ckpt", ".ckpt" + INCOMPLETE_SUFFIX)))
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


# -- inspecting a checkpoint before trusting it -----------------------------------------------------------
def _tensor_summary(tree: Any) -> tuple[int, int]:
    """(number of tensors, bytes) in a nested state."""
    if isinstance(tree, torch.Tensor):
        return 1, tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        items = list(tree.values())
    elif isinstance(tree, list | tuple):
        items = list(tree)
    else:
        return 0, 0
    count = size = 0
    for item in items:
        c, s = _tensor_summary(item)
        count, size = count + c, size + s
    return count, size


def _trainer_state(state: dict[str, Any]) -> dict[str, Any]:
    keys = sorted(k for k in state if k not in ("state_dict", "optimizer_states"))
    return {"epoch": state.get("epoch"), "global_step": state.get("global_step"),
            "layout": state.get("parallel_layout"), "keys": keys,
            "callbacks": sorted(str(k) for k in (state.get("callbacks") or {}))}


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a checkpoint holds, read without running anything from it.

    Works on a ``.ckpt`` file and on a hybrid-strategy DCP folder. The pickles' globals are listed from their
    opcodes first; an unsafe checkpoint is reported (``"unsafe"``), not loaded. A safe one is read with
    ``weights_only=True`` (``.ckpt``, ``meta.pt``) and the restricted DCP unpickler (``.metadata``).

    Returns:
        ``{"path", "kind", "problem", "unsafe", "epoch", "global_step", "layout", "keys", "callbacks",
        "tensors", "bytes"}`` (the trainer-state fields are absent when the checkpoint is unsafe or damaged).

    Example::

        from lit_parallel.checkpointing import inspect
        inspect("outputs/mnist/checkpoints/last.ckpt")["global_step"]
    """
    from lit_parallel.parallel.safe_load import safe_torch_load

    path = Path(path)
    kind = "dcp" if path.is_dir() else "torch.save"
    report: dict[str, Any] = {"path": str(path), "kind": kind, "problem": checkpoint_problem(path), "unsafe": []}
    archives = [path / _LIGHTNING_META] if kind == "dcp" else [path]
    for archive in archives:
        if archive.is_file():
            try:
                report["unsafe"] += unsafe_globals(archive)
            except Exception:  # noqa: BLE001 - not a readable archive: reported as the problem
                pass
    metadata = None
    if kind == "dcp":
        try:
            metadata = load_dcp_metadata(path)
        except UnsafeCheckpointError as err:
            report["unsafe"] += err.globals
        except OSError:
            pass
    if report["unsafe"]:
        return report
    try:
        if kind == "dcp":
            report |= _trainer_state(safe_torch_load(path / _LIGHTNING_META))
            if metadata is None:
                raise FileNotFoundError(f"{path / _DCP_META} cannot be read")
            sizes = [m.size.numel() * m.properties.dtype.itemsize for m in metadata.state_dict_metadata.values()
                     if hasattr(m, "size")]
            report["tensors"], report["bytes"] = len(sizes), sum(sizes)
        else:
            state = safe_torch_load(path)
            report |= _trainer_state(state)
            report["tensors"], report["bytes"] = _tensor_summary(
                {"state_dict": state.get("state_dict"), "optimizer_states": state.get("optimizer_states")})
    except Exception as err:  # noqa: BLE001 - a damaged checkpoint is described, not raised
        report["problem"] = report["problem"] or f"{type(err).__name__}: {err}"
    return report


def main(argv: list[str] | None = None) -> int:
    """``lit-parallel-inspect PATH [PATH ...]``: print what each checkpoint holds; exit 1 if any is unsafe
    or damaged."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="lit-parallel-inspect", description=main.__doc__)
    parser.add_argument("paths", nargs="+", help="a .ckpt file or a hybrid-strategy checkpoint folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object per checkpoint")
    args = parser.parse_args(argv)
    status = 0
    for name in args.paths:
        report = inspect(name)
        bad = report["unsafe"] or report["problem"]
        status = status or int(bool(bad))
        if args.json:
            print(json.dumps(report, default=str))
            continue
        print(f"{report['path']} ({report['kind']})")
        if report["unsafe"]:
            print(f"  UNSAFE: refers to {report['unsafe']}; not loaded")
        if report["problem"]:
            print(f"  problem: {report['problem']}")
        for key in ("epoch", "global_step", "layout", "tensors", "bytes", "callbacks", "keys"):
            if key in report:
                print(f"  {key}: {report[key]}")
    return status
