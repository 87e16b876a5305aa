"""The lit-parallel command: runs, help, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from lit_parallel.cli import train
from lit_parallel.errors import ConfigurationError, MissingDataError

EXE = shutil.which("lit-parallel") or os.path.join(os.path.dirname(sys.executable), "lit-parallel")


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    # A Trainer run in this process may have left its rendezvous variables behind.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")}
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lit-parallel: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in errors[0]


def test_train_debug_recipe_directly(compose_cfg, tmp_path):
    result = train(compose_cfg("recipe=mnist_debug"))
    assert result["global_step"] == 5
    assert 0.0 <= result["test/acc"] <= 1.0
    assert json.loads((tmp_path / "summary.json").read_text())["global_step"] == 5
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "csv" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_runs_and_prints_summary(tmp_path):
    proc = _run("recipe=mnist_debug", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lit_parallel run summary" in proc.stdout
    assert "test/acc" in proc.stdout
    # The MLP has no example input, so nothing counted FLOPs: no "Total FLOPs: 0", but the parameters.
    assert "Total FLOPs" not in proc.stdout + proc.stderr and "Trainable params" in proc.stdout + proc.stderr
    assert f"lit-parallel: curves: {tmp_path / 'csv' / 'curves.png'}" in proc.stdout


def test_help_lists_groups():
    proc = _run("--help")
    assert proc.returncode == 0
    for group in ("trainer", "strategy", "precision", "model", "data", "callbacks", "recipe"):
        assert f"{group}:" in proc.stdout


def test_unknown_recipe():
    _assert_one_line_error(_run("recipe=nope"), "recipe='nope'", "mnist")


def test_too_many_devices(tmp_path):
    proc = _run("recipe=mnist_debug", "trainer.devices=4096", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    _assert_one_line_error(proc, "trainer.devices=4096", "valid: 1..")


def test_data_root_not_idx(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"not idx at all" * 10)
    proc = _run("recipe=mnist_debug", f"data.root={tmp_path}", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    _assert_one_line_error(proc, str(tmp_path))


def test_missing_data_root_raises_before_training(compose_cfg, tmp_path):
    with pytest.raises(MissingDataError, match="missing"):
        train(compose_cfg("recipe=mnist_debug", f"data.root={tmp_path}"))


def test_bad_devices_raises_configuration_error(compose_cfg):
    with pytest.raises(ConfigurationError, match="trainer.devices=0"):
        train(compose_cfg("recipe=mnist_debug", "trainer.devices=0"))


@pytest.mark.parametrize(
    ("environ", "warns"),
    [
        ({"LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1234"}, True),  # inherited from an earlier fit
        ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, False),  # a rank Lightning's launcher started
        ({"LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "x", "RANK": "0"}, False),  # torchrun
        ({"LOCAL_RANK": "0", "SLURM_PROCID": "0"}, False),  # srun
        ({}, False),
    ],
)
def test_inherited_launch_variables_are_reported(environ, warns):
    from lit_parallel.cli import inherited_launch_warning

    warning = inherited_launch_warning(environ)
    assert (warning is not None) == warns
    if warns:
        assert "LOCAL_RANK=0" in warning and "unset LOCAL_RANK" in warning and "WORLD_SIZE=2" in warning


def test_error_of_every_rank_is_printed_once(tmp_path):
    # Both ranks of the launch reject the layout in the strategy's set-up.
    proc = _run("recipe=mnist_hybrid_tp2_debug", "strategy.tensor_parallel_size=4", f"hydra.run.dir={tmp_path}",
                cwd=tmp_path)
    _assert_one_line_error(proc, "world_size(2)")


@pytest.mark.parametrize(("first", "second", "printed"), [
    ({"LOCAL_RANK": "0"}, {"LOCAL_RANK": "1"}, [True, False]),   # rank 0 printed: rank 1 stays quiet
    ({"LOCAL_RANK": "1"}, {"LOCAL_RANK": "0"}, [True, True]),    # rank 0 always prints
    ({"LOCAL_RANK": "0"}, {"LOCAL_RANK": "0"}, [True, True]),    # the next launch on the same port
    ({"LOCAL_RANK": "1"}, {"LOCAL_RANK": "1", "MASTER_PORT": "29501"}, [True, True]),  # another launch
])
def test_print_error_once_per_launch(monkeypatch, tmp_path, capsys, first, second, printed):
    import tempfile

    from lit_parallel.cli import print_error_once

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for name in ("RANK", "NODE_RANK", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    done = []
    for environ in (first, second):
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", "29500")
        for key, value in environ.items():
            monkeypatch.setenv(key, value)
        done.append(print_error_once("tp(4) does not divide world_size(2)"))
    assert done == printed
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["lit-parallel: error: tp(4) does not divide world_size(2)"] * sum(printed)
