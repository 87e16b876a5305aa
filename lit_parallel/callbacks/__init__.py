"""Callbacks of lit_parallel."""

from lit_parallel.callbacks.summary import RunSummary

__all__ = ["RunSummary"]
