"""Qwen3 (per-head RMSNorm on q and k, replicated across tensor-parallel ranks; optional sliding layers)."""

from lit_parallel.parallel.families.base import FULL_ATTENTION, SLIDING_ATTENTION, register_family
from lit_parallel.parallel.families.llama import llama_like

QWEN3 = register_family(llama_like("qwen3", ("qwen3",), frozenset({FULL_ATTENTION, SLIDING_ATTENTION})))
