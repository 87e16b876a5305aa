"""Shared measurement helpers of the bench scripts."""

from __future__ import annotations

import time

import lightning as L


class StepTimer(L.Callback):
    """Wall time of every training batch (forward, backward, optimizer step), in seconds."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, *args) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._t0)
