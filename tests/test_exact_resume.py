"""ExactResume: a run resumed from any checkpoint Lightning writes ends with the uninterrupted run's parameters.

The reference run trains 12 steps (3 epochs of 4 steps: 64 samples, 2 ranks x batch 8, or 1 rank x batch 16)
with dropout, SGD with momentum and an epoch-interval LR schedule, on a plain ``DataLoader``, and writes every
kind of checkpoint on the way; each resumed run starts from one of them and must end bitwise equal (fp32).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_parallel.callbacks import ExactResume
from lit_parallel.callbacks.resume import mark_epoch_end_completed
from lit_parallel.testing import run_distributed

SEED, SAMPLES, STEPS_PER_EPOCH, MAX_STEPS = 1, 64, 4, 12
HPC_STEP = 5  # mid-epoch 1
PROJECT_EVERY = 3  # lit-parallel's checkpoint_every_n_steps: 3 (mid-epoch 0), 6, 9
# Each checkpoint path and the global step its checkpoint was written at.
PATHS = {"epoch_end": 8, "last": 8, "every_n_train_steps_mid": 6, "every_n_train_steps_epoch_end": 8, "hpc": HPC_STEP,
         "project_step": PROJECT_EVERY}


class TinyRegressor(L.LightningModule):
    """Dropout (random state matters), momentum (optimizer state) and an epoch-interval LR schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.25), nn.Linear(16, 1))
        self.seen: list[tuple[int, int, int, list[int]]] = []  # (epoch, batch_idx, global_step, sample ids)

    def training_step(self, batch, batch_idx):
        x, y, ids = batch
        self.seen.append((self.current_epoch, batch_idx, self.global_step, ids.tolist()))
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val_loss", F.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def _loader(data_parallel_size: int, shuffle: bool, num_workers: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(SAMPLES, 4, generator=g), torch.randn(SAMPLES, 1, generator=g),
                         torch.arange(SAMPLES))
    return DataLoader(data, batch_size=SAMPLES // STEPS_PER_EPOCH // data_parallel_size, shuffle=shuffle,
                      num_workers=num_workers, persistent_workers=num_workers > 0)


