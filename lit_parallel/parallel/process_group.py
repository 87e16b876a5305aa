"""Process-group start-up that survives torchrun restarts.

With ``TORCHELASTIC_USE_AGENT_STORE=True`` torch's ``env://`` rendezvous connects every worker to the
agent's TCPStore *without* a per-attempt key prefix. After torchrun restarts the workers, the gloo
rendezvous of the new attempt can read the listening address that a dead worker of the previous attempt
left under the same key, and ``connectFullMesh`` fails with "Connection refused" (or waits for a peer
that no longer exists). A raw-torch script usually escapes this race because all its ranks reach
``init_process_group`` within microseconds; a Lightning program, whose ranks arrive seconds apart,
loses it. :func:`init_process_group` namespaces the store by ``TORCHELASTIC_RESTART_COUNT`` so every
attempt rendezvouses only with its own workers.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["init_process_group", "restart_attempt"]


def restart_attempt() -> int | None:
    """The torchrun restart count of this worker, or ``None`` outside torchelastic's agent store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def init_process_group(backend: str, rank: int, world_size: int, timeout: timedelta,
                       device_id: torch.device | None = None, **kwargs: Any) -> None:
    """``torch.distributed.init_process_group`` with a per-attempt store under torchrun.

    Reads ``MASTER_ADDR``/``MASTER_PORT`` like ``env://``; does nothing if a group already exists.
    """
    if dist.is_initialized():
        return
    if device_id is not None and device_id.type != "cpu":
        kwargs["device_id"] = device_id
    attempt = restart_attempt()
    if attempt is None:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
        return
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout,
    )
    store = dist.PrefixStore(f"/lit_parallel/attempt_{attempt}", agent_store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
