"""GPT-2 (fused ``c_attn`` projections in HF ``Conv1D`` layers; LM or sequence-classification head)."""

from __future__ import annotations

from collections.abc import Sequence

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
    ModelFamily,
    PipelineLayout,
    StageModule,
    block_units,
    register_family,
)
from lit_parallel.parallel.tp_styles import (
    Conv1DColwiseParallel,
    Conv1DRowwiseParallel,
    PackedConv1DColwiseParallel,
)


def _plan(model: nn.Module, _tp_size: int | None) -> dict[str, ParallelStyle]:
    base, p = base_model(model)
    plan: dict[str, ParallelStyle] = {}
    if has(base, "wte", nn.Embedding):
        plan[f"{p}wte"] = RowwiseParallel(input_layouts=Replicate())
    for i, _ in present(getattr(base, "h", None), "attn"):
        q = f"{p}h.{i}"
        plan[f"{q}.attn.c_attn"] = PackedConv1DColwiseParallel(num_packed=3)  # fused [q | k | v]
        plan[f"{q}.attn.c_proj"] = Conv1DRowwiseParallel()
        plan[f"{q}.mlp.c_fc"] = Conv1DColwiseParallel()
        plan[f"{q}.mlp.c_proj"] = Conv1DRowwiseParallel()
    if has(model, "lm_head", nn.Linear):
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def _localize(model: nn.Module, tp_size: int) -> None:
    # GPT2Attention splits the fused projection with split_size and reshapes with -1 heads.
    divide_heads(model, "h", "attn", tp_size, ("num_heads", "split_size", "embed_dim"))


def _validate(model: nn.Module, tp_size: int) -> None:
    c = hf_config(model, "gpt2")
    if getattr(c, "add_cross_attention", False):
        raise ConfigurationError("tensor parallelism for gpt2 with add_cross_attention=True is not supported; "
                                 "valid: add_cross_attention=False.")
    inner = c.n_inner if c.n_inner is not None else 4 * c.hidden_size
    require_divisible({"n_head": c.num_attention_heads, "n_inner": inner}, tp_size, "gpt2")


def _layout(model: nn.Module, _split_points: Sequence[str] | None) -> PipelineLayout:
    head = "lm_head" if hasattr(model, "lm_head") else "score"
    layout = PipelineLayout(block_units(model, "transformer.h"), ["transformer.wte", "transformer.wpe", "transformer.drop"],
                            ["transformer.ln_f", head])
    owned_modules(model, layout.first + layout.last)
    return layout


class GPT2Stage(StageModule):
    """GPT-2: the first stage takes ``(input_ids, attention_mask=None)``; others ``(hidden, mask[, input_ids])``."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], is_first: bool, is_last: bool) -> None:
        super().__init__(model.transformer.config, blocks, is_first, is_last)
        self.classify = not hasattr(model, "lm_head")
        if is_first:
            self.wte, self.wpe, self.drop = model.transformer.wte, model.transformer.wpe, model.transformer.drop
        if is_last:
            self.ln_f = model.transformer.ln_f
            self.head = model.score if self.classify else model.lm_head

    def forward(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        from transformers.masking_utils import create_causal_mask

        if self.is_first:
            input_ids = args[0]
            mask = self.padding_mask(input_ids, args[1] if len(args) > 1 else None)
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            hidden = self.drop(self.wte(input_ids) + self.wpe(positions))
        else:
            hidden, mask = args[0], args[1]
            input_ids = args[2] if self.classify else None
            positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        causal = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask, cache=None,
                                    position_ids=positions)
        for block in self.blocks:
            hidden = block(hidden, attention_mask=causal, position_ids=positions)
        if not self.is_last:
            return (hidden, mask, input_ids) if self.classify else (hidden, mask)
        logits = self.head(self.ln_f(hidden))
        if not self.classify:
            return logits
        return logits[torch.arange(logits.shape[0], device=logits.device), self._last_token(input_ids)]

    def _last_token(self, input_ids: torch.Tensor) -> torch.Tensor | int:
        # As GPT2ForSequenceClassification: the rightmost token that is not padding.
        if self.config.pad_token_id is None:
            return -1
        non_pad = (input_ids != self.config.pad_token_id).to(torch.int32)
        return (torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32) * non_pad).argmax(-1)


GPT2 = register_family(ModelFamily(
    name="gpt2", model_types=("gpt2",), tp_plan=_plan, validate_tp=_validate, localize_tp=_localize,
    pipeline_layout=_layout, build_stage=GPT2Stage, stage_inputs=("input_ids", "attention_mask"),
    attention_module="attn", pipeline_heads="GPT2LMHeadModel, GPT2ForSequenceClassification",
))
