"""Fault tolerance: torchrun restarts resume exactly, damaged checkpoints are skipped, nothing hangs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lit_parallel.checkpointing import (
    capture_rng_state,
    checkpoint_problem,
    find_resume_checkpoint,
    list_checkpoints,
    restore_rng_state,
)
from lit_parallel.parallel.consistency import ReplicaDivergenceError, check_replicas, fingerprint
from lit_parallel.testing import run_distributed

BIN = Path(sys.executable).parent
# 20 steps of the small MLP on MNIST, a step checkpoint every 5 steps, no evaluation.
_RUN = [
    "recipe=mnist_debug", "trainer.max_steps=20", "trainer.max_epochs=-1", "trainer.limit_train_batches=null",
    "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
    "checkpoint_every_n_steps=5", "run_test=false", "data.batch_size=16", "callbacks.model_checkpoint=null",
    "callbacks.lr_monitor=null",
]
_KILL = ["+callbacks.fail._target_=lit_parallel.testing.InjectFailure", "+callbacks.fail.step=12",
         "+callbacks.fail.rank=1"]


# Set in this process by earlier in-process Lightning runs; a child that inherits LOCAL_RANK believes
# it was launched externally and waits for peers that never come.
_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                "LOCAL_WORLD_SIZE")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in list(env):
        if name in _LAUNCH_VARS or name.startswith("TORCHELASTIC_"):
            del env[name]
    return env


def _torchrun(run_dir: Path, nproc: int, overrides: list[str], max_restarts: int = 3,
              timeout: float = 400) -> tuple[int, str]:
    command = [str(BIN / "torchrun"), "--nnodes=1", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
               "-m", "lit_parallel.cli", *_RUN, f"trainer.devices={nproc}", f"hydra.run.dir={run_dir}", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env())
    return done.returncode, done.stdout + done.stderr


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / "steps" / "step0000020.ckpt"
    if path.is_dir():  # HybridParallelStrategy: a distributed-checkpoint folder
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(path, run_dir / "final.pt")
        return torch.load(run_dir / "final.pt", weights_only=True)["model"]
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_final_params(reference: Path, resumed: Path) -> None:
    want, got = _final_model(reference), _final_model(resumed)
    assert sorted(want) == sorted(got)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-7, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(900)  # three torchrun jobs of 2-4 ranks
@pytest.mark.parametrize(
    ("nproc", "strategy"),
    [
        pytest.param(4, ["strategy=hybrid", "strategy.tensor_parallel_size=2"], id="hybrid_tp2_dp2"),
        pytest.param(2, ["strategy=ddp", "compression=powersgd", "compression.rank=2", "compression.warmup_steps=2"],
                     id="ddp_powersgd"),
        # Killed at step 12, resumed from step 10: in the middle of an outer round of 4 steps.
        pytest.param(2, ["strategy=diloco", "strategy.sync_every=4"], id="diloco"),
    ],
)
def test_sigkill_then_torchrun_restart_matches_uninterrupted_run(tmp_path, nproc, strategy):
    rc, out = _torchrun(tmp_path / "reference", nproc, strategy, max_restarts=0)
    assert rc == 0, out[-4000:]
    rc, out = _torchrun(tmp_path / "killed", nproc, [*strategy, *_KILL])
    assert rc == 0, out[-4000:]
    # The kill happened (the agent may report rank 0's "connection reset" first: that is the same event).
    assert "injecting sigkill on rank 1 at step 12" in out, out[-4000:]
    assert "resuming from" in out and "step0000010.ckpt" in out, out[-4000:]
    _assert_same_final_params(tmp_path / "reference", tmp_path / "killed")
    if "compression=powersgd" in strategy:
        # The error-feedback memory of every rank travelled through the checkpoint.
        states = torch.load(tmp_path / "killed" / "checkpoints" / "steps" / "step0000020.ckpt",
                            weights_only=False)["compression"]
        assert len(states) == nproc and all(s["step"] == 20 and s["memory"] for s in states)


@pytest.mark.slow
def test_exception_on_one_rank_stops_every_rank_quickly(tmp_path):
    command = [str(BIN / "lit-parallel"), *_RUN, "trainer.devices=2", "trainer.max_steps=200",
               f"hydra.run.dir={tmp_path}", "+callbacks.fail._target_=lit_parallel.testing.InjectFailure",
               "+callbacks.fail.step=3", "+callbacks.fail.rank=1", "+callbacks.fail.mode=raise"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=_env())
    finished = time.time()
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "RuntimeError: injected failure on rank 1 at step 3" in out, out[-3000:]
    assert "Traceback" in out
    # Liveness, not speed: every rank is gone within the 60 s of the failure (a hang would last
    # the 30-minute collective timeout).
    failed_at = float(re.search(r"injecting raise on rank 1 at step 3 \(unix time ([0-9.]+)\)", out).group(1))
    assert finished - failed_at < 60, f"ranks exited {finished - failed_at:.0f} s after the failure"


@pytest.mark.slow
def test_rank_killed_inside_pipeline_schedule_does_not_hang_torchrun(tmp_path):
    rc, out = _torchrun(tmp_path, 2, ["strategy=hybrid", "strategy.pipeline_parallel_size=2",
                                      "+callbacks.fail._target_=lit_parallel.testing.InjectFailure",
                                      "+callbacks.fail.step=3", "+callbacks.fail.rank=1",
                                      "+callbacks.fail.where=forward"], max_restarts=0, timeout=180)
    assert rc != 0
    assert "injecting sigkill on rank 1 at step 3" in out, out[-3000:]


def test_exception_under_torchrun_shows_the_failing_ranks_traceback(tmp_path):
    rc, out = _torchrun(tmp_path, 2, ["+callbacks.fail._target_=lit_parallel.testing.InjectFailure",
                                      "+callbacks.fail.step=2", "+callbacks.fail.rank=1",
                                      "+callbacks.fail.mode=raise"], max_restarts=0, timeout=180)
    assert rc != 0
    summary = out[out.index("Root Cause"):]
    assert "rank      : 1" in summary and "injected failure on rank 1 at step 2" in summary, out[-3000:]


# -- damaged checkpoints ---------------------------------------------------------------------------
def _save(path: Path, step: int) -> Path:
    torch.save({"global_step": step, "state_dict": {"w": torch.randn(64, 64)}}, path)
    return path


def test_truncated_and_incomplete_checkpoints_are_skipped_with_a_warning(tmp_path):
    old = _save(tmp_path / "step05.ckpt", 5)
    new = _save(tmp_path / "step10.ckpt", 10)
    os.utime(old, (1, 1))
    data = new.read_bytes()
    new.write_bytes(data[: len(data) // 2])
    (tmp_path / "step15.ckpt.incomplete").mkdir()
    assert checkpoint_problem(old) is None
    assert "truncated" in checkpoint_problem(new)
    assert list_checkpoints(tmp_path)[-1] == old
    with pytest.warns(UserWarning) as record:
        assert find_resume_checkpoint(tmp_path) == old
    messages = " ".join(str(w.message) for w in record)
    assert "step10.ckpt" in messages and "step15.ckpt.incomplete" in messages


def test_corrupted_member_fails_its_crc(tmp_path):
    path = _save(tmp_path / "a.ckpt", 1)
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "CRC" in checkpoint_problem(path)


def test_distributed_checkpoint_with_missing_or_truncated_shard(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "step10.ckpt"
    dcp.save({"model": {"w": torch.randn(128, 128)}}, checkpoint_id=folder)
    torch.save({"global_step": 10}, folder / "meta.pt")
    assert checkpoint_problem(folder) is None
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert "truncated" in checkpoint_problem(folder)
    shard.unlink()
    assert "missing" in checkpoint_problem(folder)
    (folder / "meta.pt").unlink()
    assert "meta.pt is missing" in checkpoint_problem(folder)


def test_cli_resumes_from_the_previous_checkpoint_when_the_newest_is_truncated(compose_cfg, tmp_path, capsys):
    from lit_parallel.cli import train

    run = [*_RUN, "trainer.devices=1"]
    crash = ["+callbacks.fail._target_=lit_parallel.testing.InjectFailure", "+callbacks.fail.step=12",
             "+callbacks.fail.rank=0", "+callbacks.fail.mode=raise"]
    with pytest.raises(RuntimeError, match="injected failure"):
        train(compose_cfg(*run, *crash))
    newest = tmp_path / "checkpoints" / "steps" / "step0000010.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])
    capsys.readouterr()
    with pytest.warns(UserWarning, match="step0000010.ckpt"):
        result = train(compose_cfg(*run))
    assert "resuming from" in capsys.readouterr().err
    assert result["global_step"] == 20
    assert result["train_samples"] == 15 * 16  # steps 6..20: resumed from step 5


# -- RNG state and replica guard -------------------------------------------------------------------
def test_rng_state_roundtrip_survives_weights_only_load(tmp_path):
    import random

    import numpy as np

    torch.save({"rng": capture_rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    restore_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert expected[:2] == got[:2] and torch.equal(expected[2], got[2])


def test_fingerprint_detects_single_bit_and_permutation():
    t = torch.randn(1000)
    flipped = t.clone()
    flipped.view(torch.int32)[17] ^= 1
    assert fingerprint(t) == fingerprint(t.clone())
    assert fingerprint(t) != fingerprint(flipped)
    assert fingerprint(t) != fingerprint(t.flip(0))


def _diverge(bad_rank: int) -> str:
    params = [("a", torch.ones(4)), ("b.weight", torch.ones(3) * (2 if dist.get_rank() == bad_rank else 1))]
    try:
        check_replicas(params, step=7)
    except ReplicaDivergenceError as err:
        return str(err)
    return "equal"


def test_replica_guard_names_the_first_differing_tensor():
    messages = run_distributed(_diverge, world_size=2, args=(1,))
    assert messages[0] == messages[1]
    assert "'b.weight'" in messages[0] and "[0] vs [1]" in messages[0] and "after step 7" in messages[0]
    assert run_distributed(_diverge, world_size=2, args=(5,)) == ["equal", "equal"]


def test_replica_check_interval_is_validated_before_any_process_group():
    from lit_parallel import CompressedDDPStrategy, HybridParallelStrategy
    from lit_parallel.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="replica_check_every_n_steps=-3"):
        HybridParallelStrategy(replica_check_every_n_steps=-3)
    with pytest.raises(ConfigurationError, match="replica_check_every_n_steps='x'"):
        CompressedDDPStrategy(replica_check_every_n_steps="x")
    assert not dist.is_initialized()


@pytest.mark.parametrize(("overrides", "message"), [
    (["checkpoint_every_n_steps=-1"], "checkpoint_every_n_steps=-1; valid: a positive integer or null"),
    (["checkpoint_every_n_steps=5", "keep_checkpoints=0"], "keep_checkpoints=0; valid: a positive integer"),
])
def test_bad_checkpoint_settings_are_refused_before_any_process_group(compose_cfg, overrides, message):
    from lit_parallel.cli import train
    from lit_parallel.errors import ConfigurationError

    run = [o for o in _RUN if not o.startswith("checkpoint_every_n_steps")]
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        train(compose_cfg(*run, "trainer.devices=1", *overrides))
    assert not dist.is_initialized()