class _SaveAt(Callback):
    """``trainer.save_checkpoint`` at a step boundary, as the SLURM requeue handler does (hpc_ckpt_<n>.ckpt)."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def _strategy(name: str):
    from lit_parallel import CompressedDDPStrategy, DiLoCoStrategy, HybridParallelStrategy
    from lit_parallel.parallel.compression import PowerSGD

    if name == "ddp_powersgd":
        return CompressedDDPStrategy(compression=PowerSGD(rank=1, warmup_steps=2))
    if name == "diloco":
        return DiLoCoStrategy(sync_every=3)  # killed mid outer round by most checkpoints
    if name.startswith("hybrid_tp"):
        return HybridParallelStrategy(tensor_parallel_size=int(name.removeprefix("hybrid_tp")))
    if name == "hybrid":
        return HybridParallelStrategy()
    return name


def _fit(root: Path, strategy: str, shuffle: bool, *, ckpt_path: str | None = None, max_steps: int = MAX_STEPS,
         callbacks: list[Callback] = (), exact: bool = True, world_size: int = 1, max_epochs: int | None = None,
         validate_every: int | None = None, num_workers: int = 0, accumulate: int = 1):
    """One fit; returns (full fp32 state dict on global rank 0, the batches it trained)."""
    L.seed_everything(SEED, verbose=False)
    tensor_parallel = int(strategy.removeprefix("hybrid_tp")) if strategy.startswith("hybrid_tp") else 1
    model = TinyRegressor()
    strategy_obj = _strategy(strategy)
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=strategy_obj, max_steps=max_steps,
                        max_epochs=max_epochs, default_root_dir=str(root), logger=False, enable_progress_bar=False,
                        limit_val_batches=0 if validate_every is None else 2, val_check_interval=validate_every,
                        enable_model_summary=False, enable_checkpointing=bool(callbacks), accumulate_grad_batches=accumulate,
                        callbacks=[*([ExactResume()] if exact else []), *callbacks])
    dp = world_size // tensor_parallel
    trainer.fit(model, _loader(dp, shuffle, num_workers), _loader(dp, False) if validate_every else None,
                ckpt_path=ckpt_path)
    if hasattr(trainer.strategy, "export_state_dict"):
        state = trainer.strategy.export_state_dict()
    else:
        state = {k: v.detach().cpu().clone() for k, v in model.net.state_dict().items()}
    return (state if trainer.is_global_zero else None), model.seen


def _reference_and_resumes(tmp: str, strategy: str, shuffle: bool, paths: tuple[str, ...]):
    """The uninterrupted run writing every kind of checkpoint, then one resumed run per checkpoint."""
    from omegaconf import OmegaConf

    from lit_parallel.cli import _periodic_checkpoint

    root = Path(tmp)
    world_size = int(os.environ["WORLD_SIZE"])  # Lightning removes it when a fit ends
    project = _periodic_checkpoint(OmegaConf.create({"checkpoint_every_n_steps": PROJECT_EVERY,
                                                     "keep_checkpoints": 10}), root / "project")
    writers = [
        ModelCheckpoint(dirpath=str(root / "epochs"), every_n_epochs=1, save_top_k=-1),
        ModelCheckpoint(dirpath=str(root / "steps"), filename="{step}", every_n_train_steps=2, save_top_k=-1),
        _SaveAt(HPC_STEP, str(root / "slurm" / "hpc_ckpt_1.ckpt")), *project,
    ]
    reference, reference_seen = _fit(root / "reference", strategy, shuffle, callbacks=writers, world_size=world_size)
    # last.ckpt as a user finds it after the job died at step 8: written at the end of epoch 1.
    _fit(root / "stopped", strategy, shuffle, max_steps=8, world_size=world_size,
         callbacks=[ModelCheckpoint(dirpath=str(root / "stopped"), every_n_epochs=1, save_last=True)])
    checkpoints = {
        "epoch_end": str(root / "epochs" / "epoch=1-step=8.ckpt"),
        "last": str(root / "stopped" / "last.ckpt"),
        "every_n_train_steps_mid": str(root / "steps" / "step=6.ckpt"),
        "every_n_train_steps_epoch_end": str(root / "steps" / "step=8.ckpt"),
        "hpc": "hpc",  # Lightning picks the newest hpc_ckpt_<n>.ckpt in default_root_dir
        "project_step": str(root / "project" / "checkpoints" / "steps" / f"step{PROJECT_EVERY:07d}.ckpt"),
    }
    results = {}
    for name in paths:
        resume_root = root / "slurm" if name == "hpc" else root / f"resume_{name}"
        results[name] = _fit(resume_root, strategy, shuffle, ckpt_path=checkpoints[name], world_size=world_size)
    return (reference, reference_seen), results


def _assert_bitwise_equal(reference: dict[str, torch.Tensor], resumed: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(reference) == sorted(resumed), what
    for key, value in reference.items():
        assert value.dtype == torch.float32
        assert torch.equal(resumed[key], value), f"{what}: {key} differs by {(resumed[key] - value).abs().max()}"


def _check_all_paths(tmp_path, strategy: str, shuffle: bool) -> None:
    results = run_distributed(_reference_and_resumes, world_size=2, args=(str(tmp_path), strategy, shuffle, tuple(PATHS)),
                              init_process_group=False, timeout=600)
    (reference, reference_seen), resumed = results[0]
    assert len(reference_seen) == MAX_STEPS
    for name in PATHS:
        state, seen = resumed[name]
        steps = [step for _, _, step, _ in seen]
        # Resumed right after the checkpoint's step, every later step exactly once, on the same samples.
        assert steps == list(range(PATHS[name], MAX_STEPS)), (name, steps)
        assert seen == reference_seen[PATHS[name]:], name
        _assert_bitwise_equal(reference, state, name)


# -- Lightning's replay, and the fix -----------------------------------------------------------------
def test_lightning_replays_a_batch_from_an_epoch_end_checkpoint_and_exact_resume_removes_it(tmp_path):
    """The issue's case with one process and no lit_parallel strategy: resume from ``epoch=1-step=8.ckpt``."""
    epochs = ModelCheckpoint(dirpath=str(tmp_path / "epochs"), every_n_epochs=1, save_top_k=-1)
    _fit(tmp_path / "ref", "auto", True, callbacks=[epochs], exact=False)
    checkpoint = str(tmp_path / "epochs" / "epoch=1-step=8.ckpt")
    state = torch.load(checkpoint, weights_only=True)["loops"]["fit_loop"]
    assert state["epoch_progress"]["current"]["processed"] == 2 and state["epoch_progress"]["current"]["completed"] == 1

    _, plain_seen = _fit(tmp_path / "plain", "auto", True, ckpt_path=checkpoint, exact=False)
    # Without the fix, Lightning restarts epoch 1 and trains batch_idx 4 of a 4-batch epoch: step 8 is trained
    # on a batch the uninterrupted run never saw at that point (epoch 1 gets 5 batches in total).
    assert plain_seen[0][:3] == (1, STEPS_PER_EPOCH, 8)
    assert [s[:2] for s in plain_seen].count((1, STEPS_PER_EPOCH)) == 1

    # With it (the checkpoint written with it too, for the random state), epoch 2 starts at step 8.
    epochs = ModelCheckpoint(dirpath=str(tmp_path / "epochs_fixed"), every_n_epochs=1, save_top_k=-1)
    reference, reference_seen = _fit(tmp_path / "ref_fixed", "auto", True, callbacks=[epochs])
    fixed, fixed_seen = _fit(tmp_path / "fixed", "auto", True,
                             ckpt_path=str(tmp_path / "epochs_fixed" / "epoch=1-step=8.ckpt"))
    assert [s[:3] for s in fixed_seen] == [(2, b, 8 + b) for b in range(STEPS_PER_EPOCH)]
    assert fixed_seen == reference_seen[8:]
    _assert_bitwise_equal(reference, fixed, "epoch_end, 1 process")


