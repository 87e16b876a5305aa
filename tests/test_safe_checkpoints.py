"""Loading a checkpoint never runs code from it: crafted meta.pt, .ckpt and DCP .metadata files (each would
create a marker file when unpickled) are refused by name, the marker never appears, and ckpt_path=auto
(find_resume_checkpoint) falls back to the previous complete checkpoint."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from lit_parallel import CompressedDDPStrategy
from lit_parallel.checkpointing import checkpoint_problem, find_resume_checkpoint, inspect, main
from lit_parallel.parallel.safe_load import (
    SafeFileSystemReader,
    UnsafeCheckpointError,
    load_dcp_metadata,
    safe_torch_load,
)
from lit_parallel.parallel.sharded_checkpoint import META_FILE, load_sharded, read_meta


class _Payload:
    """Unpickling it calls ``open(marker, "w")``: the file appearing means code from the checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _state() -> dict:
    torch.manual_seed(0)
    return {"state_dict": nn.Linear(3, 2).state_dict(), "global_step": 4, "epoch": 0}


def _ckpt(path: Path, marker: Path | None = None) -> Path:
    state = _state()
    if marker is not None:
        state["hyper_parameters"] = {"net": _Payload(marker)}
    torch.save(state, path)
    return path


def _dcp_folder(path: Path, meta_marker: Path | None = None, metadata_marker: Path | None = None) -> Path:
    dcp.save({"model": nn.Linear(3, 2).state_dict()}, checkpoint_id=path)  # one process, no group needed
    meta = {"global_step": 6, "parallel_layout": {"tp": 1, "pp": 1, "dp": 1}}
    if meta_marker is not None:
        meta["loops"] = _Payload(meta_marker)
    torch.save(meta, path / META_FILE)
    if metadata_marker is not None:
        with open(path / ".metadata", "wb") as handle:
            pickle.dump(_Payload(metadata_marker), handle)
    return path


def test_crafted_meta_pt_is_refused(tmp_path):
    marker = tmp_path / "ran"
    folder = _dcp_folder(tmp_path / "step=6", meta_marker=marker)
    with pytest.raises(UnsafeCheckpointError, match=r"meta.pt refers to \['io.open'\]") as info:
        read_meta(folder)
    assert info.value.globals == ["io.open"]
    assert "io.open" in checkpoint_problem(folder)
    assert not marker.exists()


def test_crafted_dcp_metadata_is_refused(tmp_path):
    marker = tmp_path / "ran"
    folder = _dcp_folder(tmp_path / "step=6", metadata_marker=marker)
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata refers to \['io.open'\]"):
        load_dcp_metadata(folder)
    with pytest.raises(UnsafeCheckpointError, match="io.open"):
        SafeFileSystemReader(folder).read_metadata()
    with pytest.raises(UnsafeCheckpointError, match="io.open"):
        load_sharded(folder, {"model": nn.Linear(3, 2).state_dict()})
    assert "io.open" in checkpoint_problem(folder)
    assert not marker.exists()


def test_crafted_ckpt_is_refused_by_every_load(tmp_path):
    marker = tmp_path / "ran"
    path = _ckpt(tmp_path / "epoch=0-step=4.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"epoch=0-step=4.ckpt refers to \['io.open'\]"):
        safe_torch_load(path)
    with pytest.raises(UnsafeCheckpointError, match="io.open"):
        CompressedDDPStrategy().load_checkpoint(path, weights_only=False)  # weights_only=False is overridden
    assert "io.open" in checkpoint_problem(path)
    assert not marker.exists()


def test_auto_resume_skips_crafted_checkpoints(tmp_path):
    marker = tmp_path / "ran"
    good = _ckpt(tmp_path / "epoch=0-step=4.ckpt")
    good_folder = _dcp_folder(tmp_path / "hybrid" / "step=6")
    time.sleep(0.01)
    bad = _ckpt(tmp_path / "epoch=0-step=8.ckpt", marker)
    os.utime(good, (time.time() - 20, time.time() - 20))
    for p in good_folder.iterdir():
        os.utime(p, (time.time() - 10, time.time() - 10))
    os.utime(good_folder, (time.time() - 10, time.time() - 10))
    with pytest.warns(UserWarning, match=r"epoch=0-step=8.ckpt.*io.open"):
        assert find_resume_checkpoint(tmp_path) == good_folder
    _dcp_folder(tmp_path / "hybrid" / "step=9", meta_marker=marker)
    os.unlink(good_folder / META_FILE)  # the folder becomes incomplete: fall back to the .ckpt
    with pytest.warns(UserWarning, match=r"step=9.*io.open"):
        assert find_resume_checkpoint(tmp_path) == good
    assert not marker.exists()
    assert bad.exists()


def test_inspect_reports_without_running(tmp_path, capsys):
    marker = tmp_path / "ran"
    good = _ckpt(tmp_path / "good.ckpt")
    report = inspect(good)
    assert report["global_step"] == 4 and report["unsafe"] == [] and report["problem"] is None
    assert report["tensors"] == 2 and report["bytes"] == (6 + 2) * 4
    folder = inspect(_dcp_folder(tmp_path / "step=6"))
    assert folder["global_step"] == 6 and folder["layout"] == {"tp": 1, "pp": 1, "dp": 1} and folder["tensors"] == 2
    evil = inspect(_ckpt(tmp_path / "evil.ckpt", marker))
    assert evil["unsafe"] == ["io.open"] and "global_step" not in evil
    assert inspect(_dcp_folder(tmp_path / "evil_meta", metadata_marker=marker))["unsafe"] == ["io.open"]
    assert main([str(good)]) == 0
    assert main([str(tmp_path / "evil.ckpt")]) == 1
    assert "UNSAFE: refers to ['io.open']" in capsys.readouterr().out
    assert not marker.exists()
