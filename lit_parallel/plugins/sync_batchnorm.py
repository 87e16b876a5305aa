"""The ``LayerSync`` plugin behind ``Trainer(sync_batchnorm=True)`` under lit_parallel's strategies."""

from __future__ import annotations

from lightning.pytorch.plugins.layer_sync import LayerSync
from torch import nn
from torch.distributed import ProcessGroup
from typing_extensions import override

from lit_parallel.parallel.sync_batchnorm import convert_sync_batchnorm, revert_sync_batchnorm

__all__ = ["MeshSyncBatchNorm"]


class MeshSyncBatchNorm(LayerSync):
    """Synchronize batch norm over one process group on every backend, gloo included.

    Lightning's ``TorchSyncBatchNorm`` converts to :class:`torch.nn.SyncBatchNorm`, which refuses CPU
    tensors and always reduces over the whole world. This plugin converts to
    :class:`~lit_parallel.parallel.sync_batchnorm.SyncBatchNorm`, exact against one process on the
    global batch, over :attr:`process_group`. The DDP-family strategies of lit_parallel swap
    ``Trainer(sync_batchnorm=True)``'s ``TorchSyncBatchNorm`` for this plugin; a strategy with a device
    mesh sets :attr:`process_group` to its data-parallel group before the model is set up (tensor- and
    pipeline-parallel peers see the same batch and must not be pooled).

    Args:
        process_group: the ranks whose batches are pooled (``None``: the default group).

    Example::

        from lit_parallel import CompressedDDPStrategy
        from lit_parallel.plugins import MeshSyncBatchNorm

        trainer = Trainer(accelerator="cpu", devices=2, sync_batchnorm=True, strategy=CompressedDDPStrategy())
        trainer = Trainer(accelerator="cpu", devices=2, plugins=[MeshSyncBatchNorm()],
                          strategy=CompressedDDPStrategy())  # the same, spelled out
    """

    def __init__(self, process_group: ProcessGroup | None = None) -> None:
        self.process_group = process_group

    @override
    def apply(self, model: nn.Module) -> nn.Module:
        """Convert every batch-norm layer of ``model`` to a synchronized one over :attr:`process_group`."""
        return convert_sync_batchnorm(model, self.process_group)

    @override
    def revert(self, model: nn.Module) -> nn.Module:
        """Convert the synchronized layers back to the batch-norm classes they came from."""
        return revert_sync_batchnorm(model)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(process_group={self.process_group!r})"