def test_single_process_shuffle_order_is_the_distributed_samplers(tmp_path):
    """A shuffled single-process loader follows ``randperm(seed + epoch)``, as Lightning's DistributedSampler."""
    _, seen = _fit(tmp_path, "auto", True, max_steps=2 * STEPS_PER_EPOCH)
    for epoch in range(2):
        order = [i for e, _, _, ids in seen if e == epoch for i in ids]
        assert order == torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()


@pytest.mark.parametrize("limit", ["max_steps", "max_epochs"])
def test_checkpoints_written_by_validation_resume_exactly(tmp_path, limit):
    """Validation every 2 batches, ``ModelCheckpoint(monitor="val_loss", save_last=True)`` as the CLI's default:
    checkpoints written on ``on_validation_end`` mid-epoch and at the epoch's end (where Lightning replays)."""
    limits = {"max_steps": MAX_STEPS} if limit == "max_steps" else {"max_steps": -1, "max_epochs": 3}
    writer = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val_loss", save_last=True, save_top_k=-1)
    reference, reference_seen = _fit(tmp_path / "ref", "auto", True, callbacks=[writer], validate_every=2, **limits)
    names = [f"epoch={e}-step={s}.ckpt" for e, s in ((0, 2), (0, 4), (1, 6), (1, 8), (2, 10))]
    assert {*names, "last.ckpt"} <= {p.name for p in (tmp_path / "ckpt").iterdir()}
    for name in names:
        state, seen = _fit(tmp_path / "resumed", "auto", True, ckpt_path=str(tmp_path / "ckpt" / name),
                           validate_every=2, **limits)
        step = int(name.split("step=")[1].removesuffix(".ckpt"))
        assert seen == reference_seen[step:], name
        _assert_bitwise_equal(reference, state, name)


def test_persistent_worker_loader_resumes_exactly_mid_epoch(tmp_path):
    """Two persistent workers: their iterator is rebuilt skipping the trained batches, then serves later epochs
    from the whole sampler again."""
    steps = ModelCheckpoint(dirpath=str(tmp_path / "steps"), filename="{step}", every_n_train_steps=3, save_top_k=-1)
    reference, reference_seen = _fit(tmp_path / "ref", "auto", True, callbacks=[steps], num_workers=2)
    state, seen = _fit(tmp_path / "resumed", "auto", True, ckpt_path=str(tmp_path / "steps" / "step=3.ckpt"),
                       num_workers=2)
    assert seen == reference_seen[3:]
    _assert_bitwise_equal(reference, state, "step=3.ckpt, 2 persistent workers")


