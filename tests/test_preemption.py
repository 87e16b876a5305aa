"""Preemption: a signal stops every rank at one step boundary with a complete checkpoint; the restart is exact.

The runs train 12 steps (3 epochs of 4 steps: 64 samples, batch 16 over the data-parallel ranks) of a small
regressor with dropout and SGD with momentum on a plain shuffled ``DataLoader``, with ExactResume. A preempted run
gets its signal inside a training step (between the forward pass and the optimizer step, where Lightning's own
SLURM handler would have saved), stops at the next step boundary, and a restart resumes from the checkpoint
``ckpt_path=auto`` finds; its final fp32 parameters must equal those of the uninterrupted run bitwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_parallel.callbacks import ExactResume, Preempted, Preemption
from lit_parallel.callbacks.preemption import PREEMPTION_EXIT_CODE, any_rank_flagged
from lit_parallel.checkpointing import inspect
from lit_parallel.errors import ConfigurationError
from lit_parallel.testing import run_distributed

SEED, SAMPLES, STEPS_PER_EPOCH, MAX_STEPS = 1, 64, 4, 12


class TinyRegressor(L.LightningModule):
    """Sends ``signum`` to its own process inside training step ``global_step == signal_at`` on ``signal_rank``."""

    def __init__(self, signal_at: int = -1, signal_rank: int = 0, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.25), nn.Linear(16, 1))
        self.signal_at, self.signal_rank, self.signum = signal_at, signal_rank, signum

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self.net(batch[0]), batch[1])
        if self.global_step == self.signal_at and self.global_rank == self.signal_rank:
            os.kill(os.getpid(), self.signum)  # after the forward pass, before backward and optimizer step
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _loader(data_parallel_size: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(SAMPLES, 4, generator=g), torch.randn(SAMPLES, 1, generator=g))
    return DataLoader(data, batch_size=SAMPLES // STEPS_PER_EPOCH // data_parallel_size, shuffle=True)


def _fit(root: Path, strategy, *, world_size: int = 1, signal_at: int = -1, signal_rank: int = 0,
         callbacks: tuple[Callback, ...] = (), accumulate: int = 1, max_steps: int = MAX_STEPS):
    """One fit resuming from ``ckpt_path=auto`` (the newest complete checkpoint under ``root``); returns
    (the model, the full fp32 state dict on global rank 0)."""
    from lit_parallel.cli import resolve_ckpt_path

    L.seed_everything(SEED, verbose=False)
    model = TinyRegressor(signal_at, signal_rank)
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=strategy, max_steps=max_steps,
                        default_root_dir=str(root), logger=False, enable_progress_bar=False, limit_val_batches=0,
                        enable_model_summary=False, enable_checkpointing=False, accumulate_grad_batches=accumulate,
                        callbacks=[ExactResume(), *callbacks])
    trainer.fit(model, _loader(world_size), ckpt_path=resolve_ckpt_path("auto", root))
    if hasattr(trainer.strategy, "export_state_dict"):
        state = trainer.strategy.export_state_dict()
    else:
        state = {k: v.detach().cpu().clone() for k, v in model.net.state_dict().items()}
    return model, (state if trainer.is_global_zero else None)


def _assert_bitwise_equal(reference: dict[str, torch.Tensor], resumed: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(reference) == sorted(resumed), what
    for key, value in reference.items():
        assert value.dtype == torch.float32
        assert torch.equal(resumed[key], value), f"{what}: {key} differs by {(resumed[key] - value).abs().max()}"


# -- bad settings ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"check_every_n_steps": 0}, "check_every_n_steps=0; valid: a positive integer"),
    ({"check_every_n_steps": "2"}, "check_every_n_steps='2'; valid: a positive integer"),
    ({"check_every_n_steps": True}, "check_every_n_steps=True; valid: a positive integer"),
    ({"exit_code": 0}, r"exit_code=0; valid: an integer in 1..255 \(0 tells torchrun"),
    ({"exit_code": 256}, "exit_code=256; valid: an integer in 1..255"),
    ({"dirpath": 5}, "dirpath=5; valid: a folder path"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        Preemption(**kwargs)
    assert not dist.is_initialized()


def test_refused_outside_the_main_thread():
    errors: list[BaseException] = []

    def build() -> None:
        try:
            Preemption()
        except ConfigurationError as err:
            errors.append(err)

    thread = threading.Thread(target=build, name="worker")
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0]) and "'worker'" in str(errors[0])


# -- the agreement --------------------------------------------------------------------------------------
_CASES = (((), False), ((1,), True), ((0,), True), ((0, 1), True))  # flagged ranks -> the agreed answer


def _agree() -> list[bool]:
    return [any_rank_flagged(dist.get_rank() in flagged) for flagged, _ in _CASES]


@pytest.mark.slow  # spawning the ranks dominates
def test_every_rank_gets_the_same_answer():
    assert run_distributed(_agree, world_size=2) == [[expected for _, expected in _CASES]] * 2


def test_without_a_process_group_the_flag_is_its_own_answer():
    assert any_rank_flagged(True) and not any_rank_flagged(False)


class _Observer(Callback):
    """Records (global step, ``trainer.received_sigterm``) when the fit ends with an exception."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bool]] = []

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.seen.append((trainer.global_step, trainer.received_sigterm))


