"""Qwen3 (per-head RMSNorm on q and k, replicated across tensor-parallel ranks; optional sliding layers)."""

from lit_parallel.parallel.families.base import FULL_ATTENTION, SLIDING_ATTENTION, register_family
from lit_parallel.parallel.families.llama import llama_like

# q_norm / k_norm act on each head: under tensor parallelism every rank normalizes only its own heads.
QWEN3 = register_family(llama_like("qwen3", ("qwen3",), frozenset({FULL_ATTENTION, SLIDING_ATTENTION}),
                                   head_norms=("q_norm", "k_norm")))
