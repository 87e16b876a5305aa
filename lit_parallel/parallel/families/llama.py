"""Llama-style decoders (``LlamaForCausalLM`` and relatives): a complete family in one file.

The same pieces serve every decoder laid out like Llama (``model.embed_tokens``, ``model.layers[i]`` with
``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``, ``model.norm``, ``model.rotary_emb``,
``lm_head``); :func:`llama_like` makes the spec of one, naming its model types and the masks its layers use
(see :mod:`~lit_parallel.parallel.families.qwen2`, ``mistral``, ``qwen3``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.families._hf import (
    base_model,
    divide_heads,
    has,
    hf_config,
    owned_modules,
    present,
    require_divisible,
)
from lit_parallel.parallel.families.base import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    ModelFamily,
    PipelineLayout,
    StageModule,
    block_units,
    hf_layer_types,
    register_family,
)
from lit_parallel.parallel.tp_styles import GQAHeadParallel, HeadwiseReplicateParallel

__all__ = ["LLAMA", "DecoderStage", "llama_like"]


# -- tensor parallelism --------------------------------------------------------------------------------
def _heads(config: Any) -> tuple[int, int]:
    heads = config.num_attention_heads
    return heads, config.num_key_value_heads or heads


def _uneven(model: nn.Module, tp_size: int | None) -> bool:
    """Whether ``tp_size`` splits the heads unevenly (:class:`GQAHeadParallel`) rather than by DTensor shards."""
    config = getattr(model, "config", None)
    if tp_size is None or tp_size == 1 or config is None:
        return False
    return any(n % tp_size for n in _heads(config))


def tp_plan(model: nn.Module, tp_size: int | None, head_norms: tuple[str, ...] = ()) -> dict[str, ParallelStyle]:
    """q/k/v and gate/up column-wise, o and down row-wise; vocabulary-parallel embedding and LM head.

    ``head_norms``: attention submodules applied per head (Qwen3's ``q_norm``, ``k_norm``): replicated, with
    their gradients summed over the heads of every rank.
    """
    base, p = base_model(model)
    uneven = _uneven(model, tp_size)
    plan: dict[str, ParallelStyle] = {}
    if has(base, "embed_tokens", nn.Embedding):
        plan[f"{p}embed_tokens"] = RowwiseParallel(input_layouts=Replicate())
    for i, _ in present(getattr(base, "layers", None), "self_attn"):
        q = f"{p}layers.{i}"
        if uneven:
            plan[f"{q}.self_attn"] = GQAHeadParallel()
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                plan[f"{q}.self_attn.{name}"] = ColwiseParallel()
            plan[f"{q}.self_attn.o_proj"] = RowwiseParallel()
        for name in head_norms:
            plan[f"{q}.self_attn.{name}"] = HeadwiseReplicateParallel()
        for name in ("gate_proj", "up_proj"):
            plan[f"{q}.mlp.{name}"] = ColwiseParallel()
        plan[f"{q}.mlp.down_proj"] = RowwiseParallel()
    if has(model, "lm_head", nn.Linear):
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def localize_tp(model: nn.Module, tp_size: int) -> None:
    # transformers 5 reshapes with -1 heads; older releases read these attributes as per-rank counts.
    if _uneven(model, tp_size):
        return  # GQAHeadParallel set each rank's own counts
    divide_heads(model, "layers", "self_attn", tp_size, ("num_heads", "num_key_value_heads", "hidden_size"))


def validate_tp(model: nn.Module, tp_size: int) -> None:
    c = hf_config(model, "llama")
    heads, kv_heads = _heads(c)
    require_divisible({"intermediate_size": c.intermediate_size}, tp_size, "llama: the MLP is sharded evenly")
    if (heads % tp_size or kv_heads % tp_size) and kv_heads < tp_size:
        # Uneven head splits (GQAHeadParallel) give every rank at least one whole key/value head.
        valid = [t for t in range(1, kv_heads + 1) if c.intermediate_size % t == 0]
        raise ConfigurationError(
            f"tensor_parallel_size={tp_size} cannot split num_attention_heads={heads}, "
            f"num_key_value_heads={kv_heads} ({c.model_type}): it must divide both, or be at most "
            f"num_key_value_heads so that every rank gets whole key/value-head groups; valid sizes (also "
            f"dividing intermediate_size={c.intermediate_size}): {valid}."
        )


# -- pipeline parallelism ------------------------------------------------------------------------------
def pipeline_layout(model: nn.Module, _split_points: Sequence[str] | None) -> PipelineLayout:
    # model.rotary_emb has buffers only and is kept on every stage (each recomputes its cos/sin).
    layout = PipelineLayout(block_units(model, "model.layers"), ["model.embed_tokens"], ["model.norm", "lm_head"])
    owned_modules(model, layout.first + layout.last)
    return layout


class DecoderStage(StageModule):
    """A stage of a Llama-like causal LM: the first takes ``(input_ids, attention_mask=None)``, others
    ``(hidden, mask)``; each layer gets the mask its config gives it (full causal or sliding window), built
    by the same transformers functions the HF model calls."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], is_first: bool, is_last: bool) -> None:
        super().__init__(model.model.config, blocks, is_first, is_last)
        self.rotary_emb = model.model.rotary_emb  # parameter-free, shared by every stage of the rank
        if is_first:
            self.embed_tokens = model.model.embed_tokens
        if is_last:
            self.norm, self.lm_head = model.model.norm, model.lm_head
        types = hf_layer_types(self.config)
        self.layer_types = [types[block.self_attn.layer_idx] for block in blocks]

    def forward(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        if self.is_first:
            input_ids = args[0]
            mask = self.padding_mask(input_ids, args[1] if len(args) > 1 else None)
            hidden = self.embed_tokens(input_ids)
        else:
            hidden, mask = args
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kwargs = {"config": self.config, "inputs_embeds": hidden, "attention_mask": mask, "cache": None,
                  "position_ids": positions}
        builders = {FULL_ATTENTION: create_causal_mask, SLIDING_ATTENTION: create_sliding_window_causal_mask}
        masks = {kind: builders[kind](**kwargs) for kind in set(self.layer_types)}
        rotary = self.rotary_emb(hidden, position_ids=positions)
        for block, kind in zip(self.blocks, self.layer_types, strict=True):
            hidden = block(hidden, attention_mask=masks[kind], position_embeddings=rotary, position_ids=positions)
        if not self.is_last:
            return hidden, mask
        return self.lm_head(self.norm(hidden))


def llama_like(name: str, model_types: tuple[str, ...],
               attention_kinds: frozenset[str] = frozenset({FULL_ATTENTION}),
               head_norms: tuple[str, ...] = ()) -> ModelFamily:
    """The spec of a decoder laid out like Llama whose layers use the masks ``attention_kinds``; ``head_norms``
    names per-head attention submodules (see :func:`tp_plan`)."""
    plan = functools.partial(tp_plan, head_norms=head_norms) if head_norms else tp_plan
    return ModelFamily(
        name=name, model_types=model_types, tp_plan=plan, validate_tp=validate_tp, localize_tp=localize_tp,
        pipeline_layout=pipeline_layout, build_stage=DecoderStage, stage_inputs=("input_ids", "attention_mask"),
        attention_kinds=attention_kinds, attention_module="self_attn",
        pipeline_heads=f"{name} causal LM (model.embed_tokens, model.layers, model.norm, lm_head)",
    )


# LlamaModel always builds a full causal mask: a sliding-window config forced onto it is refused.
LLAMA = register_family(llama_like("llama", ("llama",)))
