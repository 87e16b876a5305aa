"""Asynchronous checkpoints: same content as a synchronous save, exact resume, atomic under SIGKILL.

The background write is held back (a patched writer waits on an event) while training goes on, so every test
checks the staging as well: the checkpoint must hold the state of the step it was taken at, not a later one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel import async_checkpoint, sharded_checkpoint
from lit_parallel.testing import run_distributed

SEED, SAMPLES, STEPS_PER_EPOCH, MAX_STEPS = 1, 64, 4, 12
SAVE_AT, RELEASE_AT = 3, 6  # the write of the step-3 checkpoint waits until step 6 has been trained


class TinyRegressor(L.LightningModule):
    """Dropout (random state), momentum (optimizer state), an epoch-interval LR schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.25), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def _loader(data_parallel_size: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(SAMPLES, 4, generator=g), torch.randn(SAMPLES, 1, generator=g))
    return DataLoader(data, batch_size=SAMPLES // STEPS_PER_EPOCH // data_parallel_size, shuffle=True)


def _strategy(name: str, asynchronous: bool):
    from lit_parallel import CompressedDDPStrategy, HybridParallelStrategy
    from lit_parallel.plugins import AsyncAtomicCheckpointIO

    if name.startswith("hybrid"):
        return HybridParallelStrategy(tensor_parallel_size=2 if name == "hybrid_tp2" else 1,
                                      async_checkpoint=asynchronous)
    return CompressedDDPStrategy(checkpoint_io=AsyncAtomicCheckpointIO() if asynchronous else None)


# -- holding a background write back -----------------------------------------------------------------------
_RELEASE = threading.Event()


def _hold_writes() -> None:
    """Patch this process's writers: every background write waits for :data:`_RELEASE`."""
    _RELEASE.clear()
    write_data = sharded_checkpoint._PublishingWriter.write_data

    def held_write_data(self, plan, planner):
        assert threading.current_thread() is not threading.main_thread()
        assert _RELEASE.wait(60)
        return write_data(self, plan, planner)

    sharded_checkpoint._PublishingWriter.write_data = held_write_data
    save_file = async_checkpoint.save_file_atomic

    def held_save_file(obj, path):
        assert threading.current_thread() is not threading.main_thread()
        assert _RELEASE.wait(60)
        save_file(obj, path)

    import lit_parallel.plugins.async_checkpoint_io as io_module

    io_module.save_file_atomic = held_save_file


class _SyncAndAsyncSave(Callback):
    """At ``SAVE_AT``: an async save (its write held back), then a synchronous save of the same moment."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pending_seen: bool | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        strategy = trainer.strategy
        if trainer.global_step == SAVE_AT:
            trainer.save_checkpoint(self.root / "async.ckpt")
            # The synchronous reference: the hybrid strategy without its option, the DDP family with torch.save.
            if hasattr(strategy, "async_checkpoint"):
                strategy.async_checkpoint = False
                trainer.save_checkpoint(self.root / "sync.ckpt")
                strategy.async_checkpoint = True
            else:
                io, strategy.checkpoint_io = strategy.checkpoint_io, TorchCheckpointIO()
                trainer.save_checkpoint(self.root / "sync.ckpt")
                strategy.checkpoint_io = io
        if trainer.global_step == RELEASE_AT:
            self.pending_seen = not (self.root / "async.ckpt").exists()
            _RELEASE.set()


def _fit(root: Path, name: str, callbacks: list[Callback], *, asynchronous: bool = True, max_steps: int = MAX_STEPS,
         ckpt_path: str | None = None) -> Any:
    from lit_parallel.callbacks import ExactResume

    L.seed_everything(SEED, verbose=False)
    model = TinyRegressor()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=_strategy(name, asynchronous), max_steps=max_steps,
                        default_root_dir=str(root), logger=False, enable_progress_bar=False, limit_val_batches=0,
                        enable_model_summary=False, callbacks=[ExactResume(), *callbacks],
                        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer.fit(model, _loader(1 if name == "hybrid_tp2" else 2), ckpt_path=ckpt_path)
    if hasattr(trainer.strategy, "export_state_dict"):
        return trainer.strategy.export_state_dict()
    return {k: v.detach().clone() for k, v in model.net.state_dict().items()} if trainer.is_global_zero else None


def _content_run(tmp: str, name: str) -> bool | None:
    _hold_writes()
    callback = _SyncAndAsyncSave(Path(tmp))
    _fit(Path(tmp), name, [callback], max_steps=RELEASE_AT + 2)
    return callback.pending_seen


def _read(path: Path) -> dict[str, Any]:
    if path.is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(path, path.with_suffix(".pt"))
        state = torch.load(path.with_suffix(".pt"), weights_only=True)
        return state | {"meta": torch.load(path / sharded_checkpoint.META_FILE, weights_only=True)}
    return torch.load(path, weights_only=True)


def _assert_identical(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert sorted(map(str, a)) == sorted(map(str, b)), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hybrid", "hybrid_tp2", "ddp"])
def test_async_save_holds_the_same_content_as_a_sync_save(tmp_path, name):
    pending = run_distributed(_content_run, world_size=2, args=(str(tmp_path), name), timeout=240)
    assert pending[0] is True  # training went on for 3 steps while the write was held back
    async_state, sync_state = _read(tmp_path / "async.ckpt"), _read(tmp_path / "sync.ckpt")
    assert not list(tmp_path.glob("*.incomplete"))
    assert async_state["global_step" if name == "ddp" else "meta"] is not None
    _assert_identical(sync_state, async_state)
    # ... and that content is the step-SAVE_AT state, not the one trained while the write waited.
    steps = async_state["global_step"] if name == "ddp" else async_state["meta"]["global_step"]
    assert steps == SAVE_AT


# -- resuming from an asynchronous checkpoint is exact ---------------------------------------------------------
def _resume_run(tmp: str, name: str):
    root = Path(tmp)
    every = ModelCheckpoint(dirpath=str(root / "ckpt"), filename="{step}", every_n_train_steps=3, save_top_k=-1)
    reference = _fit(root / "reference", name, [every])
    resumed = _fit(root / "resumed", name, [], ckpt_path=str(root / "ckpt" / "step=6.ckpt"))
    return reference, resumed


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hybrid", "ddp"])
def test_resume_from_an_async_checkpoint_is_exact(tmp_path, name):
    reference, resumed = run_distributed(_resume_run, world_size=2, args=(str(tmp_path), name), timeout=240)[0]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step=12.ckpt", "step=3.ckpt", "step=6.ckpt",
                                                                      "step=9.ckpt"]
    _assert_identical(reference, resumed)


# -- deferred deletion -----------------------------------------------------------------------------------------
class _WatchRotation(Callback):
    """Holds the step-6 write back; at step 7 notes which checkpoints exist, then lets the write go on.

    (Lightning runs ``ModelCheckpoint`` after the other callbacks: at step 6 the write is held before it starts.)
    """

    def __init__(self, root: Path) -> None:
        self.root, self.seen = root, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 6:
            _RELEASE.clear()
        if trainer.global_step == 7:
            self.seen = sorted(p.name for p in self.root.iterdir())
            _RELEASE.set()


def _rotation_run(tmp: str, name: str):
    _hold_writes()
    _RELEASE.set()  # the step-3 write goes through
    root = Path(tmp) / "ckpt"
    root.mkdir(parents=True, exist_ok=True)
    watch = _WatchRotation(root)
    rotate = ModelCheckpoint(dirpath=str(root), filename="{step}", every_n_train_steps=3, save_top_k=1,
                             monitor="step", mode="max")
    _fit(Path(tmp), name, [rotate, watch], max_steps=8)
    return watch.seen


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hybrid", "ddp"])
def test_rotation_keeps_the_previous_checkpoint_until_the_new_one_is_complete(tmp_path, name):
    seen = run_distributed(_rotation_run, world_size=2, args=(str(tmp_path), name), timeout=240)[0]
    # Step-6 checkpoint pending (held): step=3 still there although the keep-1 rotation asked to delete it.
    assert "step=3.ckpt" in seen and "step=6.ckpt" not in seen
    # End of fit: the step-6 write is published, then the deletion ran.
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step=6.ckpt"]


# -- a job SIGKILLed during the background write resumes from the previous complete checkpoint ----------------
BIN = Path(sys.executable).parent
_RUN = ["recipe=mnist_debug", "trainer.max_steps=15", "trainer.max_epochs=-1", "trainer.limit_train_batches=null",
        "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "checkpoint_every_n_steps=5",
        "keep_checkpoints=1", "async_checkpoint=true", "run_test=false", "data.batch_size=16",
        "callbacks.model_checkpoint=null", "callbacks.lr_monitor=null", "trainer.devices=2"]
_STRATEGY = {"hybrid": ["strategy=hybrid"], "ddp": ["strategy=ddp"]}
_HOLD_ENV = "LIT_PARALLEL_TEST_HOLD_CHECKPOINT"  # this checkpoint's write blocks (set by the kill test)
_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                "LOCAL_WORLD_SIZE")


def _block_forever_writing(name: str, marker: Path) -> None:
    """In a torchrun worker: the write of checkpoint ``name`` stops half-way (after the shards / mid-file)."""
    write_data = sharded_checkpoint._PublishingWriter.write_data

    def blocked_write_data(self, plan, planner):
        result = write_data(self, plan, planner)  # the shards are on disk, .metadata and meta.pt are not
        if self._final.name == name:
            result.wait()
            marker.with_name(f"{marker.name}{os.environ['RANK']}").touch()
            time.sleep(600)
        return result

    sharded_checkpoint._PublishingWriter.write_data = blocked_write_data
    import lit_parallel.plugins.async_checkpoint_io as io_module

    def blocked_save_file(obj, path):
        if Path(path).name == name:
            async_checkpoint.incomplete_path(path).write_bytes(b"PK\x03\x04 half a zip")
            marker.with_name(f"{marker.name}{os.environ['RANK']}").touch()
            time.sleep(600)
        async_checkpoint.save_file_atomic(obj, path)

    io_module.save_file_atomic = blocked_save_file


def _torchrun(run_dir: Path, strategy: str, hold: str = "") -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **{_HOLD_ENV: hold})
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [str(BIN / "torchrun"), "--nnodes=1", "--nproc-per-node=2", "--max-restarts=0", __file__, *_RUN,
               *_STRATEGY[strategy], f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(command, stdout=open(run_dir / f"log{int(time.time() * 1000)}.txt", "w"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _log(run_dir: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(run_dir.glob("log*.txt")))


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / "steps" / "step0000015.ckpt"
    state = _read(path)
    return state["model"] if path.is_dir() else state["state_dict"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ["hybrid", "ddp"])
def test_job_killed_during_the_background_write_resumes_from_the_previous_checkpoint(tmp_path, strategy):
    reference = _torchrun(tmp_path / "reference", strategy)
    killed_dir = tmp_path / "killed"
    killed = _torchrun(killed_dir, strategy, hold="step0000010.ckpt")
    assert reference.wait(timeout=400) == 0, _log(tmp_path / "reference")
    steps = killed_dir / "checkpoints" / "steps"
    # The ranks that write: both (DCP) or rank 0 (a single file).
    markers = [killed_dir / f"held{rank}" for rank in ((0, 1) if strategy == "hybrid" else (0,))]
    deadline = time.monotonic() + 300
    while not all(m.exists() for m in markers) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(m.exists() for m in markers), _log(killed_dir)
    # Held mid-write: the newest complete checkpoint is still there although keep_checkpoints=1 rotated it out.
    assert sorted(p.name for p in steps.iterdir()) == ["step0000005.ckpt", "step0000010.ckpt.incomplete"]
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    from lit_parallel.checkpointing import find_resume_checkpoint

    with pytest.warns(UserWarning, match=r"step0000010\.ckpt\.incomplete: it is still being written"):
        assert find_resume_checkpoint(killed_dir) == steps / "step0000005.ckpt"
    resumed = _torchrun(killed_dir, strategy)
    assert resumed.wait(timeout=400) == 0, _log(killed_dir)
    assert "resuming from " + str(steps / "step0000005.ckpt") in _log(killed_dir)
    # The .incomplete leftover was replaced by the resumed run's step-10 checkpoint, rotated out since; Lightning's
    # rotation never deletes the checkpoint a run resumed from (ModelCheckpoint._should_remove_checkpoint).
    assert sorted(p.name for p in steps.iterdir()) == ["step0000005.ckpt", "step0000015.ckpt"]
    _assert_identical(_final_model(tmp_path / "reference"), _final_model(killed_dir))


# -- bad input and small pieces --------------------------------------------------------------------------------
def test_unwritable_checkpoint_directory_is_refused_before_training(tmp_path):
    from lit_parallel import HybridParallelStrategy

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    bad = blocker / "checkpoints"
    with pytest.raises(ConfigurationError, match=r"a_file/checkpoints.*is not writable.*a_file is not a directory"):
        async_checkpoint.check_writable(bad)
    # Through the strategy: refused in setup_environment, before the process group exists.
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=HybridParallelStrategy(async_checkpoint=True),
                        default_root_dir=str(tmp_path), max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ModelCheckpoint(dirpath=str(bad))])
    with pytest.raises(ConfigurationError, match="a_file/checkpoints"):
        trainer.fit(TinyRegressor(), _loader(1))
    assert not torch.distributed.is_initialized()
    with pytest.raises(ConfigurationError, match=r"async_checkpoint='yes'"):
        HybridParallelStrategy(async_checkpoint="yes")


def test_cli_refuses_an_unwritable_output_dir(compose_cfg, tmp_path):
    from lit_parallel.cli import train

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = compose_cfg("recipe=mnist_debug", "async_checkpoint=true")
    cfg.output_dir = str(blocker / "run")
    with pytest.raises(ConfigurationError, match="output_dir.*a_file/run.*is not writable"):
        train(cfg)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["strategy=hybrid"], "hybrid"), (["strategy=ddp"], "io"), (["strategy=diloco"], "io"),
    (["strategy=lightning_ddp"], "io"), (["strategy=ddp", "async_checkpoint=maybe"], "async_checkpoint='maybe'"),
])
def test_cli_wires_async_checkpoint_into_every_strategy(compose_cfg, overrides, expected):
    from lit_parallel.cli import _build_strategy
    from lit_parallel.plugins import AsyncAtomicCheckpointIO

    cfg = compose_cfg("recipe=mnist_debug", "async_checkpoint=true", *overrides)
    if expected not in ("hybrid", "io"):
        with pytest.raises(ConfigurationError, match=expected):
            _build_strategy(cfg)
        return
    strategy = _build_strategy(cfg)
    if expected == "hybrid":
        assert strategy.async_checkpoint is True
    else:
        assert isinstance(strategy.checkpoint_io, AsyncAtomicCheckpointIO)


def test_stage_to_cpu_copies_everything_training_could_change():
    weight = torch.ones(3)
    state = {"w": weight, "groups": [{"lr": 0.1, "params": [0]}], "steps": (weight.view(3, 1),)}
    staged = async_checkpoint.stage_to_cpu(state)
    weight.add_(1)
    state["groups"][0]["lr"] = 0.5
    assert torch.equal(staged["w"], torch.ones(3)) and torch.equal(staged["steps"][0], torch.ones(3, 1))
    assert staged["groups"][0]["lr"] == 0.1


def test_stage_to_cpu_keeps_tied_weights_one_storage(tmp_path):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied, as SmolLM2's embedding and head
    state = model.state_dict()
    staged = async_checkpoint.stage_to_cpu(state)
    assert staged["0.weight"].untyped_storage().data_ptr() == staged["1.weight"].untyped_storage().data_ptr()
    assert staged["0.weight"].untyped_storage().data_ptr() != state["0.weight"].untyped_storage().data_ptr()
    async_checkpoint.save_file_atomic(staged, tmp_path / "staged.ckpt")
    async_checkpoint.save_file_atomic(state, tmp_path / "direct.ckpt")  # the same writer, without staging
    assert (tmp_path / "staged.ckpt").stat().st_size == (tmp_path / "direct.ckpt").stat().st_size
    _assert_identical(torch.load(tmp_path / "direct.ckpt"), torch.load(tmp_path / "staged.ckpt"))


def test_wait_for_checkpoint_publishes_the_pending_file(tmp_path):
    from lit_parallel.plugins import AsyncAtomicCheckpointIO
    from lit_parallel.plugins.async_checkpoint_io import wait_for_checkpoint

    io = AsyncAtomicCheckpointIO()
    io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    assert io.pending

    class Strategy:
        checkpoint_io = io

    wait_for_checkpoint(Strategy())
    assert not io.pending and torch.equal(torch.load(tmp_path / "a.ckpt")["w"], torch.ones(2))


def test_failed_write_keeps_the_checkpoints_it_would_have_rotated_out(tmp_path):
    old = tmp_path / "old.ckpt"
    old.write_bytes(b"x")
    writer = async_checkpoint.BackgroundCheckpointWriter(sharded_checkpoint.remove_path)
    started, release = threading.Event(), threading.Event()

    def failing_write() -> None:
        started.set()
        release.wait(10)
        raise OSError("disk full")

    writer.submit(failing_write)
    started.wait(10)
    writer.remove(old)
    assert old.exists()  # held back while the write is pending
    release.set()
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert old.exists()  # the new checkpoint never appeared: the old one stays


if __name__ == "__main__":  # a torchrun worker of the kill test: `torchrun ... this_file <lit-parallel overrides>`
    if os.environ.get(_HOLD_ENV):
        _block_forever_writing(os.environ[_HOLD_ENV], Path(sys.argv[sys.argv.index(
            next(a for a in sys.argv if a.startswith("hydra.run.dir=")))].split("=", 1)[1]) / "held")
    from lit_parallel.cli import main

    main()
