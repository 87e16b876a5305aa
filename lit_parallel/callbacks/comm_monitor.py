"""Per-step gradient communication of the data-parallel sync: bytes sent, compression ratio, time."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lit_parallel.compression import CommStats, Compressor
from lit_parallel.strategies.context import parallel_context

__all__ = ["CommunicationMonitor"]


class CommunicationMonitor(Callback):
    """Logs what the strategy's gradient compressor sent at every optimizer step; prints a summary.

    Logged per optimizer step (this rank's values; the logger records rank 0's):

    - ``comm/bytes_sent``: payload bytes this rank handed to collectives, measured from the tensors.
    - ``comm/bytes_uncompressed``: bytes an exact all-reduce of the same gradients would hand over.
    - ``comm/compression_ratio``: the quotient of the two.
    - ``comm/time_s``: seconds spent compressing, communicating and decompressing.

    :meth:`summary_metrics` gives the run's totals (``comm/compression_ratio``, bytes per step), which
    :class:`~lit_parallel.callbacks.RunSummary` writes to ``summary.json``.

    Works with any strategy that exposes a :class:`~lit_parallel.compression.Compressor` as
    ``strategy.compressor``: :class:`~lit_parallel.CompressedDDPStrategy` (also uncompressed, where it
    counts the exact all-reduce) and :class:`~lit_parallel.HybridParallelStrategy`.

    Args:
        log_metrics: log the per-step values (the totals and the summary are kept either way).

    Example::

        trainer = Trainer(strategy="ddp_powersgd", devices=2, callbacks=[CommunicationMonitor()])
        trainer.fit(model)
        trainer.callbacks[0].totals.compression_ratio
    """

    def __init__(self, log_metrics: bool = True) -> None:
        self.log_metrics = log_metrics
        self.totals = CommStats()
        self.steps = 0
        self._compressor: Compressor | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._compressor = parallel_context(trainer.strategy).compressor
        if self._compressor is None and stage == "fit":
            rank_zero_warn(
                f"CommunicationMonitor: {type(trainer.strategy).__name__} has no `compressor`, nothing to "
                "monitor; use CompressedDDPStrategy or HybridParallelStrategy."
            )

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._compressor is not None:
            self._compressor.pop_stats()  # anything counted before training is not a training step's

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Accumulation micro-batches communicate nothing; a step that synced gradients has calls > 0.
        if self._compressor is not None and self._compressor.stats.calls:
            self._record(pl_module, self._compressor.pop_stats())

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._compressor is None or not self.steps:
            return
        t = self.totals
        rank_zero_info(
            f"CommunicationMonitor ({self._compressor!r}, rank 0): {self.steps} steps, "
            f"sent {t.bytes_sent / 2**20:.2f} MiB of {t.bytes_uncompressed / 2**20:.2f} MiB uncompressed "
            f"(ratio {t.compression_ratio:.1f}x), {t.bytes_sent / self.steps / 2**10:.1f} KiB/step, "
            f"comm time {t.time_s:.2f} s ({1000 * t.time_s / self.steps:.1f} ms/step)."
        )

    def summary_metrics(self) -> dict[str, float]:
        """This rank's totals over the training steps so far (empty before the first step).

        ``comm/compression_ratio`` is total uncompressed over total sent bytes (warm-up steps included);
        ``comm/bytes_sent_per_step``, ``comm/bytes_uncompressed_per_step`` and ``comm/time_s_per_step``
        are means over ``comm/steps`` optimizer steps.
        """
        if not self.steps:
            return {}
        t = self.totals
        return {"comm/compression_ratio": t.compression_ratio, "comm/bytes_sent_per_step": t.bytes_sent / self.steps,
                "comm/bytes_uncompressed_per_step": t.bytes_uncompressed / self.steps,
                "comm/time_s_per_step": t.time_s / self.steps, "comm/steps": float(self.steps)}

    @override
    def state_dict(self) -> dict[str, Any]:
        t = self.totals
        return {"steps": self.steps, "bytes_sent": t.bytes_sent, "bytes_uncompressed": t.bytes_uncompressed,
                "time_s": t.time_s, "calls": t.calls}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = state_dict["steps"]
        self.totals = CommStats(state_dict["bytes_sent"], state_dict["bytes_uncompressed"], state_dict["time_s"],
                                state_dict["calls"])

    def _record(self, pl_module: L.LightningModule, stats: CommStats) -> None:
        self.steps += 1
        self.totals.bytes_sent += stats.bytes_sent
        self.totals.bytes_uncompressed += stats.bytes_uncompressed
        self.totals.time_s += stats.time_s
        self.totals.calls += stats.calls
        if self.log_metrics:
            metrics = {
                "comm/bytes_sent": float(stats.bytes_sent),
                "comm/bytes_uncompressed": float(stats.bytes_uncompressed),
                "comm/compression_ratio": stats.compression_ratio,
                "comm/time_s": stats.time_s,
            }
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
