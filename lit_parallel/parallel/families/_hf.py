"""Helpers the Hugging Face family modules share (plans over the modules present on this rank)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from lit_parallel.errors import ConfigurationError


def base_model(model: nn.Module) -> tuple[nn.Module, str]:
    """The Hugging Face base model (``model.bert`` / ``.model`` / ``.transformer``) and its FQN prefix."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, nn.Module):
        return base, f"{prefix}."
    return model, ""


def present(layers: Any, child: str) -> Iterator[tuple[int, nn.Module]]:
    """Entries of a layer ``ModuleList`` that this rank holds (pipeline placeholders have no ``child``)."""
    if isinstance(layers, nn.ModuleList):
        for i, layer in enumerate(layers):
            if isinstance(getattr(layer, child, None), nn.Module):
                yield i, layer


def has(module: nn.Module, attr: str, kind: type | tuple[type, ...]) -> bool:
    return isinstance(getattr(module, attr, None), kind)


def hf_config(model: nn.Module, family: str) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigurationError(f"model family {family!r} needs a Hugging Face model with a .config; "
                                 f"got {type(model).__name__}.")
    return config


def require_divisible(what: dict[str, int], tp_size: int, family: str) -> None:
    bad = {name: value for name, value in what.items() if value % tp_size}
    if bad:
        listed = ", ".join(f"{name}={value}" for name, value in bad.items())
        raise ConfigurationError(
            f"tensor_parallel_size={tp_size} must divide {listed} ({family}); valid sizes divide "
            f"every one of {what}."
        )


def divide(module: nn.Module, tp_size: int, attrs: tuple[str, ...]) -> None:
    """Per-rank counts: divide the integer attributes ``attrs`` of ``module`` by ``tp_size``."""
    for attr in attrs:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, getattr(module, attr) // tp_size)


def divide_heads(model: nn.Module, layers: str, attention: str, tp_size: int, attrs: tuple[str, ...]) -> None:
    """Per-rank head counts in every attention this rank holds: ``base.<layers>[i].<attention>`` (dotted path)."""
    base, _ = base_model(model)
    holder = base
    for name in layers.split("."):
        holder = getattr(holder, name, None)
    for _, layer in present(holder, attention.split(".")[0]):
        divide(layer.get_submodule(attention), tp_size, attrs)


def owned_modules(model: nn.Module, fqns: list[str]) -> None:
    """Raise ``AttributeError`` unless every FQN names a module of ``model``."""
    for fqn in fqns:
        if not isinstance(model.get_submodule(fqn), nn.Module):
            raise AttributeError(f"{fqn} is not a module")
