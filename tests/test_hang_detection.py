"""Hang detection: a rank that stops makes its peers exit naming it, and no process of the job lingers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from lit_parallel.parallel.heartbeat import HangEvent, HeartbeatMonitor, waiting_in, watched_peers

BIN = Path(sys.executable).parent


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _monitors(world_size: int, clock: _Clock, store=None, **kwargs) -> list[HeartbeatMonitor]:
    store = store if store is not None else dist.HashStore()
    steps = {r: 10 * r for r in range(world_size)}
    return [HeartbeatMonitor(store, r, world_size, hang_timeout=5.0, progress=lambda r=r: steps[r], clock=clock,
                             on_hang=pytest.fail, **kwargs) for r in range(world_size)]


# -- the monitor, in one process -------------------------------------------------------------------
def test_a_peer_whose_heartbeat_stops_changing_is_reported_with_its_last_step():
    clock = _Clock()
    m0, m1, m2 = _monitors(3, clock)
    for _ in range(3):  # every rank beats for a while
        assert [m.check() for m in (m0, m1, m2)] == [None, None, None]
        clock.now += 1.0
    for _ in range(5):  # rank 1 stops; rank 0 saw its last beat at 103, so until 108 it is not silent
        assert m0.check() is None and m2.check() is None
        clock.now += 1.0
    clock.now += 0.5
    event = m0.check()
    assert isinstance(event, HangEvent)
    assert (event.rank, event.silent_rank, event.last_step, event.pid, event.store_silent) == (0, 1, 10, os.getpid(),
                                                                                               False)
    assert event.silent_for > 5.0
    assert "HangDetected: rank 1 has been silent for" in event.message
    assert "(last seen at step 10)" in event.message and "this rank (0) waited in" in event.message
    assert m2.check().silent_rank == 1  # rank 2 watches rank 1 too (ring order, wrapping around)


def test_a_rank_that_stopped_its_monitor_is_not_silent():
    clock = _Clock()
    m0, m1 = _monitors(2, clock)
    m0.check(), m1.check()
    m1.stop()  # finished training (teardown): peers that still run must not report it
    clock.now += 60.0
    assert m0.check() is None


def test_a_peer_never_seen_is_silent_after_hang_timeout():
    clock = _Clock()
    m0, _ = _monitors(2, clock)
    assert m0.check() is None
    clock.now += 5.5
    event = m0.check()
    assert event.silent_rank == 1 and event.last_step is None and "never seen" in event.message


class _DeadStore:
    """A store whose host stopped: every call times out."""

    def set(self, key, value):
        raise dist.DistStoreError("Socket Timeout")

    def check(self, keys):
        raise dist.DistStoreError("Socket Timeout")

    def multi_get(self, keys):
        raise dist.DistStoreError("Socket Timeout")


def test_a_store_that_stops_answering_names_its_host():
    clock = _Clock()
    store = dist.HashStore()
    m1 = _monitors(2, clock, store=store)[1]
    m0 = HeartbeatMonitor(store, 0, 2, hang_timeout=5.0, progress=lambda: 3, clock=clock)
    m0.check(), m1.check()
    m1.store = _DeadStore()  # rank 0, the store's host, stops
    clock.now += 4.0
    assert m1.check() is None
    clock.now += 2.0
    event = m1.check()
    assert (event.silent_rank, event.last_step, event.store_silent) == (0, 3, True)
    assert "rank 0 has been silent" in event.message and "store it hosts does not answer" in event.message


def test_a_failed_store_call_reconnects():
    clock = _Clock()
    store = dist.HashStore()
    monitor = HeartbeatMonitor(_DeadStore(), 0, 2, hang_timeout=5.0, clock=clock, reconnect=lambda: store)
    assert monitor.check() is None and monitor.store is store  # a timed-out client is replaced
    monitor.check()
    assert store.get("0").startswith(b"2 -1 ")


def test_a_store_call_that_never_returns_is_a_silent_store_host():
    clock = _Clock()
    m0, m1 = _monitors(2, clock)
    m0.check(), m1.check()
    clock.now += 5.5  # rank 1's rounds are stuck inside a store call (a stopped TCPStore server)
    event = m1.check_store()
    assert (event.silent_rank, event.last_step, event.store_silent) == (0, 0, True)


def test_the_monitor_thread_reports_a_silent_peer_once():
    events: list[HangEvent] = []
    reported = threading.Event()

    def on_hang(event: HangEvent) -> None:
        events.append(event)
        reported.set()

    store = dist.HashStore()
    peer = HeartbeatMonitor(store, 1, 2, hang_timeout=1.0, interval=0.1)
    peer.check()  # rank 1 beats once, then stops (no thread)
    monitor = HeartbeatMonitor(store, 0, 2, hang_timeout=1.0, interval=0.1, progress=lambda: 4, on_hang=on_hang)
    monitor.start()
    assert reported.wait(60)
    monitor.stop()
    assert len(events) == 1 and events[0].silent_rank == 1 and events[0].last_step == -1
    assert "(last seen before its first step)" in events[0].message
    assert "this rank (0) waited in no torch.distributed call: " in events[0].message  # the main thread waits here
    assert store.get("0") == b"stopped"


def test_watched_peers_ring():
    assert watched_peers(0, 1) == [] and watched_peers(0, 2) == [1] and watched_peers(3, 4) == [0, 1, 2]
    ranks = watched_peers(5, 100)
    assert ranks == list(range(6, 14))
    # every rank is watched by WATCHED_PEERS others
    assert sum(7 in watched_peers(r, 100) for r in range(100)) == len(ranks)


@pytest.mark.parametrize(("kwargs", "message"), [({"hang_timeout": 0}, "hang_timeout=0"),
                                                 ({"hang_timeout": 5, "interval": -1}, "interval=-1"),
                                                 ({"hang_timeout": 5, "rank": 2}, "rank=2")])
def test_monitor_arguments_are_checked(kwargs, message):
    kwargs = {"store": dist.HashStore(), "rank": 0, "world_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        HeartbeatMonitor(**kwargs)


# -- naming the collective -------------------------------------------------------------------------
class _Blocks:
    """Pickled inside ``all_gather_object``: holds the collective there until released."""

    entered = threading.Event()
    release = threading.Event()

    def __reduce__(self):
        _Blocks.entered.set()
        _Blocks.release.wait(30)
        return (int, (0,))


def _describe_blocked_collective() -> tuple[str, str]:
    thread = threading.Thread(target=lambda: dist.all_gather_object([None], _Blocks()))
    thread.start()
    assert _Blocks.entered.wait(30)
    inside = waiting_in(sys._current_frames()[thread.ident])
    _Blocks.release.set()
    thread.join()
    return inside, waiting_in(sys._getframe())


def test_waiting_in_names_the_collective_and_its_caller():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        inside, outside = _describe_blocked_collective()
    finally:
        dist.destroy_process_group()
    assert inside.startswith("all_gather_object (torch/distributed/distributed_c10d.py:"), inside
    assert "called from" in inside and "test_hang_detection.py" in inside and "in <lambda>" in inside
    assert outside.startswith("no torch.distributed call: _describe_blocked_collective ("), outside


# -- the strategy option ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -1.5, "soon", True, timedelta(0), float("nan")])
def test_bad_hang_timeouts_are_refused_before_any_process_group(value):
    from lit_parallel import CompressedDDPStrategy, DiLoCoStrategy, HybridParallelStrategy, LocalSGDStrategy
    from lit_parallel.errors import ConfigurationError

    for strategy in (CompressedDDPStrategy, LocalSGDStrategy, DiLoCoStrategy, HybridParallelStrategy):
        with pytest.raises(ConfigurationError, match=re.escape(f"{strategy.__name__}(hang_timeout={value!r})")):
            strategy(hang_timeout=value)
    assert not dist.is_initialized()


def test_hang_timeout_accepts_seconds_a_timedelta_and_the_environment(monkeypatch):
    from lit_parallel import CompressedDDPStrategy, HybridParallelStrategy
    from lit_parallel.errors import ConfigurationError

    assert CompressedDDPStrategy().hang_timeout is None
    assert CompressedDDPStrategy(hang_timeout=timedelta(minutes=2)).hang_timeout == 120.0
    monkeypatch.setenv("LIT_PARALLEL_HANG_TIMEOUT", "30")
    assert HybridParallelStrategy().hang_timeout == 30.0 and HybridParallelStrategy(hang_timeout=7).hang_timeout == 7
    monkeypatch.setenv("LIT_PARALLEL_HANG_TIMEOUT", "-3")
    with pytest.raises(ConfigurationError, match="LIT_PARALLEL_HANG_TIMEOUT=-3.0"):
        HybridParallelStrategy()


# -- the test: SIGSTOP one of 2 ranks ------------------------------------------------------
_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                "LOCAL_WORLD_SIZE")
HANG_TIMEOUT = 5
_RUN = ["recipe=mnist_debug", "trainer.max_steps=100000", "trainer.max_epochs=-1", "trainer.limit_train_batches=null",
        "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "checkpoint_every_n_steps=5", "run_test=false",
        "data.batch_size=16", "callbacks.model_checkpoint=null", "callbacks.lr_monitor=null"]


def _job_processes(marker: str) -> dict[int, dict[str, str]]:
    """Live (not zombie) processes whose environment carries ``marker``: pid -> environment."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in environ and state != "Z":
            pairs = (item.split(b"=", 1) for item in environ.split(b"\0") if b"=" in item)
            found[int(entry.name)] = {k.decode(): v.decode(errors="replace") for k, v in pairs}
    return found


