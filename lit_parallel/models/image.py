"""Image classification: any ``nn.Module`` classifier, with a small MNIST CNN as the default."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from lit_parallel.errors import ConfigurationError
from lit_parallel.models.base import ParallelModule, real_device

__all__ = ["ImageClassifier", "mnist_cnn", "mlp"]


def mnist_cnn(num_classes: int = 10, channels: int = 32, hidden: int = 128) -> nn.Sequential:
    """A small CNN for 1x28x28 inputs (~99 % on MNIST after two epochs).

    A flat ``nn.Sequential`` so tensor-parallel plans and pipeline splits can address its layers.
    """
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * 7 * 7, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def mlp(in_features: int = 784, hidden: int = 256, depth: int = 2, num_classes: int = 10) -> nn.Sequential:
    """An MLP classifier (``Flatten`` then ``depth`` hidden ``Linear+ReLU`` blocks and a head)."""
    if depth < 1:
        raise ConfigurationError(f"model depth={depth} must be >= 1.")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


_NETS = {"mnist_cnn": mnist_cnn, "mlp": mlp}


class ImageClassifier(ParallelModule):
    """A LightningModule wrapping any image classifier; logs loss and accuracy.

    Args:
        net: the network (``nn.Module`` mapping images to logits) or the name of a built-in one
            (``"mnist_cnn"``, ``"mlp"``).
        num_classes: number of classes (for the metrics and the built-in nets).
        **optim: optimizer/schedule settings of :class:`ParallelModule` (``lr``, ``optimizer``, ...).

    Example::

        model = ImageClassifier(lr=2e-3, lr_schedule="onecycle")
        Trainer(max_epochs=2).fit(model, datamodule=MNISTDataModule())
    """

    def __init__(self, net: nn.Module | str = "mnist_cnn", num_classes: int = 10, **optim: Any) -> None:
        super().__init__(**optim)
        if isinstance(net, str):
            if net not in _NETS:
                raise ConfigurationError(f"model.net={net!r} is unknown; valid: {sorted(_NETS)} or an nn.Module.")
            net = _NETS[net](num_classes=num_classes)
        self.model = net
        self.num_classes = num_classes
        with real_device():  # metric states are small: real tensors even under empty_init (meta)
            self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
            self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def model_inputs(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (batch[0],), {}

    def loss_target(self, batch: Any) -> torch.Tensor:
        return batch[1]

    def loss_fn(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), target)

    def _eval_step(self, batch: Any, stage: str, metric: torchmetrics.Metric) -> None:
        loss, logits = self.forward_loss(batch)
        metric(logits, batch[1])
        self.log(f"{stage}/loss", loss, sync_dist=True, prog_bar=stage == "val")
        self.log(f"{stage}/acc", metric, prog_bar=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        args, kwargs = self.model_inputs(batch)
        return self.model(*args, **kwargs).argmax(-1)
