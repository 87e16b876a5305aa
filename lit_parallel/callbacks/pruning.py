"""Shared machinery of the mask-based pruning callbacks, and :func:`export_pruned`.

:class:`~lit_parallel.callbacks.MagnitudePruning` and :class:`~lit_parallel.callbacks.StructuredPruning`
differ only in how they score and mask; the schedule, the enforcement of masks through optimizer steps,
logging and checkpointing live here. The shard-aware threshold search is in
:mod:`lit_parallel.parallel.pruning`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.pruning import (
    SCHEDULES,
    PruningLayout,
    check_sparsity,
    comm_device,
    local_tensor,
    schedule_sparsity,
)
from lit_parallel.strategies.context import parallel_context

__all__ = ["export_pruned", "prunable_modules"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _hf_conv1d() -> tuple[type, ...]:
    """transformers' GPT-2 style ``Conv1D`` (a Linear with a transposed weight), if transformers is there."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for pure-torch models
        return ()
    return (Conv1D,)


def prunable_modules(
    module: nn.Module, kinds: tuple[type, ...] | None = None
) -> dict[str, nn.Module]:
    """Qualified name -> module for the layers whose ``weight`` is pruned by default.

    Args:
        module: the model (a LightningModule or any ``nn.Module``).
        kinds: module types to select; default Linear, Conv, Embedding and HF ``Conv1D`` (never norms).
    """
    kinds = kinds or (nn.Linear, nn.Embedding, *_CONVS, *_hf_conv1d())
    seen: set[int] = set()
    found: dict[str, nn.Module] = {}
    for name, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        # Tied weights (GPT-2's lm_head and wte) are pruned once.
        if isinstance(sub, kinds) and isinstance(weight, Tensor) and id(weight) not in seen:
            seen.add(id(weight))
            found[name] = sub
    return found


def _select(pl_module: nn.Module, regex: str | None, default: dict[str, nn.Parameter],
            group: dist.ProcessGroup | None) -> dict[str, nn.Parameter]:
    """The parameters to prune: ``default``, or every parameter whose name matches ``regex``."""
    if regex is None:
        selected = default
    else:
        pattern = re.compile(regex)
        selected = {n: p for n, p in pl_module.named_parameters() if pattern.search(n)}
    found = torch.tensor([len(selected)], device=comm_device(group))
    if group is not None and dist.is_initialized():
        dist.all_reduce(found, group=group)
    if int(found) == 0:
        names = [n for n, _ in pl_module.named_parameters()]
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        what = f"parameter_regex={regex!r}" if regex is not None else "the default selection"
        raise ConfigurationError(f"{what} matches no parameter; available parameters: {shown}.")
    return selected


