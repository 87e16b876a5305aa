"""Shared LightningModule base: a wrapped network, a loss, optimizer and schedule, and logging.

Every module of the project keeps its network in ``self.model`` and splits one step into
``model_inputs(batch)`` -> ``self.model(*args, **kwargs)`` -> ``loss_fn(outputs, loss_target(batch))``.
Strategies that must run the forward themselves (pipeline schedules feed ``model_inputs`` to the first
stage and ``loss_target`` to ``loss_fn`` on the last) rely on that split, through
``trainer.strategy.run_forward_loss(module, batch)``; plain Lightning strategies just call
:meth:`training_step`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from lit_parallel.errors import ConfigurationError


def real_device() -> Any:
    """A device context for small state (metrics) built inside ``trainer.init_module(empty_init=True)``:
    the current default device, or the CPU when that is the meta device (Lightning moves it later)."""
    device = torch.get_default_device()
    return torch.device("cpu" if device.type == "meta" else device)

__all__ = ["ParallelModule"]

_OPTIMIZERS = ("adamw", "adam", "sgd")
_SCHEDULES = ("constant", "cosine", "linear", "onecycle")


class ParallelModule(L.LightningModule):
    """Base class of :class:`ImageClassifier`, :class:`SequenceClassifier` and :class:`CausalLM`.

    Args:
        optimizer: ``"adamw"``, ``"adam"`` or ``"sgd"`` (momentum 0.9).
        lr: peak learning rate.
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD).
        lr_schedule: ``"constant"``, ``"cosine"`` or ``"linear"`` decay after warm-up, or ``"onecycle"``.
        warmup_steps: linear warm-up steps (``"cosine"``/``"linear"``); ``onecycle`` warms up 10 %.
        eps: the Adam/AdamW epsilon.
    """

    model: nn.Module

    def __init__(
        self,
        optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: Literal["constant", "cosine", "linear", "onecycle"] = "constant",
        warmup_steps: int = 0,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if optimizer not in _OPTIMIZERS:
            raise ConfigurationError(f"model.optimizer={optimizer!r} is unknown; valid: {list(_OPTIMIZERS)}.")
        if lr_schedule not in _SCHEDULES:
            raise ConfigurationError(f"model.lr_schedule={lr_schedule!r} is unknown; valid: {list(_SCHEDULES)}.")
        if not lr > 0:
            raise ConfigurationError(f"model.lr={lr} must be > 0.")
        if warmup_steps < 0:
            raise ConfigurationError(f"model.warmup_steps={warmup_steps} must be >= 0.")
        self.optimizer_name, self.lr, self.weight_decay = optimizer, lr, weight_decay
        self.lr_schedule, self.warmup_steps, self.eps = lr_schedule, warmup_steps, eps

    # -- the step split that parallel strategies rely on -------------------------------------------
    def model_inputs(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Positional and keyword arguments of ``self.model`` for one batch."""
        raise NotImplementedError

    def loss_target(self, batch: Any) -> torch.Tensor:
        """The tensor the loss compares outputs with (labels); pipeline schedules carry it to the last stage."""
        raise NotImplementedError

    def loss_fn(self, outputs: Any, target: torch.Tensor) -> torch.Tensor:
        """Mean loss from the model's outputs (a tensor of logits, or an object with ``.logits``)."""
        raise NotImplementedError

    def compute_loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        """Mean loss of the batch: ``loss_fn(outputs, loss_target(batch))``."""
        return self.loss_fn(outputs, self.loss_target(batch))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def forward_loss(self, batch: Any) -> tuple[torch.Tensor, Any]:
        """Run the model on ``batch``; return ``(loss, outputs)``. Strategies may replace this step."""
        runner = getattr(self._trainer.strategy, "run_forward_loss", None) if self._trainer else None
        if runner is not None:
            return runner(self, batch)
        args, kwargs = self.model_inputs(batch)
        outputs = self.model(*args, **kwargs)
        return self.compute_loss(outputs, batch), outputs

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, _ = self.forward_loss(batch)
        # sync_dist makes the logged value the global mean, identical on every rank.
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True, sync_dist=True)
        return loss

    # -- optimization ------------------------------------------------------------------------------
    def _param_groups(self) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            # Norms, biases and embeddings' 1-d params are never decayed (the usual convention).
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        groups = [{"params": decay, "weight_decay": self.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self) -> Any:
        groups = self._param_groups()
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=0.9)
        elif self.optimizer_name == "adam":
            optimizer = torch.optim.Adam(groups, lr=self.lr, eps=self.eps)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.lr, eps=self.eps)
        if self.lr_schedule == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if self.lr_schedule == "onecycle":
            scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=self.lr, total_steps=total, pct_start=0.1
            )
        else:
            warmup, cosine = self.warmup_steps, self.lr_schedule == "cosine"

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                progress = min(1.0, (step - warmup) / max(1, total - warmup))
                return 0.5 * (1 + math.cos(math.pi * progress)) if cosine else 1.0 - progress

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