def test_gradient_accumulation_resumes_exactly(tmp_path):
    """``accumulate_grad_batches=2``: 2 optimizer steps per epoch; a step checkpoint mid-epoch (after 2 of 4
    batches) and an epoch-end one."""
    writers = [ModelCheckpoint(dirpath=str(tmp_path / "steps"), filename="{step}", every_n_train_steps=1, save_top_k=-1),
               ModelCheckpoint(dirpath=str(tmp_path / "epochs"), every_n_epochs=1, save_top_k=-1)]
    reference, reference_seen = _fit(tmp_path / "ref", "auto", True, callbacks=writers, max_steps=6, accumulate=2)
    for name, batches_before in (("steps/step=1.ckpt", 2), ("epochs/epoch=0-step=2.ckpt", 4)):
        state, seen = _fit(tmp_path / "resumed", "auto", True, ckpt_path=str(tmp_path / name), max_steps=6,
                           accumulate=2)
        assert seen == reference_seen[batches_before:], name
        _assert_bitwise_equal(reference, state, name)


def test_mark_epoch_end_completed_leaves_mid_epoch_states_alone():
    def loops(is_last: bool, processed: int, completed: int) -> dict:
        batch = {"total": {"ready": 6, "started": 6, "processed": 6, "completed": 5},
                 "current": {"ready": processed, "started": processed, "processed": processed,
                             "completed": completed}, "is_last_batch": is_last}
        epoch = {"total": {"ready": 2, "started": 2, "processed": 1, "completed": 1},
                 "current": {"ready": 2, "started": 2, "processed": 1, "completed": 1}}
        return {"fit_loop": {"epoch_loop.batch_progress": batch, "epoch_progress": epoch}}

    mid = loops(False, 2, 1)
    assert not mark_epoch_end_completed(mid)
    assert mid == loops(False, 2, 1)
    end = loops(True, 4, 3)
    assert mark_epoch_end_completed(end)
    assert end["fit_loop"]["epoch_progress"]["current"] == {"ready": 2, "started": 2, "processed": 2, "completed": 2}
    assert end["fit_loop"]["epoch_loop.batch_progress"]["current"] == dict.fromkeys(("ready", "started", "processed",
                                                                                      "completed"), 0)
    assert end["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == 6


def test_checkpoint_written_inside_a_step_is_reported_as_not_exact(tmp_path):
    checkpoint = torch.load(_one_checkpoint(tmp_path), weights_only=True)
    batch = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    batch["current"]["processed"] -= 1  # as if a signal handler saved between forward and optimizer step
    batch["total"]["processed"] -= 1
    torch.save(checkpoint, tmp_path / "inside.ckpt")
    with pytest.warns(UserWarning, match="inside training step 1 of its epoch.*NOT exact"):
        _fit(tmp_path / "resumed", "auto", False, ckpt_path=str(tmp_path / "inside.ckpt"), max_steps=4)


def _one_checkpoint(tmp_path: Path) -> Path:
    steps = ModelCheckpoint(dirpath=str(tmp_path / "steps"), filename="{step}", every_n_train_steps=2, save_top_k=-1)
    _fit(tmp_path / "ref", "auto", False, max_steps=2, callbacks=[steps])
    return tmp_path / "steps" / "step=2.ckpt"


@pytest.mark.parametrize(("overrides", "expected"), [([], 1), (["callbacks=none"], 1),
                                                     (["callbacks.exact_resume=null"], 0)])
def test_cli_adds_exact_resume_unless_turned_off(compose_cfg, overrides, expected):
    from lit_parallel.cli import _instantiate_group, _with_exact_resume

    cfg = compose_cfg(*overrides)
    callbacks = _with_exact_resume(_instantiate_group(cfg.get("callbacks")), cfg.get("callbacks"))
    assert sum(isinstance(c, ExactResume) for c in callbacks) == expected


def test_a_sampler_with_its_own_generator_is_left_alone_with_a_warning(tmp_path):
    loader = _loader(1, True)
    own = torch.Generator().manual_seed(7)
    loader = DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=True, generator=own)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ExactResume()],
                        default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="RandomSampler of a dataloader has a generator of its own"):
        trainer.fit(TinyRegressor(), loader)
    assert loader.sampler.generator is own


def test_bad_seed_is_refused():
    with pytest.raises(ValueError, match=r"seed='1'; valid: an integer"):
        ExactResume(seed="1")


