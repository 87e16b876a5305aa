"""The multi-process harness itself: results, failing-rank tracebacks, dead ranks and hangs."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from lit_parallel.testing import DistributedRunError, run_distributed


def _all_reduce_rank() -> float:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return t.item()


def _raise_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # rank 0 would wait forever without the harness


def _die_on_rank_one() -> None:
    if dist.get_rank() == 1:
        os._exit(7)
    time.sleep(60)


def _hang() -> None:
    time.sleep(600)


def test_results_from_every_rank():
    assert run_distributed(_all_reduce_rank, world_size=2) == [3.0, 3.0]


def test_failing_rank_traceback_is_raised():
    start = time.monotonic()
    with pytest.raises(DistributedRunError, match=r"rank 1 raised:(.|\n)*ValueError: boom on rank one"):
        run_distributed(_raise_on_rank_one, world_size=2, timeout=60)
    assert time.monotonic() - start < 60


def test_dead_rank_is_reported():
    with pytest.raises(DistributedRunError, match="rank 1 died with exit code 7"):
        run_distributed(_die_on_rank_one, world_size=2, timeout=60)


def test_hang_times_out():
    with pytest.raises(DistributedRunError, match=r"timed out after 3s; ranks \[0\]"):
        run_distributed(_hang, world_size=1, timeout=3, init_process_group=False)
