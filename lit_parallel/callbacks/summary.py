"""End-of-run summary: throughput, wall time and final metrics, printed once on rank 0."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lit_parallel.callbacks.comm_monitor import CommunicationMonitor
from lit_parallel.strategies.context import parallel_context

__all__ = ["RunSummary"]


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        batch = batch.get("input_ids", next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    return int(batch.shape[0])


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v.numel() == 1}


class RunSummary(Callback):
    """Measures training throughput and wall time; ``summary()`` returns them with the logged metrics.

    Throughput counts distinct samples: every data-parallel replica's batches, not the copies that
    tensor/pipeline peers share. The summary is also written to ``<output_dir>/summary.json``.

    Metrics: the last logged value of every scalar (``trainer.test`` starts its metrics afresh, so the
    values training logged per step, such as ``pruning/sparsity``, are kept from the end of fit), and the
    totals of a :class:`~lit_parallel.callbacks.CommunicationMonitor` (``comm/compression_ratio``, bytes
    per step) when one ran.

    Args:
        output_dir: where to write ``summary.json`` (``None``: the trainer's ``default_root_dir``).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        self.output_dir = output_dir
        self.samples = 0
        self.fit_seconds = 0.0
        self._t0: float | None = None
        self._fit_metrics: dict[str, float] = {}
        self.start_time = time.perf_counter()

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.samples += _batch_size(batch)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._t0 is not None:
            self.fit_seconds += time.perf_counter() - self._t0
            self._t0 = None
        self._fit_metrics = _scalars(trainer.callback_metrics)

    def summary(self, trainer: L.Trainer) -> dict[str, Any]:
        """Metrics, throughput (global samples/s) and wall time of the run so far."""
        dp = parallel_context(trainer.strategy).data_parallel_size
        out: dict[str, Any] = self._fit_metrics | _scalars(trainer.callback_metrics)
        for callback in trainer.callbacks:
            if isinstance(callback, CommunicationMonitor):
                # The run's totals replace the last step's comm/* values.
                out = {k: v for k, v in out.items() if not k.startswith("comm/")} | callback.summary_metrics()
        out["train_samples"] = self.samples * dp
        out["throughput_samples_per_s"] = self.samples * dp / self.fit_seconds if self.fit_seconds else 0.0
        out["fit_seconds"] = self.fit_seconds
        out["wall_seconds"] = time.perf_counter() - self.start_time
        out["global_step"] = trainer.global_step
        out["world_size"] = trainer.world_size
        out["output_dir"] = str(self.output_dir or trainer.default_root_dir)
        return out

    @rank_zero_only
    def report(self, trainer: L.Trainer, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Print the summary table and write ``summary.json``; returns the summary."""
        data = self.summary(trainer) | (extra or {})
        path = Path(data["output_dir"])
        path.mkdir(parents=True, exist_ok=True)
        (path / "summary.json").write_text(json.dumps(data, indent=2, sort_keys=True))
        width = max(len(k) for k in data)
        lines = ["", "=" * 60, "lit_parallel run summary", "-" * 60]
        for key in sorted(data):
            value = data[key]
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"{key:<{width}}  {shown}")
        lines.append("=" * 60)
        print("\n".join(lines), flush=True)
        return data
