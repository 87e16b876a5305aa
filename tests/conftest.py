"""Shared fixtures: fast single-threaded torch, offline hub access, a composed-config factory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Every strategy run by the suite verifies after each optimizer step that its replicas are bitwise equal.
os.environ.setdefault("LIT_PARALLEL_REPLICA_CHECK_EVERY_N_STEPS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def compose_cfg(tmp_path):
    """Compose the CLI config with overrides, writing outputs under ``tmp_path``."""
    from lit_parallel.cli import compose

    def _compose(*overrides: str):
        return compose([*overrides, f"output_dir={tmp_path}"])

    return _compose


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    """Tests that train in-process must not leak their process group into the next test."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
