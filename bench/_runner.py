"""Running a benchmark's subject so that the benchmark survives it: timeouts, crashes, cleanup.

Every method a bench script measures runs as its own processes (one per rank), each in a process group
of its own. :func:`run_processes` waits for them up to a deadline and always returns an
:class:`Outcome`: when a method hangs, the row reads ``timed out after N s at step K``; when a rank
crashes, ``failed: <first error line>`` (the failing rank's own error, not its peers' lost
connections). Either way every process group is terminated, then killed, then reaped before the call
returns, so that the caller can delete network namespaces and go on with the next method.

Workers call :func:`report_progress` after each step; that is where ``at step K`` comes from.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Outcome", "PROGRESS_ENV", "first_error_line", "guarded", "report_progress", "run_processes"]

PROGRESS_ENV = "BENCH_PROGRESS_FILE"
# Peers of a crashed rank report the lost connection; those lines never name the cause.
_PEER_NOISE = ("Connection reset", "Connection closed", "Connection refused", "Broken pipe", "SIGTERM", "SIGKILL")
_ERROR = re.compile(r"(^|\s)[A-Za-z_][\w.]*(Error|Exception|Exit)\b:?|error:")
# torch.distributed prefixes every line of a rank's traceback with ``[rankN]:``.
_RANK_PREFIX = re.compile(r"^\[rank\d+\]:")
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')
_BARE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception)")


def report_progress(step: int) -> None:
    """Worker side: ``step`` steps are done (no-op outside :func:`run_processes`)."""
    path = os.environ.get(PROGRESS_ENV)
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(str(step))
        tmp.replace(path)  # the orchestrator never reads a half-written number


@dataclass
class Outcome:
    """What became of one method's processes.

    Attributes:
        status: ``"ok"``, ``"timed out after N s at step K"`` or ``"failed: <first error line>"``.
        returncodes: each process's exit status (negative: killed by that signal).
        logs: each process's stdout and stderr, interleaved.
    """

    status: str
    returncodes: list[int | None] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def first_error_line(log: str) -> str | None:
    """The first line of ``log`` that names an error (``ValueError: ...``), peers' connection noise skipped.

    A traceback's source lines (``raise AssertionError`` under its ``File ...`` line) are not errors. An
    exception without a message (a bare ``AssertionError``) gets the place that raised it appended, the
    last ``File "...", line N, in f`` of its traceback: ``AssertionError (powerSGD_hook.py:26 in f)``.
    """
    frame = None
    previous = ""
    for line in log.splitlines():
        text = _RANK_PREFIX.sub("", line)
        location = _FRAME.match(text)
        source_line = _FRAME.match(previous) is not None
        previous = text
        if location:
            frame = f"{Path(location['file']).name}:{location['line']} in {location['func']}"
            continue
        if source_line or not _ERROR.search(line) or any(noise in line for noise in _PEER_NOISE):
            continue
        bare = _BARE.fullmatch(text.strip())
        return f"{line.strip()} ({frame})" if bare and frame else line.strip()
    return None


def _kill_groups(procs: Sequence[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM every process group, SIGKILL what is left after ``grace`` seconds, then reap."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)  # the group: also the worker's own children (launchers, loaders)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
    for proc in procs:
        proc.wait()


def _progress(files: Sequence[Path]) -> int | None:
    steps = []
    for path in files:
        try:
            steps.append(int(path.read_text()))
        except (OSError, ValueError):
            steps.append(0)
    return min(steps) if steps else None


def run_processes(
    commands: Sequence[Sequence[str]],
    *,
    timeout: float,
    envs: Sequence[Mapping[str, str]] | None = None,
    peer_grace: float = 30.0,
) -> Outcome:
    """Run one method's processes (one per rank) to completion, failure or ``timeout``; never raises for them.

    Args:
        commands: one command per process.
        timeout: seconds for the whole method, from the first start.
        envs: one environment per process (default: this process's).
        peer_grace: seconds the other ranks get to finish after one rank failed (they usually hang in
            a collective with the dead rank).

    Returns:
        The outcome; every process and its process group is gone when it returns.
    """
    envs = list(envs) if envs is not None else [dict(os.environ)] * len(commands)
    if len(envs) != len(commands):
        raise ValueError(f"{len(commands)} commands but {len(envs)} environments; valid: one each.")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        logs = [Path(tmp) / f"rank{i}.log" for i in range(len(commands))]
        progress = [Path(tmp) / f"rank{i}.step" for i in range(len(commands))]
        procs: list[subprocess.Popen] = []
        first_failed: int | None = None
        status = "ok"
        try:
            start = time.monotonic()
            for command, env, log, step_file in zip(commands, envs, logs, progress, strict=True):
                with open(log, "w") as out:
                    procs.append(subprocess.Popen(list(command), env={**env, PROGRESS_ENV: str(step_file)},
                                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
            deadline = start + timeout
            while [p.poll() for p in procs].count(None):  # every one polled: returncode is set by poll()
                failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
                if failed and first_failed is None:
                    first_failed = failed[0]
                    deadline = min(deadline, time.monotonic() + peer_grace)
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            if first_failed is None:
                failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
                first_failed = failed[0] if failed else None
            if any(p.poll() is None for p in procs) and first_failed is None:
                step = _progress(progress)
                status = f"timed out after {timeout:g} s at step {step}"
        finally:
            _kill_groups(procs)
        texts = [log.read_text(errors="replace") for log in logs]
        if first_failed is not None:
            order = [first_failed, *(i for i in range(len(texts)) if i != first_failed)]
            line = next((e for e in map(first_error_line, (texts[i] for i in order)) if e), None)
            last = [t.strip() for t in texts[first_failed].splitlines() if t.strip()]
            code = procs[first_failed].returncode
            status = f"failed: {line or (last[-1] if last else f'rank {first_failed} exited with status {code}')}"
        return Outcome(status, [p.returncode for p in procs], texts)


def guarded(label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, str]:
    """``(fn(*args, **kwargs), "ok")``, or ``(None, "failed: <first error line>")`` if it raised.

    For measurements that run in-process (their ranks started by ``lit_parallel.testing.run_distributed``,
    which kills them on its own timeout): a failure becomes the row ``label``'s status and the script
    goes on with the next measurement.
    """
    try:
        return fn(*args, **kwargs), "ok"
    except Exception as err:  # noqa: BLE001  (any failure of the subject is a row, not the end of the bench)
        text = f"{type(err).__name__}: {err}"
        line = first_error_line(text) or text.splitlines()[0]
        print(f"{label}: {line}", flush=True)
        return None, f"failed: {line}"
