"""Gradual magnitude pruning (Zhu & Gupta 2017), per optimizer step, correct on sharded models."""

from __future__ import annotations

from typing import Literal

import lightning as L
from torch import Tensor, nn
from typing_extensions import override

from lit_parallel.callbacks.pruning import _MaskPruning, prunable_modules
from lit_parallel.errors import ConfigurationError

__all__ = ["MagnitudePruning"]

_SCOPES = ("global", "layer")


class MagnitudePruning(_MaskPruning):
    """Zero the smallest-magnitude weights, following a sparsity schedule over optimizer steps.

    Every ``every_n_steps`` optimizer steps between ``start_step`` and ``end_step`` the masks are
    recomputed for the schedule's sparsity. The threshold is the exact k-th smallest ``|w|`` of the
    *whole* model even when its parameters are tensor-parallel ``DTensor`` shards or pipeline stages
    (the strategy's ``model_parallel_group``); data-parallel replicas compute identical masks.
    Pruned weights stay zero through optimizer steps: gradients are masked before each step, weights
    after it, and momentum / Adam moments are zeroed when masks change.

    Logged every training step: ``pruning/sparsity`` (all selected weights) and ``pruning/<name>``
    (each parameter).

    Args:
        target_sparsity: final fraction of zeros, in ``[0, 1)``.
        scope: ``"global"`` (one threshold over all selected weights) or ``"layer"`` (each weight
            tensor pruned to the same fraction).
        schedule: ``"cubic"`` (Zhu & Gupta: fast early, slow late), ``"one_shot"`` (the target at
            ``start_step``, masks then fixed) or ``"constant"`` (the target from ``start_step``, masks
            re-selected every ``every_n_steps`` until ``end_step``).
        start_step: optimizer step of the first pruning.
        end_step: step at which the schedule reaches the target; ``None``: three quarters of the run,
            leaving the rest to recover accuracy at the target sparsity.
        every_n_steps: optimizer steps between mask updates.
        parameter_regex: prune the parameters whose name (``pl_module.named_parameters()``) matches;
            default: the weights of Linear, Conv, Embedding and HF ``Conv1D`` layers (never norms or
            biases).
        make_permanent: at the end of fit, apply the masks one last time and release them; with
            ``False`` they stay and keep being enforced by a later ``fit``.

    Raises:
        ConfigurationError: ``target_sparsity`` outside ``[0, 1)``, ``end_step <= start_step``, an
            unknown ``scope`` or ``schedule``; at the start of fit, a regex that matches no parameter.

    Example::

        pruning = MagnitudePruning(target_sparsity=0.9, schedule="cubic", start_step=100, end_step=1000,
                                   every_n_steps=50)
        Trainer(callbacks=[pruning], max_steps=1200).fit(model, datamodule=dm)
        export_pruned(model, "pruned.pt")
    """

    def __init__(
        self,
        target_sparsity: float = 0.9,
        scope: Literal["global", "layer"] = "global",
        schedule: Literal["cubic", "one_shot", "constant"] = "cubic",
        start_step: int = 0,
        end_step: int | None = None,
        every_n_steps: int = 10,
        parameter_regex: str | None = None,
        make_permanent: bool = True,
    ) -> None:
        super().__init__(target_sparsity, schedule, start_step, end_step, every_n_steps, parameter_regex,
                         make_permanent)
        if scope not in _SCOPES:
            raise ConfigurationError(f"scope={scope!r} is unknown; valid: {list(_SCOPES)}.")
        self.scope = scope

    @override
    def _targets(self, pl_module: L.LightningModule) -> dict[str, nn.Parameter]:
        return {f"{name}.weight" if name else "weight": m.weight for name, m in prunable_modules(pl_module).items()}

    @override
    def _new_masks(self, sparsity: float) -> list[tuple[nn.Parameter, Tensor]]:
        assert self._layout is not None
        scores = [t.detach().abs() for t in self._layout.local_tensors()]
        masks = self._layout.masks(scores, sparsity, scope=self.scope)
        return list(zip(self._layout.tensors, masks, strict=True))
