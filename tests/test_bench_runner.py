"""bench/_runner.py: a hanging or crashing method becomes a row, and leaves no process behind;
bench/gpu_check.sh refuses in one line on a machine without CUDA."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _runner  # noqa: E402  (bench/ is not a package)

# A rank that reports two steps, starts a child (as launchers and data loaders do), writes both pids
# and then sleeps forever.
_SLEEPER = """
import os, subprocess, sys, time
sys.path.insert(0, {bench!r})
import _runner
_runner.report_progress(1)
_runner.report_progress(2)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10**6)"])
open({pids!r} + "." + os.environ["RANK"], "w").write(f"{{os.getpid()}} {{child.pid}}")
time.sleep(10**6)
"""


def _alive(pid: int) -> bool:
    """Running or sleeping; a zombie (dead, waiting for a parent that is init here) does not count."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _env(rank: int) -> dict[str, str]:
    return {**os.environ, "RANK": str(rank)}


def test_sleeping_forever_is_a_timed_out_row_and_no_process_survives(tmp_path):
    code = _SLEEPER.format(bench=str(Path(_runner.__file__).parent), pids=str(tmp_path / "pids"))
    outcome = _runner.run_processes([[sys.executable, "-c", code]] * 2, envs=[_env(0), _env(1)], timeout=3)
    assert outcome.status == "timed out after 3 s at step 2"
    assert not outcome.ok
    pids = [int(p) for rank in (0, 1) for p in (tmp_path / f"pids.{rank}").read_text().split()]
    assert len(pids) == 4
    assert [pid for pid in pids if _alive(pid)] == []


def test_a_crashing_rank_is_a_failed_row_naming_its_own_error():
    crash = "import sys; print('loading'); raise ValueError('bad shape (3, 4)')"
    peer = "import time; print('RuntimeError: Connection reset by peer'); time.sleep(10**6)"
    outcome = _runner.run_processes([[sys.executable, "-c", peer], [sys.executable, "-c", crash]], timeout=60,
                                    peer_grace=1)
    assert outcome.status == "failed: ValueError: bad shape (3, 4)"
    assert outcome.returncodes[1] == 1 and outcome.returncodes[0] < 0  # the hanging peer was killed


def test_methods_after_a_failure_still_run():
    rows = []
    for method, code in (("hang", "import time; time.sleep(10**6)"), ("crash", "raise SystemExit('no GPU')"),
                         ("silent", "raise SystemExit(3)"), ("ok", "print('done')")):
        outcome = _runner.run_processes([[sys.executable, "-c", code]], timeout=2)
        rows.append((method, outcome.status))
    assert rows == [("hang", "timed out after 2 s at step 0"), ("crash", "failed: no GPU"),
                    ("silent", "failed: rank 0 exited with status 3"), ("ok", "ok")]
    assert outcome.logs == ["done\n"]


def test_first_error_line_skips_peer_noise():
    log = "step 1\nRuntimeError: Connection closed by peer\nTraceback (most recent call last):\n" \
          "  File 'x', line 1\nKeyError: 'weight'\nDuring handling\nRuntimeError: later\n"
    assert _runner.first_error_line(log) == "KeyError: 'weight'"
    assert _runner.first_error_line("all fine\n") is None


def test_first_error_line_skips_traceback_source_and_places_a_bare_exception():
    # torch's batched_powerSGD_hook on torch 2.13: the source line names the exception before the error does.
    log = ('[rank1]: Traceback (most recent call last):\n'
           '[rank1]:   File "/x/overlap_bench.py", line 249, in _worker\n'
           '[rank1]:     raise ValueError("not this")\n'
           '[rank1]:   File "/t/powerSGD_hook.py", line 26, in _orthogonalize\n'
           '[rank1]:     raise AssertionError\n'
           '[rank1]: AssertionError\n')
    assert _runner.first_error_line(log) == "[rank1]: AssertionError (powerSGD_hook.py:26 in _orthogonalize)"
    with_message = 'Traceback (most recent call last):\n  File "a.py", line 3, in f\n    raise KeyError(1)\nKeyError: 1\n'
    assert _runner.first_error_line(with_message) == "KeyError: 1"


def test_guarded_turns_an_exception_into_a_status():
    assert _runner.guarded("x", lambda a: a + 1, 1) == (2, "ok")
    assert _runner.guarded("x", lambda: {}["w"]) == (None, "failed: KeyError: 'w'")


def test_mismatched_environments_are_refused():
    with pytest.raises(ValueError, match="2 commands but 1 environments"):
        _runner.run_processes([["true"], ["true"]], envs=[{}], timeout=1)


GPU_CHECK = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"


def _gpu_check(path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": path})


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_gpu_check_refuses_without_nvidia_smi_in_one_line():
    proc = _gpu_check(os.environ["PATH"])
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "gpu_check: no CUDA device: nvidia-smi is not installed; run this on a machine with an NVIDIA GPU and its "
        "driver."]
    assert proc.stdout == ""


def test_gpu_check_refuses_when_nvidia_smi_sees_no_gpu(tmp_path):
    fake = tmp_path / "nvidia-smi"  # what a container without a GPU passed through answers
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver' >&2\n"
                    "exit 9\n")
    fake.chmod(0o755)
    proc = _gpu_check(f"{tmp_path}:{os.environ['PATH']}")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "gpu_check: no CUDA device: nvidia-smi failed (no driver loaded, or no GPU visible to this container)."]
