"""A dynamic loss scaler whose overflow check is agreed on by every rank of the mesh."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup
from typing_extensions import override

from lit_parallel.parallel.mesh import local_tensor

__all__ = ["MeshGradScaler"]


class MeshGradScaler(torch.amp.GradScaler):
    """:class:`torch.amp.GradScaler` for gradients split over tensor-parallel and pipeline ranks.

    ``unscale_`` checks this rank's gradients (the local shard of DTensor gradients) for inf/NaN and then
    all-reduces the flag with ``MAX`` over ``process_group`` — the whole mesh — so every rank skips the same
    step and changes its scale identically. Without it, one pipeline stage could skip a step that another
    takes, and the replicas would silently diverge. Works on CPU (``device="cpu"``) and CUDA.

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        init_scale: initial loss scale.
        growth_factor: scale multiplier after ``growth_interval`` steps without overflow.
        backoff_factor: scale multiplier after an overflow.
        growth_interval: overflow-free steps before the scale grows.
        enabled: ``False`` makes every method a pass-through.
        process_group: the ranks that must agree (``None``: the default group, every rank).

    Example::

        scaler = MeshGradScaler("cpu", init_scale=2.0**16)
        scaler.scale(loss).backward()
        scaler.step(optimizer)     # unscales, agrees on overflow with every rank, maybe skips
        scaler.update()
    """

    def __init__(
        self,
        device: str = "cuda",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(device, init_scale=init_scale, growth_factor=growth_factor, backoff_factor=backoff_factor,
                         growth_interval=growth_interval, enabled=enabled)
        self.process_group = process_group
        self._last_skipped = False

    @override
    def _unscale_grads_(
        self, optimizer: torch.optim.Optimizer, inv_scale: Tensor, found_inf: Tensor, allow_fp16: bool
    ) -> dict[torch.device, Tensor]:
        # The parent's loop, on the local data of DTensor gradients (the fused kernel takes plain tensors).
        per_device: dict[torch.device, dict[torch.dtype, list[Tensor]]] = defaultdict(lambda: defaultdict(list))
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is None:
                        continue
                    grad = local_tensor(param.grad)
                    if not allow_fp16 and grad.dtype == torch.float16:
                        raise ValueError("Attempting to unscale FP16 gradients.")
                    if grad.is_sparse:
                        grad = grad.coalesce() if grad.dtype is torch.float16 else grad
                        param.grad = grad
                        grad = grad._values()
                    per_device[grad.device][grad.dtype].append(grad)
            found: dict[torch.device, Tensor] = {}
            for device, per_dtype in per_device.items():
                found[device] = found_inf.to(device, copy=True)
                for grads in per_dtype.values():
                    torch._amp_foreach_non_finite_check_and_unscale_(grads, found[device], inv_scale.to(device))
        return found

    @override
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._enabled:
            return
        if self._scale is None:
            # Pipeline stages without the loss never call scale(); their gradients are scaled all the
            # same (the scaled loss's gradient reaches them), and their scale must follow the others'.
            device = torch.device("cuda", torch.cuda.current_device()) if self._device == "cuda" else torch.device("cpu")
            self._lazy_init_scale_growth_tracker(device)
        super().unscale_(optimizer)
        self._agree_on_overflow(self._per_optimizer_states[id(optimizer)]["found_inf_per_device"])

    def _agree_on_overflow(self, found_per_device: dict[Any, Tensor]) -> None:
        """Replace every per-device flag by the MAX over this rank's devices and the process group."""
        if not dist.is_initialized():
            return
        if dist.get_backend(self.process_group) == "nccl":
            comm_device = torch.device("cuda", torch.cuda.current_device())
        else:
            comm_device = torch.device("cpu")
        flag = torch.zeros(1, dtype=torch.float32, device=comm_device)
        for found in found_per_device.values():
            flag = torch.maximum(flag, found.reshape(1).to(comm_device))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.process_group)
        if not found_per_device:
            # A rank without gradients must still skip with the others (and record an inf check).
            found_per_device[comm_device] = flag.reshape(())
        for found in found_per_device.values():
            found.copy_(flag.reshape(()).to(found.device))

    @property
    def skipped_last_step(self) -> bool:
        """Whether the last ``update`` backed the scale off (an overflow somewhere in the mesh)."""
        return self._last_skipped

    @override
    def update(self, new_scale: float | Tensor | None = None) -> None:
        if self._enabled and new_scale is None:
            found = [f for state in self._per_optimizer_states.values()
                     for f in state["found_inf_per_device"].values()]
            self._last_skipped = bool(found) and any(bool(f.item()) for f in found)
        super().update(new_scale)