# -- one process: where it stops, what it writes, how it exits, the exact restart -------------------------
@pytest.mark.parametrize(("every", "accumulate", "signal_at", "stop_at"), [
    (1, 1, 5, 6),   # the step boundary right after the signal
    (3, 1, 4, 6),   # the next step that is a multiple of check_every_n_steps
    (1, 2, 2, 3),   # signal in the first micro-batch of step 3's window: stops after its optimizer step
], ids=["every_step", "every_3_steps", "accumulate_2"])
def test_sigterm_inside_a_step_stops_at_the_next_boundary_and_resumes_exactly(tmp_path, every, accumulate,
                                                                               signal_at, stop_at):
    previous_handler = signal.getsignal(signal.SIGTERM)
    max_steps = MAX_STEPS // accumulate
    _, reference = _fit(tmp_path / "reference", "auto", accumulate=accumulate, max_steps=max_steps)

    root = tmp_path / "preempted"
    preemption, observer = Preemption(check_every_n_steps=every), _Observer()
    with pytest.raises(Preempted) as stopped:
        _fit(root, "auto", signal_at=signal_at, callbacks=(preemption, observer), accumulate=accumulate,
             max_steps=max_steps)
    assert stopped.value.code == PREEMPTION_EXIT_CODE == 143
    assert (preemption.signal, preemption.received_at_step) == (signal.SIGTERM, signal_at)
    path = root / "checkpoints" / "steps" / f"step{stop_at:07d}.ckpt"
    assert stopped.value.path == str(path) and stopped.value.step == stop_at
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert inspect(path)["global_step"] == stop_at
    assert observer.seen == [(stop_at, False)]  # Lightning's handler never ran (its loops would exit with 0)
    assert signal.getsignal(signal.SIGTERM) is previous_handler  # put back by Lightning's teardown

    _, resumed = _fit(root, "auto", callbacks=(Preemption(check_every_n_steps=every),), accumulate=accumulate,
                      max_steps=max_steps)
    _assert_bitwise_equal(reference, resumed, f"resumed from {path.name}")


