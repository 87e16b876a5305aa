"""``nn.Sequential`` networks: Linear pairs split column- then row-wise; stages are runs of children."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.families._hf import require_divisible
from lit_parallel.parallel.families.base import ModelFamily, PipelineLayout, register_family

# Modules that act on each feature independently: a column-sharded activation may pass through them.
ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Dropout,
)


def linear_pairs(model: nn.Sequential) -> list[tuple[str, str]]:
    """Consecutive (Linear, Linear) entries joined only by element-wise modules, paired from the front."""
    children = list(model.named_children())
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(children):
        name, module = children[i]
        if isinstance(module, nn.Linear):
            j = i + 1
            while j < len(children) and isinstance(children[j][1], ELEMENTWISE):
                j += 1
            if j < len(children) and isinstance(children[j][1], nn.Linear):
                pairs.append((name, children[j][0]))
                i = j + 1
                continue
        i += 1
    return pairs


def _plan(model: nn.Module, _tp_size: int | None) -> dict[str, ParallelStyle]:
    plan: dict[str, ParallelStyle] = {}
    for first, second in linear_pairs(model):  # type: ignore[arg-type]
        plan[first] = ColwiseParallel()
        plan[second] = RowwiseParallel()
    return plan


def _validate(model: nn.Module, tp_size: int) -> None:
    if not isinstance(model, nn.Sequential):
        raise ConfigurationError(f"model family 'sequential' needs an nn.Sequential; got {type(model).__name__}.")
    widths = {f"{first}.out_features": model.get_submodule(first).out_features for first, _ in linear_pairs(model)}
    require_divisible(widths, tp_size, "sequential: hidden widths of the column-sharded Linear layers")


def _layout(model: nn.Module, split_points: Sequence[str] | None) -> PipelineLayout:
    if not isinstance(model, nn.Sequential):
        raise ConfigurationError(f"model family 'sequential' needs an nn.Sequential, got {type(model).__name__}.")
    names = [name for name, _ in model.named_children()]
    if split_points is not None:
        return PipelineLayout([[n] for n in names])
    # A parameter-free child (activation, pooling, flatten) rides with the parameterized layer before it,
    # so "layers" are the layers with weights and no stage is made of a lone ReLU.
    units: list[list[str]] = []
    pending: list[str] = []
    for name in names:
        if any(True for _ in model.get_submodule(name).parameters()):
            units.append(pending + [name])
            pending = []
        elif units:
            units[-1].append(name)
        else:
            pending.append(name)
    if pending:  # no parameterized child at all
        units.append(pending)
    return PipelineLayout(units)


class SequentialStage(nn.Module):
    """A run of an ``nn.Sequential``'s children; the first takes ``x``, the last returns the logits."""

    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _stage(model: nn.Module, blocks: list[nn.Module], is_first: bool, is_last: bool) -> nn.Module:
    return SequentialStage(blocks)


SEQUENTIAL = register_family(ModelFamily(
    name="sequential", tp_plan=_plan, validate_tp=_validate, pipeline_layout=_layout, build_stage=_stage,
    matches=lambda model: isinstance(model, nn.Sequential), attention_kinds=frozenset(),
    pipeline_heads="nn.Sequential (any children; split at children with weights)",
))
