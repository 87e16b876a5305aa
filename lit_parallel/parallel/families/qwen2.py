"""Qwen2 (biased q/k/v; sliding-window layers per ``config.layer_types`` when ``use_sliding_window``)."""

from lit_parallel.parallel.families.base import FULL_ATTENTION, SLIDING_ATTENTION, register_family
from lit_parallel.parallel.families.llama import llama_like

QWEN2 = register_family(llama_like("qwen2", ("qwen2",), frozenset({FULL_ATTENTION, SLIDING_ATTENTION})))