def test_slurm_requeue_signal_writes_hpc_checkpoint_at_a_step_boundary_and_requeues(tmp_path, monkeypatch):
    """Under SLURM, SIGUSR1 inside a step: Lightning's ``hpc_ckpt_1.ckpt`` at the next boundary (not inside the
    step), ``scontrol requeue <job id>``, exit 143; Lightning then resumes from it by itself (``ckpt_path=None`` under SLURM picks the newest hpc_ckpt)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    scontrol = fake_bin / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    for name, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
                        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "train",
                        "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)

    def fit(ckpt_path: str | None, **signal_at) -> TinyRegressor:
        L.seed_everything(SEED, verbose=False)
        model = TinyRegressor(**signal_at)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=MAX_STEPS, default_root_dir=str(tmp_path / "run"),
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, plugins=[SLURMEnvironment()],
                            callbacks=[ExactResume(), Preemption()])
        trainer.fit(model, _loader(1), ckpt_path=ckpt_path)
        return model

    reference = fit(None)
    assert not (tmp_path / "run").exists()  # nothing for Lightning's SLURM auto-resume to find in the next fit
    with pytest.raises(Preempted) as stopped:
        fit(None, signal_at=5, signum=signal.SIGUSR1)
    assert stopped.value.code == 143
    hpc = tmp_path / "run" / "hpc_ckpt_1.ckpt"
    assert stopped.value.path == str(hpc) and inspect(hpc)["global_step"] == 6
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert not (tmp_path / "run" / "checkpoints").exists()

    with warnings.catch_warnings(record=True) as record:  # none may say the checkpoint was written inside a step
        warnings.simplefilter("always")
        resumed = fit(None)
    assert not [w for w in record if "inside training step" in str(w.message)]
    assert resumed.trainer.ckpt_path == str(hpc)
    _assert_bitwise_equal(reference.net.state_dict(), resumed.net.state_dict(), "resumed from hpc_ckpt_1.ckpt")


def test_cli_adds_preemption_unless_turned_off(compose_cfg):
    from lit_parallel.cli import _instantiate_group, _with_preemption

    for overrides, expected in (([], 1), (["callbacks=none"], 1), (["callbacks.preemption=null"], 0)):
        cfg = compose_cfg(*overrides)
        callbacks = _with_preemption(_instantiate_group(cfg.get("callbacks")), cfg.get("callbacks"))
        assert sum(isinstance(c, Preemption) for c in callbacks) == expected, overrides


# -- under torchrun, 2 gloo ranks -------------------------------------------------------------------------
SIGNAL_AT = 5  # mid-epoch 1: the checkpoint is written at global_step 6


class _PauseUntilSignalled(Callback):
    """Rank 0 announces it reached ``global_step == step`` and waits there until its handler ran (the test then
    signals the torchrun agent, which forwards the signal to every worker)."""

    def __init__(self, step: int, ready_file: Path, preemption: Preemption) -> None:
        self.step, self.ready_file, self.preemption = step, ready_file, preemption

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step or trainer.global_rank != 0:
            return
        self.ready_file.write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while self.preemption.signal is None and time.monotonic() < deadline:
            time.sleep(0.05)


def _strategy(name: str):
    # The package's strategies, not Lightning's "ddp": theirs meet a restarted torchrun's workers per attempt
    # (docs/fault_tolerance.md, "The torchrun restart race").
    from lit_parallel import CompressedDDPStrategy, HybridParallelStrategy

    return {"compressed_ddp": CompressedDDPStrategy, "hybrid": HybridParallelStrategy}[name]()


def _script(root: str, strategy: str, mode: str) -> None:
    """A torchrun worker: ``python -m torch.distributed.run ... this_file ROOT STRATEGY MODE``.

    ``mode``: ``none`` (uninterrupted), ``rank`` (rank 1 signals itself inside step ``SIGNAL_AT`` of the first
    attempt) or ``agent`` (rank 0 waits at step ``SIGNAL_AT`` of the first attempt until the test signalled the
    agent). Each rank records the step its handler fired at and the exit status it leaves with.
    """
    torch.set_num_threads(1)
    run, attempt = Path(root), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    rank = int(os.environ["RANK"])
    preemption = Preemption()
    first_attempt = attempt == 0 and not (run / "checkpoints").exists()
    signal_at = SIGNAL_AT if mode == "rank" and first_attempt else -1
    callbacks: list[Callback] = [preemption]
    if mode == "agent" and first_attempt:
        callbacks.append(_PauseUntilSignalled(SIGNAL_AT, run / "ready", preemption))
    record = {"attempt": attempt, "first": first_attempt}
    try:
        _, state = _fit(run, _strategy(strategy), world_size=2, signal_at=signal_at, signal_rank=1,
                        callbacks=tuple(callbacks))
        record["exit"] = 0
    except SystemExit as stop:
        record["exit"] = stop.code
        raise
    finally:
        record |= {"signal": preemption.signal and preemption.signal.name, "received_at_step": preemption.received_at_step}
        (run / f"rank{rank}.attempt{attempt}.{'first' if first_attempt else 'later'}.json").write_text(json.dumps(record))
    if state is not None:
        torch.save(state, run / "final.pt")


_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                "LOCAL_WORLD_SIZE")


def _torchrun(root: Path, strategy: str, mode: str, max_restarts: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    root.mkdir(parents=True, exist_ok=True)
    # --standalone: a free port per job, so the jobs of a test (and of parallel tests) never meet.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               f"--max-restarts={max_restarts}", "--monitor-interval=0.5", "--shutdown-timeout=120",
               __file__, str(root), strategy, mode]
    return subprocess.Popen(command, stdout=open(root / "log.txt", "a"), stderr=subprocess.STDOUT, env=env)


def _log(root: Path) -> str:
    return (root / "log.txt").read_text()[-6000:]


def _records(root: Path, pattern: str) -> dict[int, dict]:
    return {int(p.name[4]): json.loads(p.read_text()) for p in sorted(root.glob(pattern))}


def _check_preempted_checkpoint(root: Path) -> None:
    steps = root / "checkpoints" / "steps"
    assert [p.name for p in steps.iterdir()] == [f"step{SIGNAL_AT + 1:07d}.ckpt"], _log(root)
    assert inspect(steps / f"step{SIGNAL_AT + 1:07d}.ckpt")["global_step"] == SIGNAL_AT + 1
    first = _records(root, "rank*.attempt*.first.json")
    # Every rank stopped with the documented status, at the same step.
    assert sorted(first) == [0, 1] and all(r["exit"] == PREEMPTION_EXIT_CODE for r in first.values()), first


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ["compressed_ddp", "hybrid"])
def test_sigterm_to_one_rank_under_torchrun_restarts_and_resumes_exactly(tmp_path, strategy):
    """SIGTERM to rank 1 inside step 6 of the first attempt; torchrun (``--max-restarts=1``) sees both workers
    exit with 143, restarts them, and they resume from ``ckpt_path=auto``."""
    reference = _torchrun(tmp_path / "reference", strategy, "none", max_restarts=0)
    preempted = _torchrun(tmp_path / "preempted", strategy, "rank", max_restarts=1)
    assert reference.wait(timeout=400) == 0, _log(tmp_path / "reference")
    assert preempted.wait(timeout=400) == 0, _log(tmp_path / "preempted")
    root = tmp_path / "preempted"
    _check_preempted_checkpoint(root)
    first = _records(root, "rank*.attempt0.first.json")
    assert first[1]["signal"] == "SIGTERM" and first[1]["received_at_step"] == SIGNAL_AT, first
    assert first[0]["signal"] is None  # rank 0 was never signalled: it stopped because the ranks agreed
    # The agent saw the status (it reports the first worker it found stopped) and restarted the group itself.
    assert f"failed (exitcode: {PREEMPTION_EXIT_CODE})" in (root / "log.txt").read_text(), _log(root)
    later = _records(root, "rank*.attempt1.later.json")
    assert sorted(later) == [0, 1] and all(r["exit"] == 0 for r in later.values()), later
    want = torch.load(tmp_path / "reference" / "final.pt", weights_only=True)
    _assert_bitwise_equal(want, torch.load(root / "final.pt", weights_only=True), f"{strategy}, restarted by torchrun")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_to_the_torchrun_agent_checkpoints_every_rank_and_a_new_launch_resumes_exactly(tmp_path):
    """SIGTERM to the agent (what Kubernetes sends to a pod's main process): it forwards the signal to every
    worker and exits; they checkpoint at the next boundary within ``--shutdown-timeout`` and exit with 143; the
    job launched again (the pod restarted) resumes exactly."""
    reference = _torchrun(tmp_path / "reference", "compressed_ddp", "none", max_restarts=0)
    root = tmp_path / "preempted"
    preempted = _torchrun(root, "compressed_ddp", "agent", max_restarts=3)
    deadline = time.monotonic() + 300
    while not (root / "ready").exists() and preempted.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (root / "ready").exists(), _log(root)
    preempted.send_signal(signal.SIGTERM)
    assert preempted.wait(timeout=300) != 0, _log(root)  # the agent stops (no restart of its own)
    _check_preempted_checkpoint(root)
    first = _records(root, "rank*.attempt0.first.json")
    assert first[0]["signal"] == "SIGTERM" and first[0]["received_at_step"] == SIGNAL_AT, first
    assert first[1]["signal"] == "SIGTERM", first  # forwarded by the agent to every worker
    assert not (root / "final.pt").exists()

    relaunched = _torchrun(root, "compressed_ddp", "agent", max_restarts=0)
    assert relaunched.wait(timeout=400) == 0, _log(root)
    assert reference.wait(timeout=400) == 0, _log(tmp_path / "reference")
    want = torch.load(tmp_path / "reference" / "final.pt", weights_only=True)
    _assert_bitwise_equal(want, torch.load(root / "final.pt", weights_only=True), "compressed_ddp, agent SIGTERM, relaunched")


class SignalAt(Callback):
    """``SIGTERM`` to this process at the start of step ``global_step == step`` (used by the CLI test)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_lit_parallel_exits_143_with_a_checkpoint_and_its_relaunch_resumes(tmp_path):
    """The default wiring: ``lit-parallel`` (Preemption on by default) exits 143 through Hydra and ``@record``;
    the same command again resumes from the preemption checkpoint with ``ckpt_path=auto``."""
    run = ["recipe=mnist_debug", "trainer.max_steps=12", "trainer.max_epochs=-1", "trainer.limit_train_batches=null",
           "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "run_test=false", "data.batch_size=16",
           "callbacks.model_checkpoint=null", "callbacks.lr_monitor=null", "trainer.devices=1",
           f"hydra.run.dir={tmp_path}"]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("TORCHELASTIC_")}
    env |= {"OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])}
    command = [str(Path(sys.executable).parent / "lit-parallel"), *run]
    stopped = subprocess.run([*command, "+callbacks.sig._target_=test_preemption.SignalAt", "+callbacks.sig.step=7"],
                             capture_output=True, text=True, timeout=300, env=env)
    assert stopped.returncode == PREEMPTION_EXIT_CODE, stopped.stderr[-4000:]
    checkpoint = tmp_path / "checkpoints" / "steps" / "step0000008.ckpt"
    assert inspect(checkpoint)["global_step"] == 8, stopped.stderr[-4000:]
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming from {checkpoint}" in resumed.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["global_step"] == 12 and summary["train_samples"] == 4 * 16  # steps 9..12 only


if __name__ == "__main__":
    _script(*sys.argv[1:4])
