"""BERT encoders (``BertModel``, ``BertForSequenceClassification``, masked-LM heads)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

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


def _plan(model: nn.Module, _tp_size: int | None) -> dict[str, ParallelStyle]:
    base, p = base_model(model)
    plan: dict[str, ParallelStyle] = {}
    embeddings = getattr(base, "embeddings", None)
    if isinstance(embeddings, nn.Module) and has(embeddings, "word_embeddings", nn.Embedding):
        plan[f"{p}embeddings.word_embeddings"] = RowwiseParallel(input_layouts=Replicate())
    for i, _ in present(getattr(getattr(base, "encoder", None), "layer", None), "attention"):
        q = f"{p}encoder.layer.{i}"
        for name in ("query", "key", "value"):
            plan[f"{q}.attention.self.{name}"] = ColwiseParallel()
        plan[f"{q}.attention.output.dense"] = RowwiseParallel()
        plan[f"{q}.intermediate.dense"] = ColwiseParallel()
        plan[f"{q}.output.dense"] = RowwiseParallel()
    # Masked-LM head (BertForMaskedLM / BertForPreTraining), tied to the word embeddings.
    if isinstance(getattr(getattr(getattr(model, "cls", None), "predictions", None), "decoder", None), nn.Linear):
        plan["cls.predictions.decoder"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def _localize(model: nn.Module, tp_size: int) -> None:
    divide_heads(model, "encoder.layer", "attention.self", tp_size, ("num_attention_heads", "all_head_size"))


def _validate(model: nn.Module, tp_size: int) -> None:
    c = hf_config(model, "bert")
    require_divisible({"num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size},
                      tp_size, "bert")


def _layout(model: nn.Module, _split_points: Sequence[str] | None) -> PipelineLayout:
    layout = PipelineLayout(block_units(model, "bert.encoder.layer"), ["bert.embeddings"],
                            ["bert.pooler", "dropout", "classifier"])
    owned_modules(model, layout.first + layout.last)
    return layout


class BertStage(StageModule):
    """BERT classifier: the first stage takes ``(input_ids, attention_mask=None, token_type_ids=None)``."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], is_first: bool, is_last: bool) -> None:
        super().__init__(model.bert.config, blocks, is_first, is_last)
        if is_first:
            self.embeddings = model.bert.embeddings
        if is_last:
            self.pooler, self.dropout, self.classifier = model.bert.pooler, model.dropout, model.classifier

    def forward(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

        if self.is_first:
            input_ids = args[0]
            mask = self.padding_mask(input_ids, args[1] if len(args) > 1 else None)
            token_type_ids = args[2] if len(args) > 2 else None
            hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        else:
            hidden, mask = args
        if self.config.is_decoder:
            extended = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask, cache=None)
        else:
            extended = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)
        for block in self.blocks:
            hidden = block(hidden, extended)
        if not self.is_last:
            return hidden, mask
        return self.classifier(self.dropout(self.pooler(hidden)))


BERT = register_family(ModelFamily(
    name="bert", model_types=("bert",), tp_plan=_plan, validate_tp=_validate, localize_tp=_localize,
    pipeline_layout=_layout, build_stage=BertStage, stage_inputs=("input_ids", "attention_mask", "token_type_ids"),
    attention_kinds=frozenset({"bidirectional"}), attention_module="attention",
    pipeline_heads="BertForSequenceClassification (with its pooler)",
))