def _rank_pid(marker: str, rank: int, launcher_pid: int, torchrun: bool) -> int:
    if not torchrun and rank == 0:
        return launcher_pid  # Lightning's launcher: the process we started is rank 0, the others its children
    key = "RANK" if torchrun else "LOCAL_RANK"
    (pid,) = [pid for pid, env in _job_processes(marker).items() if env.get(key) == str(rank)]
    return pid


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("launcher", "stopped", "strategy"), [
    pytest.param("torchrun", 1, "ddp", id="torchrun-1"),
    pytest.param("lightning", 1, "ddp", id="lightning-1"),
    pytest.param("lightning", 0, "ddp", id="lightning-0"),  # rank 0 serves the store in its own process
    pytest.param("torchrun", 0, "hybrid", id="torchrun-0-hybrid"),
])
def test_sigstopped_rank_makes_its_peer_exit_naming_it_and_nothing_lingers(tmp_path, launcher, stopped, strategy):
    marker = f"LIT_PARALLEL_HANG_TEST={uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **dict([marker.split("=")]))
    run = [*_RUN, "trainer.devices=2", f"hydra.run.dir={tmp_path}", f"strategy={strategy}",
           f"strategy.hang_timeout={HANG_TIMEOUT}"]
    if launcher == "torchrun":
        command = [str(BIN / "torchrun"), "--nnodes=1", "--nproc-per-node=2", "--max-restarts=0",
                   "-m", "lit_parallel.cli", *run]
    else:
        command = [str(BIN / "lit-parallel"), *run]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        steps = tmp_path / "checkpoints" / "steps"
        while not (steps.is_dir() and any(steps.glob("step*.ckpt"))):  # mid-training: a step checkpoint exists
            assert job.poll() is None, job.stdout.read()[-4000:]
            time.sleep(0.5)
        pid = _rank_pid(marker.split("=")[1], stopped, job.pid, launcher == "torchrun")
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        out, _ = job.communicate(timeout=HANG_TIMEOUT + 120)
        elapsed = time.monotonic() - stopped_at
        lingering = _job_processes(marker.split("=")[1])
    finally:
        for pid in _job_processes(marker.split("=")[1]):
            os.kill(pid, signal.SIGKILL)  # only when the test failed: asserted empty below
        job.kill()
    assert job.returncode != 0
    peer = 1 - stopped
    assert f"[rank {peer}] HangDetected: rank {stopped} has been silent for" in out, out[-4000:]
    assert f"this rank ({peer}) waited in" in out, out[-4000:]
    print(elapsed, [line for line in out.splitlines() if "HangDetected" in line])
    # The bound: the peer is gone within hang_timeout + 30 s of the stop (liveness, not speed).
    assert elapsed < HANG_TIMEOUT + 30, f"job ended {elapsed:.0f} s after the SIGSTOP"
    assert lingering == {}, f"processes of the job linger: {sorted(lingering)}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_that_finishes_is_not_reported_as_hung(tmp_path):
    # fit, then test (the monitor stops at each teardown and starts again), ranks finishing at different
    # times: a rank that finished writes "stopped", so its peer does not report it.
    run = [*_RUN, "trainer.max_steps=12", "run_test=true", "trainer.limit_test_batches=3", "trainer.devices=2",
           f"hydra.run.dir={tmp_path}", "strategy.hang_timeout=1"]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("TORCHELASTIC_")}
    done = subprocess.run([str(BIN / "lit-parallel"), *run], capture_output=True, text=True, timeout=240,
                          env=dict(env, OMP_NUM_THREADS="1"))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert out.count("hang detection: a rank silent for 1 s ends the run") == 2, out[-4000:]  # fit and test
    assert "HangDetected" not in out
