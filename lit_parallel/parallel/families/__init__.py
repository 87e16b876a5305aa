"""Model families as plug-ins: one module per family, found through a registry.

Built in: ``sequential``, ``bert``, ``gpt2``, ``llama``, ``qwen2``, ``mistral``, ``qwen3``. Add your own with
:func:`register_family` (docs/hybrid.md, "Adding a model family").
"""

# Registration order is detection order.
from lit_parallel.parallel.families import bert, gpt2, llama, mistral, qwen2, qwen3, sequential  # noqa: E402,F401,I001
from lit_parallel.parallel.families.base import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    ModelFamily,
    PipelineLayout,
    StageModule,
    block_units,
    family_names,
    get_family,
    hf_layer_types,
    register_family,
    unregister_family,
)

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
