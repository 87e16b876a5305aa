"""Structured pruning: whole neurons (Linear rows) or channels (Conv output channels) by their Ln norm."""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
from torch import Tensor, nn
from typing_extensions import override

from lit_parallel.callbacks.pruning import _CONVS, _hf_conv1d, _MaskPruning, prunable_modules
from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.pruning import expand_row_mask, row_norms

__all__ = ["StructuredPruning"]

_DIMS = ("neurons", "channels")


class StructuredPruning(_MaskPruning):
    """Zero whole output neurons / channels with the smallest Ln norm, in every selected layer.

    Each selected weight loses the same fraction of its output slices (rows of a Linear weight,
    columns of an HF ``Conv1D``, output channels of a Conv), scored by the Ln norm of the slice; the
    matching bias entries are zeroed too, so a pruned unit outputs exactly zero before its activation.
    Row norms of tensor-parallel weights are reduced over their shards, so the choice equals the one on
    the unsharded model; schedules, enforcement through optimizer steps, logging and checkpointing are
    those of :class:`~lit_parallel.callbacks.MagnitudePruning`.

    Args:
        target_sparsity: final fraction of pruned neurons/channels per layer, in ``[0, 1)``.
        dim: ``"neurons"`` (Linear and HF ``Conv1D`` layers, except the last Linear, whose rows are the
            model's classes/vocabulary) or ``"channels"`` (Conv layers).
        norm: the ``p`` of the Ln norm (``1``, ``2``, ... or ``math.inf``).
        schedule: ``"cubic"``, ``"one_shot"`` or ``"constant"`` (see ``MagnitudePruning``).
        start_step: optimizer step of the first pruning.
        end_step: step at which the schedule reaches the target; ``None``: three quarters of the run.
        every_n_steps: optimizer steps between mask updates.
        parameter_regex: prune the (at least 2-d) parameters whose name matches instead; their slices
            along dim 0 are the pruned units.
        make_permanent: at the end of fit, apply the masks one last time and release them.

    Raises:
        ConfigurationError: a bad sparsity, step range, ``dim`` or ``norm``; at the start of fit, a regex
            that matches no parameter.

    Example::

        Trainer(callbacks=[StructuredPruning(target_sparsity=0.5, dim="neurons", norm=2)]).fit(model)
    """

    def __init__(
        self,
        target_sparsity: float = 0.5,
        dim: Literal["neurons", "channels"] = "neurons",
        norm: float = 2,
        schedule: Literal["cubic", "one_shot", "constant"] = "cubic",
        start_step: int = 0,
        end_step: int | None = None,
        every_n_steps: int = 10,
        parameter_regex: str | None = None,
        make_permanent: bool = True,
    ) -> None:
        super().__init__(target_sparsity, schedule, start_step, end_step, every_n_steps, parameter_regex,
                         make_permanent)
        if dim not in _DIMS:
            raise ConfigurationError(f"dim={dim!r} is unknown; valid: {list(_DIMS)}.")
        if not (isinstance(norm, (int, float)) and (norm >= 1 or math.isinf(norm))):
            raise ConfigurationError(f"norm={norm!r} is not a valid Ln norm; valid: a number >= 1 or math.inf.")
        self.dim, self.norm = dim, float(norm)
        # parameter -> (its output dimension, the bias sharing that dimension)
        self._units: dict[int, tuple[int, nn.Parameter | None]] = {}

    @override
    def _targets(self, pl_module: L.LightningModule) -> dict[str, nn.Parameter]:
        conv1d = _hf_conv1d()
        kinds = _CONVS if self.dim == "channels" else (nn.Linear, *conv1d)
        modules = prunable_modules(pl_module, kinds)
        linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
        if self.dim == "neurons" and linears:
            del modules[linears[-1]]
        self._units = {}
        for module in modules.values():
            out_dim = 1 if conv1d and isinstance(module, conv1d) else 0
            self._units[id(module.weight)] = (out_dim, getattr(module, "bias", None))
        return {f"{name}.weight" if name else "weight": m.weight for name, m in modules.items()}

    def _unit(self, param: nn.Parameter) -> tuple[int, nn.Parameter | None]:
        # Parameters chosen by regex: slices along dim 0, no bias.
        return self._units.get(id(param), (0, None))

    @override
    def _new_masks(self, sparsity: float) -> list[tuple[nn.Parameter, Tensor]]:
        assert self._layout is not None
        dims = [self._unit(t)[0] for t in self._layout.tensors]
        for name, tensor in zip(self._layout.names, self._layout.tensors, strict=True):
            if tensor.ndim < 2:
                raise ConfigurationError(f"parameter {name!r} is {tensor.ndim}-d; structured pruning needs >= 2-d.")
        scores = [row_norms(t, d, self.norm) for t, d in zip(self._layout.tensors, dims, strict=True)]
        row_masks = self._layout.masks(scores, sparsity, scope="layer",
                                       contributes=self._layout.structured_contributes())
        weight_masks = [expand_row_mask(m, t, d) for m, t, d in zip(row_masks, self._layout.tensors, dims,
                                                                     strict=True)]
        return self._with_biases(weight_masks, row_masks)

    def _with_biases(self, weight_masks: list[Tensor], row_masks: list[Tensor]) -> list[tuple[nn.Parameter, Tensor]]:
        assert self._layout is not None
        pairs = list(zip(self._layout.tensors, weight_masks, strict=True))
        for tensor, rows in zip(self._layout.tensors, row_masks, strict=True):
            bias = self._unit(tensor)[1]
            if bias is not None:
                pairs.append((bias, expand_row_mask(rows, bias, 0)))
        return pairs

    @override
    def _masks_from_weights(self) -> list[tuple[nn.Parameter, Tensor]]:
        assert self._layout is not None
        # A pruned unit is an all-zero slice: its norm is exactly zero (full vector even for shards).
        dims = [self._unit(t)[0] for t in self._layout.tensors]
        row_masks = [row_norms(t, d, self.norm) > 0 for t, d in zip(self._layout.tensors, dims, strict=True)]
        weight_masks = [expand_row_mask(m, t, d) for m, t, d in zip(row_masks, self._layout.tensors, dims,
                                                                     strict=True)]
        return self._with_biases(weight_masks, row_masks)
