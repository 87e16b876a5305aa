"""HybridHalfPrecision: bf16 parameters, optionally with fp32 master weights in the optimizer."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.plugins.precision import HalfPrecision
from torch import Tensor, nn
from torch.optim import LBFGS, Optimizer
from typing_extensions import override

from lit_parallel.errors import ConfigurationError
from lit_parallel.precision.precision import HybridPrecision

__all__ = ["MASTER_WEIGHT_KEY", "HybridHalfPrecision"]

MASTER_WEIGHT_KEY = "master_param"
"""Key of the fp32 master copy in each parameter's optimizer state (saved and resharded with it)."""

_PRECISIONS = ("bf16-true",)


class HybridHalfPrecision(HybridPrecision, HalfPrecision):
    """``bf16-true`` on :class:`~lit_parallel.HybridParallelStrategy`: bf16 parameters and activations.

    With ``master_weights=True`` (the default) the optimizer steps an fp32 master copy of every parameter
    and keeps its state (Adam moments) in fp32; the bf16 parameter is refreshed from the master after each
    step. Small updates, which bf16 (8 bits of mantissa) would round away, accumulate in the master. The
    master copy lives in the optimizer state under :data:`MASTER_WEIGHT_KEY`, so it is saved and resharded
    by the strategy's distributed checkpoints like the moments are. ``master_weights=False`` is Lightning's
    plain ``bf16-true`` (bf16 optimizer state, half the memory, lossy updates). Clipping uses the global
    norm over the mesh (see :class:`HybridPrecision`).

    ``Trainer(precision="bf16-true")`` with the hybrid strategy selects this plugin with master weights.

    Args:
        precision: ``"bf16-true"``.
        master_weights: keep fp32 master weights and fp32 optimizer state.

    Raises:
        ConfigurationError: an unknown precision, bf16 on a GPU without bfloat16 (at setup), or LBFGS
            with master weights.

    Example::

        trainer = Trainer(accelerator="cuda", devices=4, strategy=HybridParallelStrategy(tensor_parallel_size=4),
                          plugins=[HybridHalfPrecision("bf16-true", master_weights=True)])
    """

    def __init__(self, precision: Literal["bf16-true"] = "bf16-true", master_weights: bool = True) -> None:
        if precision not in _PRECISIONS:
            raise ConfigurationError(
                f"HybridHalfPrecision(precision={precision!r}) is unknown; valid: {list(_PRECISIONS)} "
                "('16-true' has no loss scaling: use HybridMixedPrecision('16-mixed'))."
            )
        super().__init__(precision)
        self.master_weights = master_weights
        self._initial_masters: dict[Tensor, Tensor] = {}
        self._swaps: dict[int, list[tuple[dict[str, Any], int, Tensor, nn.Parameter]]] = {}
        self._load_stash: dict[int, tuple[list[list[int]], dict[int, dict[str, Tensor]]]] = {}
        self._hooked: set[int] = set()

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        if self.master_weights:
            # The masters start from the fp32 initialization, not from its bf16 rounding.
            self._initial_masters = {p: p.detach().to(torch.float32, copy=True) for p in module.parameters()}
        return super().convert_module(module)

    @override
    def connect(
        self, model: nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[nn.Module, list[Optimizer], list[Any]]:
        """Route every step of the optimizers through the fp32 masters (whoever calls ``step``).

        Raises:
            ConfigurationError: LBFGS with master weights (its closure would run on the masters).
        """
        if self.master_weights:
            for optimizer in optimizers:
                if isinstance(optimizer, LBFGS):
                    raise ConfigurationError(
                        "LBFGS cannot step fp32 master weights; valid: another optimizer, or "
                        "HybridHalfPrecision('bf16-true', master_weights=False)."
                    )
                if id(optimizer) not in self._hooked:
                    self._hooked.add(id(optimizer))
                    optimizer.register_step_pre_hook(self._to_masters)
                    optimizer.register_step_post_hook(self._from_masters)
                    optimizer.register_load_state_dict_pre_hook(self._stash_fp32_state)
                    optimizer.register_load_state_dict_post_hook(self._restore_fp32_state)
        return super().connect(model, optimizers, lr_schedulers)

    @override
    def optimizer_step(self, optimizer: Any, model: Any, closure: Any, **kwargs: Any) -> Any:
        if not self.master_weights:
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        # The gradients must exist before the step hook moves them to the masters, so the closure
        # (training_step, backward, dp sync, hooks, clipping) runs first rather than inside step().
        closure_result = self._wrap_closure(model, optimizer, closure)
        optimizer.step(**kwargs)
        return closure_result

    # -- the master-weight step ------------------------------------------------------------------------
    @torch.no_grad()
    def _to_masters(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Put each parameter's fp32 master (with the fp32 gradient and state) in its place in the optimizer."""
        swaps = []
        for group in optimizer.param_groups:
            params = group["params"]
            for index, param in enumerate(params):
                if param.grad is None:
                    continue
                state = optimizer.state.pop(param, {})
                data = state.pop(MASTER_WEIGHT_KEY, None)
                if data is None and param in self._initial_masters:
                    # Captured before the strategy moved the model to its device.
                    data = self._initial_masters.pop(param).to(param.device)
                if data is None:
                    data = param.detach().to(torch.float32, copy=True)
                master = nn.Parameter(data, requires_grad=param.requires_grad)
                master.grad = param.grad.to(torch.float32)
                optimizer.state[master] = state
                params[index] = master
                swaps.append((group, index, param, master))
        self._swaps[id(optimizer)] = swaps

    @torch.no_grad()
    def _from_masters(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Put the parameters back, keep the updated master in their state, refresh the bf16 copies."""
        for group, index, param, master in self._swaps.pop(id(optimizer), []):
            group["params"][index] = param
            state = optimizer.state.pop(master, {})
            state[MASTER_WEIGHT_KEY] = master.detach()
            optimizer.state[param] = state
            param.copy_(master.detach())
            master.grad = None

    def _stash_fp32_state(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
        # Optimizer.load_state_dict casts floating state to each parameter's dtype (bf16): keep the
        # fp32 tensors of the loaded state aside and put them back afterwards.
        stash = {
            pid: {k: v for k, v in st.items() if isinstance(v, Tensor) and v.is_floating_point() and k != "step"}
            for pid, st in state_dict["state"].items()
        }
        self._load_stash[id(optimizer)] = ([list(g["params"]) for g in state_dict["param_groups"]], stash)

    def _restore_fp32_state(self, optimizer: Optimizer) -> None:
        ids, stash = self._load_stash.pop(id(optimizer), ([], {}))
        for saved_ids, group in zip(ids, optimizer.param_groups, strict=True):
            for pid, param in zip(saved_ids, group["params"], strict=True):
                for key, value in stash.get(pid, {}).items():
                    optimizer.state[param][key] = value.to(device=param.device)
