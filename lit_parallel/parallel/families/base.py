"""The model-family spec and its registry: everything one family of networks needs to be parallelized.

A family declares, in one :class:`ModelFamily`, what torchtitan's ``TrainSpec`` declares per model: which
networks it covers (Hugging Face ``config.model_type`` values, or a predicate), its tensor-parallel plan and
checks, its pipeline layout and stage forward, the inputs that reach the first pipeline stage, the kinds of
attention mask its layers use, and where its attention modules are (for head pruning). The engines
(:mod:`~lit_parallel.parallel.tensor_parallel`, :mod:`~lit_parallel.parallel.pipeline`) only read specs::

    from lit_parallel.parallel.families import get_family, register_family

    register_family(my_family)            # a ModelFamily; see docs/hybrid.md, "Adding a model family"
    family = get_family(model)            # detected: nn.Sequential, config.model_type, or matches()
    family.tp_plan(model, 2)              # {"model.layers.0.self_attn.q_proj": ColwiseParallel(), ...}

Pure torch: no Lightning import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lit_parallel.errors import ConfigurationError

__all__ = [
    "FULL_ATTENTION",
    "SLIDING_ATTENTION",
    "ModelFamily",
    "PipelineLayout",
    "StageModule",
    "block_units",
    "family_names",
    "get_family",
    "hf_layer_types",
    "register_family",
    "unregister_family",
]

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclass(frozen=True)
class PipelineLayout:
    """Module FQNs of one network for the pipeline split.

    Attributes:
        units: blocks in execution order; a stage owns a contiguous run of them (each unit is a list of
            FQNs that stay together).
        first: modules owned by the first stage (embeddings).
        last: modules owned by the last stage (final norm, head).
    """

    units: list[list[str]]
    first: list[str] = field(default_factory=list)
    last: list[str] = field(default_factory=list)


def block_units(model: nn.Module, path: str) -> list[list[str]]:
    """One unit per entry of the ``ModuleList`` at ``path`` (``"model.layers"`` -> ``[["model.layers.0"], ...]``)."""
    return [[f"{path}.{i}"] for i in range(len(model.get_submodule(path)))]


def hf_layer_types(config: Any) -> list[str]:
    """The attention mask each decoder layer of a Hugging Face model uses, as the HF model builds it.

    ``config.layer_types`` when the config has it (Qwen2, Qwen3, Gemma...); otherwise every layer uses a
    sliding window when ``config.sliding_window`` is set (Mistral) and ``use_sliding_window`` is not
    ``False``, else full causal attention.
    """
    n = int(getattr(config, "num_hidden_layers", 0) or 0)
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)[:n] if n else list(types)
    window = getattr(config, "sliding_window", None)
    kind = SLIDING_ATTENTION if window is not None and getattr(config, "use_sliding_window", True) else FULL_ATTENTION
    return [kind] * n


class StageModule(nn.Module):
    """Base of a pipeline stage of a Hugging Face network: ``blocks`` are its layers.

    Only tensors travel between stages, so the first stage turns "no attention mask" into an all-ones mask
    (the same attention) and passes the 2-d padding mask on; every stage expands it into the masks its
    layers take, as the HF model does.
    """

    def __init__(self, config: Any, blocks: list[nn.Module], is_first: bool, is_last: bool) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(blocks)
        self.is_first, self.is_last = is_first, is_last

    @staticmethod
    def padding_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.long)
        return attention_mask.to(torch.long).view(input_ids.shape[0], -1)


@dataclass(frozen=True)
class ModelFamily:
    """Everything the tensor-parallel and pipeline engines need to know about one family of networks.

    Attributes:
        name: the family's name (``model_family=`` of the hybrid strategy).
        model_types: Hugging Face ``config.model_type`` values detected as this family.
        tp_plan: ``(model, tp_size) -> {module FQN pattern: ParallelStyle}`` for the modules present on
            this rank (``tp_size`` may be ``None``: a size that divides everything).
        validate_tp: ``(model, tp_size) -> None``; raises ``ConfigurationError`` naming the numbers.
        localize_tp: ``(model, tp_size) -> None``, run after the plan (per-rank head counts), or ``None``.
        pipeline_layout: ``(model, split_points) -> PipelineLayout``; ``None``: no pipeline split.
        build_stage: ``(model, blocks, is_first, is_last) -> nn.Module`` running one stage: the first takes
            :attr:`stage_inputs` positionally, the last returns the logits tensor.
        stage_inputs: the keyword inputs (in order) that reach the first pipeline stage as positional
            tensors (``("input_ids", "attention_mask")``); empty for networks called with positional inputs.
        attention_kinds: the mask kinds the stage forward builds (:data:`FULL_ATTENTION`,
            :data:`SLIDING_ATTENTION`, ``"bidirectional"``); a network whose real layers need another one
            is refused (:meth:`check_model`).
        attention_module: the attribute holding each block's attention module (head pruning), or ``None``.
        matches: ``(model) -> bool`` for networks detected without a ``model_type`` (``nn.Sequential``).
        pipeline_heads: what the pipeline layout supports, for error messages.
    """

    name: str
    tp_plan: Callable[[nn.Module, int | None], dict[str, Any]]
    validate_tp: Callable[[nn.Module, int], None]
    model_types: tuple[str, ...] = ()
    localize_tp: Callable[[nn.Module, int], None] | None = None
    pipeline_layout: Callable[[nn.Module, Sequence[str] | None], PipelineLayout] | None = None
    build_stage: Callable[[nn.Module, list[nn.Module], bool, bool], nn.Module] | None = None
    stage_inputs: tuple[str, ...] = ()
    attention_kinds: frozenset[str] = frozenset({FULL_ATTENTION})
    attention_module: str | None = None
    matches: Callable[[nn.Module], bool] | None = None
    pipeline_heads: str = ""

    def covers(self, model: nn.Module) -> bool:
        """Whether ``model`` is detected as this family."""
        if self.matches is not None and self.matches(model):
            return True
        return getattr(getattr(model, "config", None), "model_type", None) in self.model_types

    def check_model(self, model: nn.Module) -> None:
        """Refuse a network whose attention this family's stage forward would compute differently.

        Raises:
            ConfigurationError: a layer needs a mask kind outside :attr:`attention_kinds` (a sliding window
                forced onto a full-attention family); the message names the config attribute.
        """
        config = getattr(model, "config", None)
        if config is None or FULL_ATTENTION not in self.attention_kinds:
            return
        needed = set(hf_layer_types(config)) - set(self.attention_kinds)
        if needed:
            attr = "layer_types" if getattr(config, "layer_types", None) else "sliding_window"
            raise ConfigurationError(
                f"model_family={self.name!r} builds {sorted(self.attention_kinds)} masks, but "
                f"{type(model).__name__} (model_type={getattr(config, 'model_type', None)!r}) has "
                f"config.{attr}={getattr(config, attr)!r}, so its layers use {sorted(needed)}: it would "
                f"silently compute another loss. Valid: model_family='auto' or a family supporting "
                f"{sorted(needed)} ({[f.name for f in _REGISTRY.values() if needed <= f.attention_kinds]})."
            )


_REGISTRY: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily, *, replace: bool = False) -> ModelFamily:
    """Make ``family`` known to the engines and the hybrid strategy (``model_family=family.name``).

    Args:
        family: the spec.
        replace: allow replacing a registered family of the same name.

    Returns:
        ``family`` (so the call can decorate a module-level constant).

    Raises:
        ConfigurationError: the name, or one of its ``model_types``, is registered already.
    """
    if not isinstance(family, ModelFamily):
        raise ConfigurationError(f"register_family expects a ModelFamily, got {type(family).__name__}.")
    if family.name in _REGISTRY and not replace:
        raise ConfigurationError(
            f"model family {family.name!r} is registered already; pass replace=True to replace it, or choose "
            f"another name (registered: {family_names()})."
        )
    for other in _REGISTRY.values():
        clash = set(other.model_types) & set(family.model_types)
        if other.name != family.name and clash:
            raise ConfigurationError(
                f"model family {family.name!r} claims model_type {sorted(clash)}, which family {other.name!r} "
                f"covers already; unregister_family({other.name!r}) first or leave them out."
            )
    _REGISTRY[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Forget a registered family (tests, or before replacing a built-in one's model types)."""
    _REGISTRY.pop(name, None)


