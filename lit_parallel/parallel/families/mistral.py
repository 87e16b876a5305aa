"""Mistral (every layer attends within ``config.sliding_window`` when it is set)."""

from lit_parallel.parallel.families.base import FULL_ATTENTION, SLIDING_ATTENTION, register_family
from lit_parallel.parallel.families.llama import llama_like

MISTRAL = register_family(llama_like("mistral", ("mistral",), frozenset({FULL_ATTENTION, SLIDING_ATTENTION})))