# -- every checkpoint path, 2 gloo ranks ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffle", "no_shuffle"])
def test_ddp_resumes_exactly_from_every_checkpoint_path(tmp_path, shuffle):
    _check_all_paths(tmp_path, "ddp", shuffle)


@pytest.mark.slow
def test_compressed_ddp_resumes_exactly_from_every_checkpoint_path(tmp_path):
    _check_all_paths(tmp_path, "ddp_powersgd", True)


@pytest.mark.slow
def test_diloco_resumes_exactly_from_every_checkpoint_path(tmp_path):
    _check_all_paths(tmp_path, "diloco", True)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["hybrid", "hybrid_tp2"])
def test_hybrid_resumes_exactly_from_every_checkpoint_path(tmp_path, strategy):
    _check_all_paths(tmp_path, strategy, True)


# -- a rank really killed (SIGKILL) mid-epoch under torchrun, then a fresh torchrun resumes -------------------
KILL_AT_STEP = 10  # mid-epoch 2; the newest checkpoints then are last.ckpt (end of epoch 1, step 8) and step=9.ckpt


class _PauseAt(Callback):
    """Rank 1 writes its pid and stops before the given step, so that the test kills it there."""

    def __init__(self, step: int, pid_file: str) -> None:
        self.step, self.pid_file = step, pid_file

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == 1:
            Path(self.pid_file + ".tmp").write_text(str(os.getpid()))
            os.replace(self.pid_file + ".tmp", self.pid_file)
            time.sleep(600)  # the test SIGKILLs this process long before


def _script(root: str, ckpt_path: str, pause_at: str) -> None:
    """Entry point of the torchrun workers: ``python -m torch.distributed.run ... this_file ROOT CKPT STEP``."""
    torch.set_num_threads(1)
    run = Path(root)
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=str(run / "checkpoints"), every_n_epochs=1, save_last=True, save_top_k=-1),
        ModelCheckpoint(dirpath=str(run / "checkpoints"), filename="{step}", every_n_train_steps=3, save_top_k=-1),
    ]
    if int(pause_at):
        callbacks.append(_PauseAt(int(pause_at), str(run / "rank1.pid")))
    state, _ = _fit(run, "ddp", True, ckpt_path=ckpt_path or None, callbacks=callbacks, world_size=2)
    if state is not None:
        torch.save(state, run / "final.pt")


_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                "LOCAL_WORLD_SIZE")


def _torchrun(root: Path, ckpt_path: str = "", pause_at: int = 0) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    root.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--max-restarts=0",
               __file__, str(root), ckpt_path, str(pause_at)]
    return subprocess.Popen(command, stdout=open(root / "log.txt", "w"), stderr=subprocess.STDOUT, env=env)


def _finish(proc: subprocess.Popen, root: Path) -> None:
    assert proc.wait(timeout=300) == 0, (root / "log.txt").read_text()[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rank_sigkilled_mid_epoch_under_torchrun_resumes_exactly(tmp_path):
    reference = _torchrun(tmp_path / "reference")
    killed = _torchrun(tmp_path / "killed", pause_at=KILL_AT_STEP)
    _finish(reference, tmp_path / "reference")
    pid_file = tmp_path / "killed" / "rank1.pid"
    deadline = time.monotonic() + 300
    while not pid_file.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pid_file.exists(), (tmp_path / "killed" / "log.txt").read_text()[-4000:]
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert killed.wait(timeout=300) != 0  # torchrun saw its worker die and stopped the other one
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert not (tmp_path / "killed" / "final.pt").exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "last.ckpt", "step=3.ckpt", "step=6.ckpt", "step=9.ckpt"]
    want = torch.load(tmp_path / "reference" / "final.pt", weights_only=True)
    # Copies: each resumed job writes its own checkpoints next to the one it resumes from.
    for name in ("last.ckpt", "step=9.ckpt"):
        run = tmp_path / f"resumed_{name}"
        run.mkdir()
        shutil.copy(checkpoints / name, run / name)
        _finish(_torchrun(run, ckpt_path=str(run / name)), run)
        _assert_bitwise_equal(want, torch.load(run / "final.pt", weights_only=True), name)


if __name__ == "__main__":
    _script(*sys.argv[1:4])