def family_names() -> list[str]:
    """Registered family names, in registration order."""
    return list(_REGISTRY)


def get_family(model: nn.Module | None = None, name: str | None = None) -> ModelFamily:
    """The family named ``name``, or the one detected for ``model``.

    A forced ``name`` is checked against the model (:meth:`ModelFamily.check_model`).

    Raises:
        ConfigurationError: an unknown name (the message lists the registered ones), a model no family
            covers, or a forced family whose attention differs from the model's.
    """
    if name is not None and name != "auto":
        if name not in _REGISTRY:
            raise ConfigurationError(f"model_family={name!r} is unknown; valid: 'auto' or one of {family_names()}.")
        family = _REGISTRY[name]
        if model is not None:
            family.check_model(model)
        return family
    if model is None:
        raise ConfigurationError("get_family needs a model or a family name.")
    for family in _REGISTRY.values():
        if family.covers(model):
            return family
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    types = sorted(t for f in _REGISTRY.values() for t in f.model_types)
    raise ConfigurationError(
        f"no model family covers {type(model).__name__} (config.model_type={model_type!r}); registered families: "
        f"{family_names()} (Hugging Face model types {types}, and nn.Sequential). Pass model_family=... for a "
        "network laid out like one of them, register one with lit_parallel.register_family(...) (docs/hybrid.md, "
        "'Adding a model family'), or shard it yourself in configure_model."
    )
