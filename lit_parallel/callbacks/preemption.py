"""Preemption: stop every rank at one step boundary, write a complete checkpoint, exit with "restart me".

Schedulers announce a preemption with a signal and kill the job a grace period later: Kubernetes and SLURM send
``SIGTERM`` (``terminationGracePeriodSeconds``, SLURM's ``KillWait``/``GraceTime``), SLURM sends ``SIGUSR1`` ahead
of the time limit with ``#SBATCH --signal=SIGUSR1@90``, and torchrun forwards the signals it receives to its
workers (``--signals-to-handle``) and kills them ``--shutdown-timeout`` seconds later (default 30).

Lightning 2.6.6 alone does not survive this on every rank: its ``SIGTERM`` handler broadcasts from inside the
handler (a collective the other ranks never join when the signal reached rank 1 only), its loops then raise
``SIGTERMException``, whose exit code is 0 (torchrun treats the job as finished, nothing restarts), and its SLURM
``SIGUSR1`` handler writes ``hpc_ckpt_<n>.ckpt`` wherever the signal lands, possibly between the forward pass and
the optimizer step (:class:`~lit_parallel.callbacks.ExactResume` reports such a checkpoint as not exact).

:class:`Preemption` replaces both handlers with one that only records the signal. At each optimizer-step boundary
(``on_train_batch_end``, after the optimizer step; every ``check_every_n_steps``-th step) the ranks all-reduce
(max) one integer over the whole world, so all of them see the same answer at the same step; if any rank got a
signal, every rank writes the same complete checkpoint there (``trainer.save_checkpoint``: atomic, a DCP folder
for the hybrid strategy), waits until it is written, and exits with ``exit_code`` (143 = 128 + SIGTERM, what a
process killed by ``SIGTERM`` reports). After a ``SIGUSR1`` under SLURM, global rank 0 first requeues the job
(``scontrol requeue``, as Lightning's handler does).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lit_parallel.errors import ConfigurationError

__all__ = ["PREEMPTION_EXIT_CODE", "Preempted", "Preemption", "any_rank_flagged"]

# 128 + SIGTERM: the status of a process killed by SIGTERM. Non-zero, so torchrun restarts its workers while
# --max-restarts remain; in 128..255, so Kubeflow's PyTorchJob `restartPolicy: ExitCode` counts it as retryable.
PREEMPTION_EXIT_CODE = 128 + signal.SIGTERM
_STEP_FILENAME = "step{step:07d}.ckpt"  # the name lit-parallel's checkpoint_every_n_steps gives (cli.py)


class Preempted(SIGTERMException):
    """Raised on every rank after the preemption checkpoint is written; its exit status is ``code``.

    A subclass of Lightning's ``SIGTERMException`` (a ``SystemExit``): ``on_exception`` hooks see it, nothing
    catching ``Exception`` swallows it, and the process exits with ``code``.
    """

    def __init__(self, code: int, step: int, path: str) -> None:
        super().__init__(code)
        self.step, self.path = step, path


def any_rank_flagged(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` is set on any rank of the default process group (itself when there is none).

    One all-reduce (max) of a one-element integer tensor, so every rank gets the same answer; every rank must call
    it at the same point of its program.

    Args:
        flag: this rank's flag.
        device: where the tensor lives (``cuda`` for NCCL).

    Returns:
        The flag of all ranks together.

    Example::

        stop = any_rank_flagged(got_signal, trainer.strategy.root_device)
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    # A signal handler may run between two bytecodes of any collective; it only sets `flag`, which is read here,
    # at a point every rank reaches in the same order of collectives.
    tensor = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


class Preemption(Callback):
    """On ``SIGTERM`` (and SLURM's requeue signal) stop all ranks at one step boundary with a complete checkpoint.

    The signal handler only records the signal (and the ``global_step`` it landed at). Every
    ``check_every_n_steps``-th optimizer step, after the optimizer step, all ranks agree through one all-reduce of
    one integer whether any of them was signalled; if so each rank writes the checkpoint of that step and the
    process exits with ``exit_code``. The restarted run resumes from it with ``ckpt_path=auto`` (``lit-parallel``)
    or an explicit ``ckpt_path`` and, with :class:`~lit_parallel.callbacks.ExactResume`, ends with the parameters
    of a run that was never interrupted.

    Where the checkpoint goes:

    * ``SIGTERM``: ``<dirpath>/step<global step, 7 digits>.ckpt``; ``dirpath`` defaults to
      ``<default_root_dir>/checkpoints/steps``, where ``lit-parallel``'s ``checkpoint_every_n_steps`` writes.
    * SLURM's requeue signal (``SLURMEnvironment.requeue_signal``, ``SIGUSR1``): Lightning's
      ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir`` (Lightning resumes from it by itself under SLURM); then, if
      the environment's ``auto_requeue`` is on, global rank 0 runs ``scontrol requeue <job id>``. A ``SIGTERM``
      under SLURM does not requeue: SLURM requeues preempted ``--requeue`` jobs itself, and a job cancelled with
      ``scancel`` must stay cancelled.

    Timing: the stop comes at most ``check_every_n_steps`` optimizer steps after the signal (plus any validation
    running then), followed by one checkpoint write; both must fit in the grace period. A signal that arrives
    after the last checkpoint-worthy step lets the run finish normally (exit 0). With gradient accumulation only
    optimizer-step boundaries count.

    Lightning's own handlers for these signals are replaced for the duration of ``fit`` (Lightning puts the
    previous handlers back when it tears down), so ``trainer.received_sigterm`` stays ``False``.

    Args:
        dirpath: folder of the ``SIGTERM`` checkpoints; ``None``: ``<default_root_dir>/checkpoints/steps``.
        check_every_n_steps: how often the ranks agree (one all-reduce of 4 bytes each time); 1 stops at the step
            boundary right after the signal.
        exit_code: exit status after the checkpoint; must be non-zero, since torchrun treats 0 as "finished".

    Raises:
        ConfigurationError: ``check_every_n_steps`` is not a positive integer, ``exit_code`` is not in
            1..255, ``dirpath`` is not a path, or the callback is built outside the main thread (Python runs signal
            handlers only there).

    Example::

        # torchrun --nproc-per-node=4 --max-restarts=3 train.py   (kill -TERM <a worker> → restart, exact resume)
        trainer = L.Trainer(max_steps=10_000, callbacks=[ExactResume(), Preemption()])
        trainer.fit(model, loader, ckpt_path=find_resume_checkpoint(trainer.default_root_dir))
    """

    def __init__(self, dirpath: str | os.PathLike[str] | None = None, check_every_n_steps: int = 1,
                 exit_code: int = PREEMPTION_EXIT_CODE) -> None:
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int) or check_every_n_steps < 1:
            raise ConfigurationError(f"check_every_n_steps={check_every_n_steps!r}; valid: a positive integer "
                                     "(1 stops at the first step boundary after the signal).")
        if isinstance(exit_code, bool) or not isinstance(exit_code, int) or not 1 <= exit_code <= 255:
            raise ConfigurationError(f"exit_code={exit_code!r}; valid: an integer in 1..255 (0 tells torchrun and "
                                     f"SLURM the job finished, so nothing restarts; default {PREEMPTION_EXIT_CODE}).")
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise ConfigurationError(f"dirpath={dirpath!r}; valid: a folder path, or None for "
                                     "<default_root_dir>/checkpoints/steps.")
        if threading.current_thread() is not threading.main_thread():
            raise ConfigurationError("Preemption must be created (and fit run) in the main thread: Python runs "
                                     f"signal handlers only there; this is thread {threading.current_thread().name!r}.")
        self.dirpath = None if dirpath is None else str(dirpath)
        self.check_every_n_steps = check_every_n_steps
        self.exit_code = exit_code
        # What the handler recorded on this rank: the first signal and the global step it landed at.
        self.signal: signal.Signals | None = None
        self.received_at_step: int | None = None
        self._requeue_requested = False
        self._trainer: pl.Trainer | None = None
        self._requeue_signal: signal.Signals | None = None
        self._auto_requeue = False

    # -- signals ------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.signal, self.received_at_step, self._requeue_requested = None, None, False
        if stage != "fit":
            return
        self._trainer = trainer
        environment = trainer._accelerator_connector.cluster_environment
        slurm = isinstance(environment, SLURMEnvironment)
        self._requeue_signal = environment.requeue_signal if slurm else None
        self._auto_requeue = slurm and environment.auto_requeue
        connector = trainer._signal_connector
        register = type(connector).register_signal_handlers

        # Lightning installs its handlers right before the fit loop starts (after this hook, after the checkpoint
        # is restored) and records the handlers it replaces, which its teardown puts back. Ours go in right after
        # its, so no signal ever reaches its SIGTERM broadcast or its mid-step hpc save.
        def register_then_replace() -> None:
            register(connector)
            self._install()

        connector.register_signal_handlers = register_then_replace

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        trainer._signal_connector.__dict__.pop("register_signal_handlers", None)
        self._trainer = None

    def _install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        if self._requeue_signal is not None:
            signal.signal(self._requeue_signal, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only assignments: the handler runs between two bytecodes of whatever the main thread was doing,
        # possibly inside a collective or a checkpoint write.
        if signum == self._requeue_signal:
            self._requeue_requested = True
        if self.signal is None:
            self.signal = signal.Signals(signum)
            self.received_at_step = self._trainer.global_step if self._trainer is not None else None

    # -- the step boundary --------------------------------------------------------------------------------
    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._at_optimizer_step(trainer) or trainer.global_step % self.check_every_n_steps:
            return
        if any_rank_flagged(self.signal is not None, trainer.strategy.root_device):
            self._stop(trainer)

    @staticmethod
    def _at_optimizer_step(trainer: pl.Trainer) -> bool:
        """Whether this batch ended an accumulation window (the state a checkpoint can resume exactly from)."""
        if not trainer.lightning_module.automatic_optimization:
            return True
        progress = trainer.fit_loop.epoch_loop.batch_progress
        return progress.current.processed % trainer.accumulate_grad_batches == 0 or progress.is_last_batch

    def _stop(self, trainer: pl.Trainer) -> None:
        # Every rank takes the same decision, so all take the SLURM branch or none.
        requeue = any_rank_flagged(self._requeue_requested, trainer.strategy.root_device)
        if requeue:
            path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        else:
            folder = self.dirpath or os.path.join(trainer.default_root_dir, "checkpoints", "steps")
            path = os.path.join(folder, _STEP_FILENAME.format(step=trainer.global_step))
        # Rank 0's name for all: the hpc number comes from a directory listing that a fast rank's write may change.
        path = _from_rank_zero(path)
        if self.signal is not None:
            name = self.signal.name
            print(f"lit-parallel: preemption: rank {trainer.global_rank} received {name} at global_step "
                  f"{self.received_at_step}", file=sys.stderr, flush=True)
        trainer.save_checkpoint(path)  # every rank: the hybrid strategy writes shards, ExactResume gathers RNG
        from lit_parallel.plugins.async_checkpoint_io import wait_for_checkpoint

        wait_for_checkpoint(trainer.strategy)  # async_checkpoint: the background write is published before exiting
        trainer.strategy.barrier("preemption")  # nobody exits (and gets its peers killed) before it is complete
        if trainer.is_global_zero:
            print(f"lit-parallel: preemption: checkpoint of global_step {trainer.global_step} written to {path}; "
                  f"exiting with {self.exit_code}", file=sys.stderr, flush=True)
            if requeue and self._auto_requeue:
                _requeue_slurm_job()
        raise Preempted(self.exit_code, trainer.global_step, path)


def _from_rank_zero(value: str) -> str:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _requeue_slurm_job() -> None:
    """``scontrol requeue <job id>`` for the current job (array jobs: ``<array job id>_<task id>``), as Lightning's
    SLURM handler does."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job_id):
        raise ConfigurationError(f"SLURM job id {job_id!r} is not numeric; cannot requeue it.")
    try:
        result = subprocess.call(["scontrol", "requeue", job_id])
    except FileNotFoundError:
        print("lit-parallel: preemption: scontrol not found; the job is NOT requeued", file=sys.stderr, flush=True)
        return
    outcome = "requeued" if result == 0 else f"NOT requeued (scontrol exit status {result})"
    print(f"lit-parallel: preemption: SLURM job {job_id} {outcome}", file=sys.stderr, flush=True)

