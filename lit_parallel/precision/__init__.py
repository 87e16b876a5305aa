"""Mesh-aware precision plugins (placeholder until the precision issue lands: plugins pass through)."""

from __future__ import annotations

from typing import Any


def to_mesh_aware(plugin: Any) -> Any:
    """Return the mesh-aware equivalent of a Lightning precision plugin (identity for now)."""
    return plugin


__all__ = ["to_mesh_aware"]
