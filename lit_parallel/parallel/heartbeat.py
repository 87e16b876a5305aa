"""Hang detection: every rank publishes a heartbeat in the rendezvous store and watches its peers'.

A rank that stops (``SIGSTOP``, a frozen node, a process stuck in the kernel) never fails a collective:
its peers wait in the collective until the process-group timeout (30 minutes by default) and often
longer, since gloo and NCCL may also block in teardown. :class:`HeartbeatMonitor` runs a daemon thread on
every rank that, every ``interval`` seconds, writes ``"<beat> <step> <pid> <host>"`` under its rank in a
key-value store and reads the heartbeats of up to :data:`WATCHED_PEERS` peers in one ``multi_get``. A peer
whose beat has not changed for ``hang_timeout`` seconds of *this* rank's monotonic clock (no clock
synchronization needed) is silent: the monitor prints ::

    HangDetected: rank 1 has been silent for 5.2 s (last seen at step 12); this rank (0) waited in
    all_reduce (torch/distributed/distributed_c10d.py:3245), called from lit_parallel/...py:88 in _sync

dumps every thread's stack (``faulthandler``), SIGKILLs the silent peer if it runs on this host (a
stopped process ignores everything else, and under Lightning's launcher no one else would end it), and
leaves with ``os._exit(HANG_EXIT_CODE)`` (a thread blocked inside gloo cannot hold it). The launcher
then stops the remaining ranks: torchrun's agent on any non-zero exit, Lightning's process observer
likewise.

Only store operations run in the thread, no collective. When the store itself stops answering for
``hang_timeout`` seconds, its host is silent: under Lightning's launcher and plain ``env://`` that is
rank 0 (``store_host_rank=0``), which hosts the TCPStore server in its own process. A TCPStore call does
not honour its timeout when the server's process is stopped (torch 2.13), so a second daemon thread
judges the store by the time since the last completed round.

Why not torch's own tools (torch 2.13): NCCL's watchdog and heartbeat monitor
(``TORCH_NCCL_ENABLE_MONITORING``) exist only for NCCL; the flight recorder records gloo collectives
(``TORCH_FR_BUFFER_SIZE``) but never marks them started or completed and is read only on demand;
torchelastic's expiration timers (``torch.distributed.elastic.timer``) work only under torchrun and kill
the stuck rank without telling its peers which rank or collective it was; ``monitored_barrier`` is a
collective, so it cannot run while the main thread is blocked in one.

A rank that is alive but stuck (a deadlocked or mismatched collective) keeps beating; it is ended by
the process group's collective ``timeout`` (every strategy's ``timeout=``), which raises on the ranks
that wait. The heartbeat's step tells, in the message, how far each peer got.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import Any

import torch.distributed as dist

__all__ = ["HANG_EXIT_CODE", "WATCHED_PEERS", "HangEvent", "HeartbeatMonitor", "heartbeat_store",
           "report_and_exit", "waiting_in", "watched_peers"]

HANG_EXIT_CODE = 1
# Each rank reads the heartbeats of the next WATCHED_PEERS ranks (ring order), so the store answers
# O(world_size * WATCHED_PEERS) keys per interval; every silent rank is still watched by that many peers.
WATCHED_PEERS = 8
_STOPPED = "stopped"  # written by stop(): a rank that finished is not silent
_DIST_DIR = os.path.join("torch", "distributed") + os.sep


@dataclass(frozen=True)
class HangEvent:
    """What a monitor found: the silent rank and where this rank was waiting.

    Attributes:
        rank: this rank.
        silent_rank: the peer that stopped beating.
        silent_for: seconds since its heartbeat last changed (this rank's clock).
        last_step: the step it last reported (``None``: never seen).
        pid: its process id, ``None`` if unknown.
        host: its host name, ``None`` if unknown.
        store_silent: the store did not answer either (its host is ``silent_rank``).
        waiting_in: :func:`waiting_in` of this rank's main thread.
    """

    rank: int
    silent_rank: int
    silent_for: float
    last_step: int | None
    pid: int | None
    host: str | None
    store_silent: bool
    waiting_in: str

    @property
    def message(self) -> str:
        """The one-line report printed before the process exits."""
        if self.last_step is None:
            seen = [] if self.store_silent else ["never seen"]  # a store host this rank does not watch
        else:
            seen = [f"last seen at step {self.last_step}" if self.last_step >= 0 else "last seen before its first step"]
        if self.store_silent:
            seen.append("the rendezvous store it hosts does not answer")
        return (f"HangDetected: rank {self.silent_rank} has been silent for {self.silent_for:.1f} s "
                f"({', and '.join(seen)}); this rank ({self.rank}) waited in {self.waiting_in}")


def _short(filename: str) -> str:
    for marker in (_DIST_DIR, os.sep + "lit_parallel" + os.sep, os.sep + "lightning" + os.sep):
        index = filename.rfind(marker)
        if index >= 0:
            return filename[index + 1:] if marker != _DIST_DIR else filename[index:]
    return filename


def waiting_in(frame: FrameType | None) -> str:
    """Describe the torch.distributed call a thread is blocked in, from its innermost ``frame``.

    The outermost frame inside ``torch/distributed/`` that is not a decorator wrapper or a private helper
    (of the innermost run of such frames) is the collective the caller asked for (``all_reduce``, ``barrier``, ``all_gather_object``, an FSDP
    hook, ...); the frame just outside it is the call site. Without any such frame (DDP's gradient
    all-reduce runs inside ``backward``'s C++ engine) the innermost frame is named.

    Args:
        frame: e.g. ``sys._current_frames()[threading.main_thread().ident]``.

    Returns:
        ``"all_reduce (torch/distributed/distributed_c10d.py:3245), called from train.py:12 in step"``.

    Example::

        import sys, threading
        print(waiting_in(sys._current_frames()[threading.main_thread().ident]))
    """
    stack: list[FrameType] = []
    while frame is not None:
        stack.append(frame)  # innermost first
        frame = frame.f_back
    if not stack:
        return "nothing (no Python frame)"
    innermost = next((i for i, f in enumerate(stack) if _DIST_DIR in f.f_code.co_filename), None)
    if innermost is None:
        top = stack[0]
        return (f"no torch.distributed call: {top.f_code.co_name} ({_short(top.f_code.co_filename)}:{top.f_lineno}) "
                "(DDP's gradient all-reduce, for one, waits inside backward's C++ engine)")
    outermost = innermost  # the call into torch.distributed, not an outer one such as torchrun's @record
    while outermost + 1 < len(stack) and _DIST_DIR in stack[outermost + 1].f_code.co_filename:
        outermost += 1
    inside = range(innermost, outermost + 1)
    named = [i for i in inside if not stack[i].f_code.co_name.startswith("_") and stack[i].f_code.co_name != "wrapper"]
    entry = stack[max(named) if named else outermost]
    where = f"{entry.f_code.co_name} ({_short(entry.f_code.co_filename)}:{entry.f_lineno})"
    if outermost + 1 < len(stack):
        caller = stack[outermost + 1]
        where += f", called from {_short(caller.f_code.co_filename)}:{caller.f_lineno} in {caller.f_code.co_name}"
    return where


def report_and_exit(event: HangEvent) -> None:
    """The default reaction to a hang: print, dump stacks, end a stopped local peer, ``os._exit``.

    Args:
        event: what the monitor found.
    """
    print(f"[rank {event.rank}] {event.message}", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    if event.pid is not None and event.host == socket.gethostname() and event.pid != os.getpid():
        try:
            os.kill(event.pid, signal.SIGKILL)  # SIGTERM would stay pending in a stopped process
            print(f"[rank {event.rank}] HangDetected: sent SIGKILL to rank {event.silent_rank} (pid {event.pid})",
                  file=sys.stderr, flush=True)
        except (ProcessLookupError, PermissionError):
            pass
    sys.stderr.flush()
    os._exit(HANG_EXIT_CODE)


def heartbeat_store(timeout: float, prefix: str = "/lit_parallel/heartbeat") -> dist.Store:
    """A store client of its own, with a short per-call timeout, on ``MASTER_ADDR:MASTER_PORT``.

    The process group's store client has the collective timeout and is shared with the main thread;
    a heartbeat read must fail fast when the store host stops. Under torchrun the keys live in a
    per-attempt namespace (``TORCHELASTIC_RESTART_COUNT``).

    Args:
        timeout: seconds each store call may take.
        prefix: key namespace.

    Returns:
        A :class:`torch.distributed.PrefixStore` over a new :class:`torch.distributed.TCPStore` client.
    """
    from lit_parallel.parallel.process_group import restart_attempt

    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=timedelta(seconds=timeout), wait_for_workers=False)
    return dist.PrefixStore(f"{prefix}/attempt_{restart_attempt() or 0}", client)


@dataclass
class _Peer:
    value: str | None = None
    changed_at: float = 0.0
    step: int | None = None
    pid: int | None = None
    host: str | None = None
    stopped: bool = False


class HeartbeatMonitor:
    """Publish this rank's heartbeat and report a peer silent for ``hang_timeout`` seconds.

    Args:
        store: a key-value store every rank reaches (see :func:`heartbeat_store`).
        rank: this rank.
        world_size: number of ranks.
        hang_timeout: seconds without a changed heartbeat after which a peer is silent (> 0).
        interval: seconds between heartbeats; default ``max(0.5, hang_timeout / 10)``.
        progress: returns this rank's step (read from the thread; e.g. ``lambda: trainer.global_step``).
        on_hang: called once with the :class:`HangEvent`; default :func:`report_and_exit`.
        store_host_rank: the rank whose process serves ``store`` (0 under Lightning's launcher and
            ``env://``), reported when the store stops answering; ``None`` (torchrun's agent store):
            a silent store is reported as rank 0's.
        clock: monotonic seconds (tests pass a fake clock).
        reconnect: returns a new store client, used after a failed call (e.g. ``heartbeat_store``).

    Raises:
        ValueError: ``hang_timeout`` or ``interval`` is not positive, or ``rank`` outside the world.

    Example::

        monitor = HeartbeatMonitor(heartbeat_store(timeout=2.0), dist.get_rank(), dist.get_world_size(),
                                   hang_timeout=60.0, progress=lambda: step)
        monitor.start()
        ...  # training; a peer silent for 60 s ends this process with a HangDetected message
        monitor.stop()
    """

    __slots__ = ("store", "rank", "world_size", "hang_timeout", "interval", "progress", "on_hang",
                 "store_host_rank", "clock", "reconnect", "_peers", "_beat", "_store_ok_at", "_threads", "_stop", "_main",
                 "_lock", "_reported", "_pid", "_host")

    def __init__(self, store: Any, rank: int, world_size: int, hang_timeout: float, interval: float | None = None,
                 progress: Callable[[], int] | None = None, on_hang: Callable[[HangEvent], None] | None = None,
                 store_host_rank: int | None = 0, clock: Callable[[], float] = time.monotonic,
                 reconnect: Callable[[], Any] | None = None) -> None:
        if not hang_timeout > 0:
            raise ValueError(f"hang_timeout={hang_timeout!r}; valid: seconds > 0.")
        interval = max(0.5, hang_timeout / 10) if interval is None else interval
        if not interval > 0:
            raise ValueError(f"interval={interval!r}; valid: seconds > 0.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} outside world_size={world_size}.")
        self.store, self.rank, self.world_size = store, rank, world_size
        self.hang_timeout, self.interval, self.progress = float(hang_timeout), float(interval), progress
        self.on_hang = on_hang or report_and_exit
        self.store_host_rank, self.clock, self.reconnect = store_host_rank, clock, reconnect
        now = clock()
        self._peers = {peer: _Peer(changed_at=now) for peer in watched_peers(rank, world_size)}
        self._beat = 0
        self._store_ok_at = now
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._reported = False
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._pid, self._host = os.getpid(), socket.gethostname()

    def _step(self) -> int:
        try:
            return int(self.progress()) if self.progress is not None else -1
        except Exception:  # noqa: BLE001 - the trainer may be half torn down; the beat matters, not the step
            return -1

    def check(self) -> HangEvent | None:
        """One round: write this rank's heartbeat, read the peers', return a hang if one is found."""
        now = self.clock()
        self._beat += 1
        keys = [str(r) for r in self._peers]
        try:
            self.store.set(str(self.rank), f"{self._beat} {self._step()} {self._pid} {self._host}")
            if keys and not self.store.check(keys):  # multi_get would wait for a peer that never wrote
                keys = [key for key in keys if self.store.check([key])]
            values = self.store.multi_get(keys) if keys else []
        except Exception:  # noqa: BLE001 - a timeout (DistStoreError) or a reset connection: the host is silent
            if self.reconnect is not None:
                # A TCPStore client whose call timed out may read that call's late answer as the next one's.
                try:
                    self.store = self.reconnect()
                except Exception:  # noqa: BLE001,S110 - still unreachable: judged by check_store
                    pass
            return self.check_store()
        self._store_ok_at = now
        for key, raw in zip(keys, values, strict=True):
            peer, value = self._peers[int(key)], bytes(raw).decode()
            if value != peer.value:
                peer.value, peer.changed_at = value, now
                peer.stopped = value == _STOPPED
                if not peer.stopped:
                    _, step, pid, host = value.split(" ", 3)
                    peer.step, peer.pid, peer.host = int(step), int(pid), host
        silent = [(now - p.changed_at, r) for r, p in self._peers.items()
                  if not p.stopped and now - p.changed_at > self.hang_timeout]
        if silent:
            silent_for, rank = max(silent)
            return self._event(rank, self._peers[rank], silent_for, store_silent=False)
        return None

    def check_store(self) -> HangEvent | None:
        """A hang if no round reached the store for ``hang_timeout`` seconds (its host is silent)."""
        now = self.clock()
        if now - self._store_ok_at <= self.hang_timeout:
            return None
        host = self.store_host_rank if self.store_host_rank is not None else 0
        peer = self._peers.get(host, _Peer(changed_at=self._store_ok_at))
        return self._event(host, peer, now - self._store_ok_at, store_silent=True)

    def _event(self, rank: int, peer: _Peer, silent_for: float, store_silent: bool) -> HangEvent:
        frame = sys._current_frames().get(self._main) if self._main is not None else None
        return HangEvent(self.rank, rank, silent_for, peer.step, peer.pid, peer.host, store_silent,
                         waiting_in(frame))

    def _report(self, event: HangEvent | None) -> bool:
        with self._lock:
            if event is None or self._stop.is_set() or self._reported:
                return False
            self._reported = True
        self.on_hang(event)
        return True

    def _beat_loop(self) -> None:
        while not self._report(self.check()) and not self._stop.wait(self.interval):
            pass

    def _store_watch(self) -> None:
        # A TCPStore call does not honour its timeout when the server process is stopped (torch 2.13:
        # ``check`` then blocks for good), so the rounds' progress is judged from this second thread.
        while not self._stop.wait(self.interval) and not self._report(self.check_store()):
            pass

    def start(self) -> None:
        """Start the daemon threads (the first heartbeat is written right away)."""
        if self._threads:
            return
        self._stop.clear()
        self._threads = [threading.Thread(target=target, name=f"lit_parallel-{name}", daemon=True)
                         for target, name in ((self._beat_loop, "heartbeat"), (self._store_watch, "store-watch"))]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the threads and mark this rank finished, so peers that still run do not report it."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.interval + 5)
        blocked = any(thread.is_alive() for thread in self._threads)  # in a store call that never returns
        self._threads = []
        if not blocked:
            try:
                self.store.set(str(self.rank), _STOPPED)
            except Exception:  # noqa: BLE001,S110 - a store that is gone has no peer left to tell
                pass


def watched_peers(rank: int, world_size: int) -> list[int]:
    """The ranks ``rank`` watches: the next :data:`WATCHED_PEERS` in ring order (every peer up to 9 ranks).

    Args:
        rank: the watching rank.
        world_size: number of ranks.

    Returns:
        e.g. ``watched_peers(3, 4) == [0, 1, 2]``.

    Example::

        assert watched_peers(0, 2) == [1]
    """
    return [(rank + i) % world_size for i in range(1, min(world_size - 1, WATCHED_PEERS) + 1)]