class _MaskPruning(Callback):
    """Schedule, mask enforcement, logging and checkpointing shared by the mask-based callbacks.

    Subclasses implement :meth:`_targets` (which weights) and :meth:`_new_masks` (masks for a sparsity).
    Masks are enforced after every optimizer step, gradients of pruned entries are zeroed before it,
    and optimizer state (momentum, Adam moments) of pruned entries is zeroed whenever masks change, so
    pruned weights stay exactly zero.
    """

    def __init__(
        self,
        target_sparsity: float,
        schedule: Literal["cubic", "one_shot", "constant"],
        start_step: int,
        end_step: int | None,
        every_n_steps: int,
        parameter_regex: str | None,
        make_permanent: bool,
    ) -> None:
        self.target_sparsity = check_sparsity(target_sparsity)
        if schedule not in SCHEDULES:
            raise ConfigurationError(f"schedule={schedule!r} is unknown; valid: {list(SCHEDULES)}.")
        if start_step < 0:
            raise ConfigurationError(f"start_step={start_step} must be >= 0.")
        if end_step is not None and end_step <= start_step:
            raise ConfigurationError(
                f"end_step={end_step} must be > start_step={start_step}; valid: a later step, or None "
                "(three quarters of the run's optimizer steps)."
            )
        if every_n_steps < 1:
            raise ConfigurationError(f"every_n_steps={every_n_steps} must be >= 1.")
        if parameter_regex is not None:
            try:
                re.compile(parameter_regex)
            except re.error as err:
                raise ConfigurationError(f"parameter_regex={parameter_regex!r} is not a regex: {err}.") from None
        self.schedule = schedule
        self.start_step, self.end_step, self.every_n_steps = start_step, end_step, every_n_steps
        self.parameter_regex = parameter_regex
        self.make_permanent = make_permanent
        # Internal state: set in on_train_start, restored from checkpoints.
        self._layout: PruningLayout | None = None
        self._masked: list[tuple[nn.Parameter, Tensor]] = []
        self._weight_masks: list[Tensor] = []
        self._resolved_end: int | None = None
        self._sync_every = 1  # the strategy's replica synchronization interval (local SGD / DiLoCo)
        self._last_update: int | None = None
        self._current_sparsity = 0.0
        self._logged: dict[str, float] = {}
        self._loaded: dict[str, Any] | None = None
        self._named: list[tuple[str, nn.Parameter]] = []
        self._names: dict[int, str] = {}
        self._mask_names: list[str] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(target_sparsity=self.target_sparsity, regex=self.parameter_regex)

    # -- subclass interface -------------------------------------------------------------------------
    def _targets(self, pl_module: L.LightningModule) -> dict[str, nn.Parameter]:
        """Default parameters of this kind of pruning, name -> parameter."""
        raise NotImplementedError

    def _new_masks(self, sparsity: float) -> list[tuple[nn.Parameter, Tensor]]:
        """(parameter, local keep-mask) pairs for ``sparsity``; weight masks first, in layout order."""
        raise NotImplementedError

    # -- hooks --------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._setup_layout(trainer, pl_module)

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for param, mask in self._masked:
                if param.grad is not None:
                    local_tensor(param.grad).mul_(mask)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._step(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply()
        if self.make_permanent:
            rank_zero_info(f"{type(self).__name__}: final sparsity {self._current_sparsity:.4f}; masks released.")
            self._masked, self._weight_masks, self._layout = [], [], None

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._layout is None:
            return
        state = {
            "last_update": self._last_update,
            "sparsity": self._current_sparsity,
            "end_step": self._resolved_end,
            "masks": {self._names[id(p)]: m.cpu() for p, m in self._masked},
        }
        checkpoint.setdefault("pruning", {})[self.state_key] = state

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._loaded = checkpoint.get("pruning", {}).get(self.state_key)

    # -- internals ----------------------------------------------------------------------------------
    def _setup_layout(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        group = parallel_context(trainer.strategy).model_parallel_group
        params = _select(pl_module, self.parameter_regex, self._targets(pl_module), group)
        self._layout = PruningLayout(params, group=group)
        self._named = list(pl_module.named_parameters())
        self._names = {id(p): n for n, p in self._named}
        self._resolved_end = self._resolve_end(trainer)
        self._sync_every = self._check_replica_sync(trainer)
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None
            self._apply()

    def _resolve_end(self, trainer: L.Trainer) -> int:
        if self.end_step is not None:
            return self.end_step
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ConfigurationError("end_step=None needs a finite run (max_steps or max_epochs); set end_step.")
        end = int(0.75 * total)
        if end <= self.start_step:
            raise ConfigurationError(
                f"end_step resolved to {end} (3/4 of {int(total)} steps), not > start_step={self.start_step}; "
                "set end_step or a smaller start_step."
            )
        return end

    def _check_replica_sync(self, trainer: L.Trainer) -> int:
        """Under local SGD / DiLoCo, mask updates must fall on synchronization steps.

        Between synchronizations the replicas differ, so masks computed from their weights would differ
        too; right after one (``global_step % sync_every == 0``) they are identical.
        """
        context = parallel_context(trainer.strategy)
        if not context.replicas_meet:
            raise ConfigurationError(
                f"{type(self).__name__} under Streaming DiLoCo ({type(trainer.strategy).__name__} with fragments > 1, "
                "overlap_steps > 0 or fragment_update_alpha > 0): the replicas never hold identical weights at one "
                "step, so their masks would differ; valid: fragments=1, overlap_steps=0, fragment_update_alpha=0."
            )
        every = context.replica_sync_every or 1
        if every == 1:
            return 1
        assert self._resolved_end is not None
        steps = {"start_step": self.start_step}
        if self.schedule != "one_shot":
            steps |= {"every_n_steps": self.every_n_steps, "end_step": self._resolved_end}
        bad = {name: value for name, value in steps.items() if value % every}
        if bad:
            raise ConfigurationError(
                f"{type(self).__name__}: {', '.join(f'{k}={v}' for k, v in bad.items())} under "
                f"{type(trainer.strategy).__name__} with sync_every={every}: the replicas are identical only "
                f"right after a synchronization, so masks can only be computed then; valid: multiples of {every}."
            )
        return every

    def _restore(self, state: dict[str, Any]) -> None:
        """Masks and schedule position from a checkpoint.

        Masks whose names or shapes do not fit this run (another sharding) are rebuilt from the restored
        weights instead, whose zeros are exactly the pruned entries.
        """
        assert self._layout is not None
        self._last_update = state["last_update"]
        if self.end_step is None and state["end_step"] is not None:
            # The schedule keeps the end it was resolved to, even if the resumed run is longer.
            self._resolved_end = state["end_step"]
        if self._last_update is None:
            return
        saved = state["masks"]
        params = dict(self._named)
        fits = set(self._layout.names) <= set(saved) and all(
            name in params and tuple(mask.shape) == tuple(local_tensor(params[name]).shape)
            for name, mask in saved.items()
        )
        if fits:
            # Weight masks first, in layout order, as _new_masks returns them.
            order = [*self._layout.names, *(n for n in saved if n not in set(self._layout.names))]
            self._masked = [(params[n], saved[n].to(local_tensor(params[n]).device)) for n in order]
        else:
            self._masked = self._masks_from_weights()
        self._mask_names = [self._names[id(p)] for p, _ in self._masked]
        self._weight_masks = [m for _, m in self._masked[: len(self._layout.tensors)]]
        self._record_sparsity()

    def _masks_from_weights(self) -> list[tuple[nn.Parameter, Tensor]]:
        """All (parameter, mask) pairs implied by the zeros of the current weights."""
        assert self._layout is not None
        return [(t, local_tensor(t).detach() != 0) for t in self._layout.tensors]

    def _due(self, step: int) -> bool:
        assert self._resolved_end is not None
        if step < self.start_step or step == self._last_update or step % self._sync_every:
            return False
        if self.schedule == "one_shot":
            return self._last_update is None
        if step > self._resolved_end:
            # Past the end the cubic schedule holds its masks; a late start still reaches the target once.
            return self.schedule == "cubic" and (self._last_update is None or self._last_update < self._resolved_end)
        return (step - self.start_step) % self.every_n_steps == 0 or step == self._resolved_end

    def _step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._layout is None:
            return
        step = trainer.global_step
        if self._due(step):
            assert self._resolved_end is not None
            sparsity = schedule_sparsity(self.schedule, step, self.target_sparsity, self.start_step,
                                         self._resolved_end)
            self._masked = self._new_masks(sparsity)
            self._mask_names = [self._names[id(p)] for p, _ in self._masked]
            self._weight_masks = [m for _, m in self._masked[: len(self._layout.tensors)]]
            self._last_update = step
            self._zero_optimizer_state(trainer)
            self._record_sparsity()
        self._apply()
        for key, value in self._logged.items():
            pl_module.log(key, value, on_step=True, on_epoch=False)

    def _apply(self) -> None:
        with torch.no_grad():
            for param, mask in self._masked:
                local_tensor(param.data).mul_(mask)

    def _zero_optimizer_state(self, trainer: L.Trainer) -> None:
        with torch.no_grad():
            for optimizer in trainer.optimizers:
                for param, mask in self._masked:
                    for value in optimizer.state.get(param, {}).values():
                        local = local_tensor(value) if isinstance(value, Tensor) else None
                        if local is not None and local.shape == mask.shape:
                            local.mul_(mask)

    def _record_sparsity(self) -> None:
        assert self._layout is not None
        overall, per_layer = self._layout.sparsity(self._weight_masks)
        self._current_sparsity = overall
        self._logged = {"pruning/sparsity": overall}
        for key, value in zip(self._layout.bucket_keys, per_layer, strict=True):
            self._logged[f"pruning/{key.split('@', 1)[0]}"] = value

    def sparsity(self) -> float:
        """Fraction of pruned elements among the selected parameters (all ranks, each element once)."""
        return self._current_sparsity


def export_pruned(module: nn.Module, path: str | Path) -> Path:
    """Write the pruned model so that plain torch / transformers load it.

    A Hugging Face model (``module`` itself or ``module.model``) is written with ``save_pretrained``
    to the folder ``path``; when heads were removed, their indices are in ``config.pruned_heads`` and
    :func:`lit_parallel.callbacks.load_pruned` rebuilds the smaller model. Any other module's
    ``state_dict`` is written with ``torch.save`` to the file ``path``.

    Args:
        module: a LightningModule with a ``model`` attribute, or the network itself.
        path: output folder (Hugging Face) or file (plain torch).

    Returns:
        The path written.

    Example::

        export_pruned(lightning_module, "bert-pruned/")
        model = load_pruned("bert-pruned/")
    """
    path = Path(path)
    # Unwrap only a LightningModule: HF models have a ``model`` attribute of their own (the base model).
    net = module.model if isinstance(module, L.LightningModule) and hasattr(module, "model") else module
    if hasattr(net, "save_pretrained"):
        net.save_pretrained(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, path)
    return path
