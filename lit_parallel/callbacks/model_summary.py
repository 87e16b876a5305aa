"""Lightning's model summary, without the FLOPs it did not measure."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelSummary as _LightningModelSummary
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table
from typing_extensions import override

__all__ = ["ModelSummary"]


class ModelSummary(_LightningModelSummary):
    """The layer table and parameter counts of Lightning's ``ModelSummary``; FLOPs only when measured.

    Lightning counts FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` during a forward pass of
    the module's ``example_input_array``. A module without one is never run, yet Lightning prints
    ``Total FLOPs: 0`` and a column of zeros; this summary leaves both out in that case and keeps them
    when the count was measured.

    Args:
        max_depth: depth of the layer table (``-1``: all layers, ``0``: no summary).

    Example::

        Trainer(callbacks=[ModelSummary(max_depth=2)])
    """

    @staticmethod
    @override
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        if total_flops:
            _LightningModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                             total_training_modes, total_flops, **summarize_kwargs)
            return
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        rank_zero_info("\n" + "\n".join(line for line in table.splitlines() if not line.endswith("Total Flops")))
