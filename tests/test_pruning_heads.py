"""Attention-head pruning on tiny random BERT, GPT-2 and Llama (built from config classes, no downloads)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import transformers
from torch.utils.data import DataLoader, TensorDataset

from lit_parallel.callbacks import AttentionHeadPruning, export_pruned, load_pruned
from lit_parallel.callbacks.head_pruning import (
    attention_layers,
    head_gates,
    head_importance,
    prune_heads,
    select_heads,
)
from lit_parallel.errors import ConfigurationError

VOCAB, SEQ = 40, 12


def _model(kind: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=48, max_position_embeddings=SEQ, num_labels=3)
        return transformers.BertForSequenceClassification(config).eval()
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=SEQ,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=SEQ)
    return transformers.LlamaForCausalLM(config).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))


def _loss(model: transformers.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    labels = torch.zeros(len(ids), dtype=torch.long) if model.config.model_type == "bert" else ids
    return model(input_ids=ids, labels=labels).loss


def _logits(model: transformers.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _silence(model: transformers.PreTrainedModel, name: str, unit: int) -> None:
    """Zero a unit's slice of the output projection, so its gate gradient (importance) is exactly 0."""
    layer = attention_layers(model)[name]
    width = layer.group_size * layer.head_dim
    with torch.no_grad():
        # GPT-2's Conv1D weight is [in, out]; a Linear's is [out, in].
        weight = layer.out_proj.weight if layer.kind == "gpt2" else layer.out_proj.weight.t()
        weight[unit * width:(unit + 1) * width].zero_()


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_removing_zero_importance_heads_keeps_outputs_and_shrinks_model(kind, tmp_path):
    model, ids = _model(kind), _ids()
    first, second = list(attention_layers(model))
    _silence(model, first, 1)
    _silence(model, second, 0)
    reference = _logits(model, ids)
    scores = head_importance(model, [ids, ids], lambda b: _loss(model, b))
    assert scores[first][1] == 0 and scores[second][0] == 0
    heads = select_heads(scores, 2)
    assert heads == {first: [1], second: [0]}
    size = sum(p.numel() for p in model.parameters())
    prune_heads(model, heads)
    assert sum(p.numel() for p in model.parameters()) < size
    torch.testing.assert_close(_logits(model, ids), reference, rtol=1e-5, atol=1e-6)
    # The export loads in plain transformers (plus the recorded head removal) with the same outputs.
    reloaded = load_pruned(export_pruned(model, tmp_path / kind))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_removed_heads_equal_masked_heads(kind):
    model, ids = _model(kind), _ids()
    heads = select_heads(head_importance(model, [ids], lambda b: _loss(model, b)), 0.5)
    layers = attention_layers(model)
    gates = {}
    for name, layer in layers.items():
        gate = torch.ones(layer.num_heads)
        for unit in heads.get(name, []):
            gate[unit * layer.group_size:(unit + 1) * layer.group_size] = 0
        gates[name] = gate
    with head_gates(model, gates):
        masked = _logits(model, ids)
    units_before = sum(layer.num_units for layer in layers.values())
    prune_heads(model, heads)
    assert sum(layer.num_units for layer in attention_layers(model).values()) == units_before // 2
    torch.testing.assert_close(_logits(model, ids), masked, rtol=1e-5, atol=1e-6)


def test_llama_gqa_keeps_group_structure():
    model = _model("llama")
    name = next(iter(attention_layers(model)))
    prune_heads(model, {name: [0]})
    attn = model.get_submodule(name)
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (16, 8, 16)
    assert attn.num_key_value_groups == 2


def test_pruning_all_heads_of_a_layer_is_refused():
    model = _model("bert")
    name = next(iter(attention_layers(model)))
    with pytest.raises(ConfigurationError, match="pruning all 4 heads of .* keep at least one"):
        prune_heads(model, {name: [0, 1, 2, 3]})
    with pytest.raises(ConfigurationError, match="no attention layer 'nope'; valid"):
        prune_heads(model, {"nope": [0]})


class _Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = _model("bert").train()

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_callback_removes_half_the_heads_after_fit():
    L.seed_everything(0, verbose=False)
    module = _Classifier()
    data = TensorDataset(torch.randint(0, VOCAB, (32, SEQ)), torch.randint(0, 3, (32,)))
    pruning = AttentionHeadPruning(heads_to_prune=0.5, importance="gradient", num_batches=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, callbacks=[pruning], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    size = sum(p.numel() for p in module.parameters())
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert sum(len(units) for units in pruning.pruned.values()) == 4
    assert sum(layer.num_heads for layer in attention_layers(module.model).values()) == 4
    assert sum(p.numel() for p in module.parameters()) < size
    assert torch.isfinite(_logits(module.model.eval(), _ids())).all()
