"""Run a function on N local processes with a process group, a hard timeout and clear failures.

Used by the test suite and handy for users' own equivalence tests::

    from lit_parallel.testing import run_distributed

    def check(scale):
        t = torch.ones(1) * (dist.get_rank() + 1) * scale
        dist.all_reduce(t)
        return t.item()

    assert run_distributed(check, world_size=2, args=(1.0,)) == [3.0, 3.0]

Each rank gets ``MASTER_ADDR``/``MASTER_PORT``/``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in its environment,
so a ``lightning.Trainer`` built inside ``fn`` joins the group itself (pass ``init_process_group=False``).
The first rank to fail has its traceback raised in the parent; a hang is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["DistributedRunError", "InjectFailure", "find_free_port", "run_distributed"]


class DistributedRunError(RuntimeError):
    """A rank raised, died or timed out; the message holds the first failing rank's traceback."""


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    init_process_group: bool,
    backend: str,
    collective_timeout: float,
    env: dict[str, str],
    results: Any,
) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), NODE_RANK="0", GROUP_RANK="0",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if init_process_group:
            dist.init_process_group(
                backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=collective_timeout)
            )
        # Plain pickle copies tensors by value; the queue's own pickler would share them through file
        # descriptors that vanish when this process exits.
        payload = pickle.dumps(fn(*args, **kwargs))
        results.put((rank, True, payload))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
        results.close()
        results.join_thread()  # make sure the traceback left this process before it exits
        # Skip interpreter teardown: destroying a group whose peers hang can itself hang.
        os._exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()


_PEER_ERRORS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "timed out")


def _first_failure(errors: dict[int, str]) -> str:
    """The root-cause traceback first (not a rank that only saw its peer disappear), then the others."""
    ranked = sorted(errors, key=lambda r: (any(m in errors[r] for m in _PEER_ERRORS), r))
    head = f"rank {ranked[0]} raised:\n{errors[ranked[0]]}"
    others = [f"rank {r} also failed: {errors[r].strip().splitlines()[-1]}" for r in ranked[1:]]
    return "\n".join([head, *others])


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    init_process_group: bool = True,
    backend: str = "gloo",
    timeout: float = 180.0,
    collective_timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned processes; return each rank's result.

    Args:
        fn: a picklable (module-level) function.
        world_size: number of ranks.
        args: positional arguments of ``fn``.
        kwargs: keyword arguments of ``fn``.
        init_process_group: create the default process group before calling ``fn``.
        backend: process-group backend (``"gloo"`` on CPU).
        timeout: seconds after which all ranks are killed and the run fails.
        collective_timeout: timeout of each collective of the process group.
        env: extra environment variables for every rank.

    Raises:
        DistributedRunError: a rank raised (its traceback is in the message), died, or the run timed out.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1.")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, fn, args, kwargs or {}, init_process_group, backend,
                  collective_timeout, env or {}, results),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outputs: dict[int, Any] = {}
    errors: dict[int, str] = {}
    failure: str | None = None
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) + len(errors) < world_size and failure is None:
            try:
                rank, ok, value = results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outputs]
                if errors:
                    failure = _first_failure(errors)
                elif dead:
                    time.sleep(1.0)  # its traceback may still be in flight
                    if results.empty():
                        failure = f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} and no traceback"
                elif time.monotonic() > deadline:
                    hung = sorted(set(range(world_size)) - set(outputs))
                    failure = f"timed out after {timeout:.0f}s; ranks {hung} never finished"
                continue
            if ok:
                outputs[rank] = pickle.loads(value)
            else:
                errors[rank] = value
                # Peers of a failing rank fail too ("connection reset"); give the root cause time to arrive.
                grace = time.monotonic() + 3.0
                while time.monotonic() < grace and len(outputs) + len(errors) < world_size:
                    try:
                        r, ok2, v = results.get(timeout=0.2)
                    except queue.Empty:
                        continue
                    if ok2:
                        outputs[r] = pickle.loads(v)
                    else:
                        errors[r] = v
                failure = _first_failure(errors)
    finally:
        for proc in procs:
            proc.join(timeout=5 if failure is None else 0.5)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    if failure is not None:
        raise DistributedRunError(failure)
    return [outputs[r] for r in range(world_size)]


def global_batch_order(num_samples: int, data_parallel_size: int, per_rank_batch: int, seed: int) -> list[int]:
    """Sample order under which one process sees, batch by batch, the union of every replica's batch.

    Lightning shuffles training data with ``DistributedSampler(seed=PL_GLOBAL_SEED)``: replica ``r``
    takes ``perm[r::dp]`` of the epoch-0 permutation. Feeding this order (as a ``sampler``, with batch
    size ``dp * per_rank_batch``) to a single-process run gives it exactly the same global batches,
    which is what an equivalence test compares against.
    """
    import torch

    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed)).tolist()
    shards = [perm[r::data_parallel_size] for r in range(data_parallel_size)]
    steps = len(shards[0]) // per_rank_batch
    return [
        i
        for s in range(steps)
        for r in range(data_parallel_size)
        for i in shards[r][s * per_rank_batch : (s + 1) * per_rank_batch]
    ]


class InjectFailure:
    """Callback that makes one rank fail at one optimizer step (fault-tolerance tests and drills).

    ``mode="sigkill"`` kills the process outright (no Python cleanup, like an OOM kill or a lost node);
    ``mode="raise"`` raises :class:`RuntimeError`. ``where="batch_start"`` fails before the step's
    forward; ``where="forward"`` fails inside the model's forward of that step (for a pipeline stage:
    in the middle of the schedule, with peers waiting on it). Under torchrun the failure fires only in
    attempt ``attempt`` (``TORCHELASTIC_RESTART_COUNT``), so the restarted job runs through::

        lit-parallel ... +callbacks.fail._target_=lit_parallel.testing.InjectFailure \\
            +callbacks.fail.step=12 +callbacks.fail.rank=1
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # Built lazily so that importing this module does not import Lightning.
        from lightning.pytorch.callbacks import Callback

        class _InjectFailure(Callback):
            def __init__(self, step: int, rank: int = 1, mode: str = "sigkill", where: str = "batch_start",
                         attempt: int = 0) -> None:
                if mode not in ("sigkill", "raise"):
                    raise ValueError(f"mode={mode!r}; valid: 'sigkill' or 'raise'.")
                if where not in ("batch_start", "forward"):
                    raise ValueError(f"where={where!r}; valid: 'batch_start' or 'forward'.")
                self.step, self.rank, self.mode, self.where, self.attempt = step, rank, mode, where, attempt

            def _fail(self, *_: Any) -> None:
                print(f"lit_parallel.testing: injecting {self.mode} on rank {self.rank} at step {self.step} "
                      f"(unix time {time.time():.3f})", file=sys.stderr, flush=True)
                if self.mode == "sigkill":
                    os.kill(os.getpid(), 9)
                raise RuntimeError(f"injected failure on rank {self.rank} at step {self.step}")

            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
                if trainer.global_step != self.step or trainer.global_rank != self.rank or restart != self.attempt:
                    return
                if self.where == "batch_start":
                    self._fail()
                for module in pl_module.modules():
                    if next(module.parameters(recurse=False), None) is not None:
                        module.register_forward_pre_hook(self._fail)
                        return

        return _InjectFailure(*args, **kwargs)
