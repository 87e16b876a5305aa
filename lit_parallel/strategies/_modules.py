"""Which networks of a LightningModule the hybrid strategy splits, and the pipeline contract it checks."""

from __future__ import annotations

from typing import Any

from torch import nn

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.families import get_family

__all__ = ["PIPELINE_HOOKS", "check_pipeline_module", "find_networks", "guard_direct_calls"]

PIPELINE_HOOKS = ("model_inputs", "loss_target", "loss_fn")
"""What a LightningModule defines for pipeline parallelism (``lit_parallel.models.ParallelModule`` has them)."""

_CONTRACT = (
    "Under pipeline parallelism the strategy runs the network itself, microbatch by microbatch, so the "
    "LightningModule must (1) keep the network in `self.model`, (2) define `model_inputs(batch) -> (args, "
    "kwargs)`, `loss_target(batch) -> Tensor` and `loss_fn(outputs, target) -> Tensor` (mean loss), and (3) "
    "compute its loss in training/validation steps with `loss, outputs = self.trainer.strategy."
    "run_forward_loss(self, batch)`; subclassing lit_parallel.models.ParallelModule gives all three "
    "(its `forward_loss(batch)` calls it)."
)


def _covered(module: nn.Module) -> bool:
    try:
        get_family(module)
    except ConfigurationError:
        return False
    return True


def find_networks(module: nn.Module, pipeline: bool = False) -> dict[str, nn.Module]:
    """The networks to parallelize, by attribute path: ``{"model": module.model}`` when the module keeps
    one there (the :class:`~lit_parallel.models.ParallelModule` convention, and required under a pipeline);
    otherwise every outermost submodule a registered model family covers (``nn.Sequential``, supported
    Hugging Face models), e.g. ``{"net": ..., "head": ...}``; ``{}`` when there is none.
    """
    net = getattr(module, "model", None)
    if isinstance(net, nn.Module) or pipeline:
        return {"model": net} if isinstance(net, nn.Module) else {}
    found: dict[str, nn.Module] = {}
    for path, child in module.named_modules():
        if not path or any(path.startswith(p + ".") for p in found):
            continue
        if _covered(child):
            found[path] = child
    return found


def check_pipeline_module(module: Any, strategy: str) -> None:
    """Refuse, naming what to add, a LightningModule that cannot be pipelined.

    Raises:
        ConfigurationError: no ``self.model`` network, or a missing hook.
    """
    net = getattr(module, "model", None)
    if not isinstance(net, nn.Module):
        raise ConfigurationError(
            f"{strategy} with pipeline_parallel_size > 1 needs {type(module).__name__}.model to be the network "
            f"(got {type(net).__name__}). {_CONTRACT}"
        )
    missing = [hook for hook in PIPELINE_HOOKS if not callable(getattr(module, hook, None))]
    if missing:
        raise ConfigurationError(f"{type(module).__name__} lacks {missing} for pipeline parallelism. {_CONTRACT}")


def _refuse_direct_call(net: nn.Module, *_: Any) -> None:
    raise ConfigurationError(
        f"{type(net).__name__} was called directly, but under pipeline parallelism this rank holds only its "
        f"stages of it. {_CONTRACT}"
    )


def guard_direct_calls(net: nn.Module) -> None:
    """Make a direct call of a pipelined network fail loudly (the stages call its submodules, never it)."""
    net.register_forward_pre_hook(_refuse_direct_call)
