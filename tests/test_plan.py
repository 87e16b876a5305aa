"""The memory planner: parameter counts against real models on the meta device, the pipeline split against
plan_pipeline, ZeRO division, activation formulas, the recommendation and the console script."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.pipeline import plan_pipeline
from lit_parallel.plan import (
    Layout,
    candidates,
    estimate_memory,
    layer_activation_bytes,
    main,
    model_shape,
    parse_bytes,
    recommend,
    stage_parameter_counts,
)

# vocab 100, hidden 16, intermediate 40, 5 layers, 4 heads, 2 KV heads (head_dim 4)
TINY = dict(vocab_size=100, hidden_size=16, intermediate_size=40, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2)
# per layer: q 16*16 + k 8*16 + v 8*16 + o 16*16 + 3 MLP 16*40 + 2 norms 16
TINY_LAYER = 256 + 128 + 128 + 256 + 3 * 640 + 2 * 16
TINY_UNTIED = 2 * 100 * 16 + 5 * TINY_LAYER + 16


def _meta(cls, config):
    with torch.device("meta"):
        return cls(config)


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_llama_parameter_count_by_hand_and_meta_model(tied: bool) -> None:
    config = LlamaConfig(**TINY, tie_word_embeddings=tied)
    expected = TINY_UNTIED - (100 * 16 if tied else 0)
    assert TINY_LAYER == 2720
    assert model_shape(config).num_parameters == expected
    assert _numel(_meta(LlamaForCausalLM, config)) == expected
    assert model_shape(_meta(LlamaForCausalLM, config)).num_parameters == expected


@pytest.mark.parametrize("make", [
    lambda: (Qwen2ForCausalLM, Qwen2Config(**TINY, tie_word_embeddings=False)),  # q/k/v biases
    lambda: (LlamaForCausalLM, LlamaConfig(**TINY, attention_bias=True, mlp_bias=True)),
    lambda: (GPT2LMHeadModel, GPT2Config(vocab_size=101, n_embd=16, n_layer=3, n_head=4, n_positions=32)),
])
def test_other_configs_match_meta_models(make) -> None:
    cls, config = make()
    assert model_shape(config).num_parameters == _numel(_meta(cls, config))


def test_width_overrides_derive_head_dim_like_a_fresh_config() -> None:
    # llama_debug stores head_dim=16 (64 // 4); a 768-wide override with 12 heads is a model with head_dim 64
    shape = model_shape("llama_debug", vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
                        num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)
    fresh = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
                        num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)
    assert shape.head_dim == 64
    assert shape.num_parameters == model_shape(fresh).num_parameters == 112_082_688
    assert model_shape("llama_debug", hidden_size=128, head_dim=8).head_dim == 8  # an explicit head_dim is kept


@pytest.mark.parametrize("pp", [2, 3, 4, 5])
@pytest.mark.parametrize("tied", [False, True])
def test_stage_split_equals_plan_pipeline(pp: int, tied: bool) -> None:
    config = LlamaConfig(**{**TINY, "vocab_size": 400}, tie_word_embeddings=tied)
    plan = plan_pipeline(_meta(LlamaForCausalLM, config), pp)
    assert stage_parameter_counts(config, pp) == plan.parameter_counts


def test_gpt2_stage_split_equals_plan_pipeline() -> None:
    config = GPT2Config(vocab_size=101, n_embd=16, n_layer=4, n_head=4, n_positions=32)
    for pp in (2, 3):
        assert stage_parameter_counts(config, pp) == plan_pipeline(_meta(GPT2LMHeadModel, config), pp).parameter_counts


def test_tensor_parallel_split_follows_the_llama_plan() -> None:
    config = LlamaConfig(**TINY, tie_word_embeddings=False)
    # Column/row-parallel matrices and the vocabulary-parallel embedding and head halve; norms stay whole.
    assert stage_parameter_counts(config, 1, tp=2) == ((TINY_UNTIED - 2 * 5 * 16 - 16) // 2 + 2 * 5 * 16 + 16,)
    # tp=3 is not valid for 4 heads / 2 KV heads; uneven GQA (9 heads, 3 KV, tp=2) keeps attention replicated.
    with pytest.raises(ConfigurationError, match=r"tp=3 is not valid.*valid: \[1, 2"):
        stage_parameter_counts(config, 1, tp=3)
    odd = LlamaConfig(vocab_size=100, hidden_size=72, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3)
    est = estimate_memory(odd, Layout(tp=2, dp=1))
    attention = 2 * (72 * 72 + 2 * 24 * 72 + 72 * 72)
    mlp = 2 * 3 * 72 * 128 // 2
    assert est.parameter_count == attention + mlp + 2 * 100 * 72 // 2 + 5 * 72
    assert any(name == "model.layers.*.self_attn.q_proj.weight" for name, _ in est.replicated)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_stage_divides_by_the_shard_group(zero: int) -> None:
    config = LlamaConfig(**TINY, tie_word_embeddings=False)
    one = estimate_memory(config, Layout())
    est = estimate_memory(config, Layout(dp=4, zero_stage=zero), optimizer="adamw")
    assert one.parameters == TINY_UNTIED * 4 and one.optimizer == TINY_UNTIED * 8
    shard = 1 if zero == 0 else 4
    assert est.optimizer == one.optimizer // shard
    assert est.parameters == one.parameters // (shard if zero >= 2 else 1)
    assert est.gradients == one.gradients // (shard if zero >= 2 else 1)
    assert est.activations == one.activations
    logits = 4 * 100 * 512  # fp32 logits of the default 1 x 512 tokens
    if zero == 2:  # the whole stage unsharded plus one block's gradients
        assert est.transient == TINY_UNTIED * 4 + TINY_LAYER * 4 + logits
    if zero == 3:  # two blocks and the embeddings/head unsharded, plus one block's gradients
        assert est.transient == (2 * TINY_LAYER + (TINY_UNTIED - 5 * TINY_LAYER)) * 4 + TINY_LAYER * 4 + logits
    hsdp = estimate_memory(config, Layout(dp=4, zero_stage=zero, dp_shard=2))
    assert hsdp.optimizer == one.optimizer // (1 if zero == 0 else 2)


def test_optimizers_and_precisions() -> None:
    config = LlamaConfig(**TINY, tie_word_embeddings=False)
    n = TINY_UNTIED
    assert estimate_memory(config, optimizer="sgd_plain").optimizer == 0
    assert estimate_memory(config, optimizer="sgd").optimizer == 4 * n
    true = estimate_memory(config, precision="bf16-true")
    assert (true.parameters, true.gradients, true.optimizer) == (2 * n, 2 * n, 12 * n)  # fp32 master + 2 states
    assert estimate_memory(config, precision="bf16-true", master_weights=False).optimizer == 4 * n
    mixed = estimate_memory(config, precision="bf16-mixed")
    # autocast's bf16 weight copies and the bf16 logits of 1 x 512 tokens
    assert (mixed.parameters, mixed.transient) == (4 * n, 2 * n + 2 * 100 * 512)
    with pytest.raises(ConfigurationError, match=r"precision='fp8'.*valid: \['32-true'"):
        estimate_memory(config, precision="fp8")
    with pytest.raises(ConfigurationError, match=r"optimizer='lion'.*valid"):
        estimate_memory(config, optimizer="lion")


def test_activation_formula_and_checkpointing() -> None:
    config = LlamaConfig(**TINY, tie_word_embeddings=False)
    shape = model_shape(config)
    # fp32 Llama per token: norms 2*(4+4)*16, q/k/v + gate/up inputs 2*4*16, attention q, k, v, output (also
    # o_proj's input) 4*(2*16 + 2*8) + logsumexp 4*4, SwiGLU 4*4*40.
    per_token = 2 * 8 * 16 + 2 * 4 * 16 + 4 * (2 * 16 + 2 * 8) + 4 * 4 + 4 * 4 * 40
    assert layer_activation_bytes(shape, tp=1) == per_token
    tokens = 2 * 32
    logits = 8 * 16 + 4 * 16 + 4 * 100  # final norm, head input, fp32 log-probs (the logits are transient)
    none = estimate_memory(config, batch_size=2, seq_len=32)
    assert none.activations == (5 * per_token + logits) * tokens
    assert none.transient == 4 * 100 * tokens
    full = estimate_memory(config, Layout(activation_checkpointing="full"), batch_size=2, seq_len=32)
    assert full.activations == (5 * 4 * 16 + per_token + logits) * tokens
    selective = estimate_memory(config, Layout(activation_checkpointing="selective"), batch_size=2, seq_len=32)
    assert selective.activations == (3 * per_token + 2 * 4 * 16 + per_token + logits) * tokens
    assert full.activations < selective.activations < none.activations
    # tp divides the attention and MLP interiors only.
    assert layer_activation_bytes(shape, tp=2) == 2 * 8 * 16 + 2 * 4 * 16 + 4 * (2 * 8 + 2 * 4) + 4 * 2 + 4 * 4 * 20


def test_pipeline_schedule_in_flight_microbatches() -> None:
    config = LlamaConfig(**{**TINY, "num_hidden_layers": 4}, tie_word_embeddings=False)
    per_layer = layer_activation_bytes(model_shape(config), 1)
    layout = Layout(pp=2)
    one_f = estimate_memory(config, layout, batch_size=8, seq_len=16, num_microbatches=4)
    gpipe = estimate_memory(config, layout, batch_size=8, seq_len=16, num_microbatches=4, pipeline_schedule="gpipe")
    assert gpipe.activations > one_f.activations
    # Stage 0 under 1F1B: 2 layers x 2 microbatches in flight x (8 / 4) samples x 16 tokens.
    assert 2 * per_layer * 2 * 2 * 16 <= one_f.activations


def test_recommend_prefers_least_communication() -> None:
    config = LlamaConfig(**TINY, tie_word_embeddings=False)
    best = recommend(config, devices=4, memory_budget="1GiB", batch_size=1, seq_len=16)
    assert best.layout == Layout(dp=4)
    need = candidates(config, 4, batch_size=4, seq_len=64)
    zero3 = next(e for e in need if e.layout == Layout(dp=4, zero_stage=3))
    budget = zero3.total
    best = recommend(config, devices=4, memory_budget=budget, batch_size=4, seq_len=64, pp=1, tp=1)
    # A lower zero_stage comes before no checkpointing: replicated state with selective AC fits first.
    assert best.layout == Layout(dp=4, activation_checkpointing="selective")
    ordered = candidates(config, 4, batch_size=4, seq_len=64, pp=1, tp=1)
    assert best == next(e for e in ordered if e.fits(budget))


def test_budget_too_small_names_the_smallest_layout() -> None:
    config = LlamaConfig(**TINY, tie_word_embeddings=False)
    with pytest.raises(ConfigurationError, match=r"memory_budget=1\.0 MiB per rank is smaller than any layout on 2 "
                                                 r"devices: the smallest \(tp=.*\) needs at least .* MiB per rank: "
                                                 r"parameters .*batch_size=\d+ would fit"):
        recommend(config, devices=2, memory_budget="1MiB", batch_size=64, seq_len=64)


def test_bad_layouts_are_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"zero_stage=4 is invalid; valid: \[0, 1, 2, 3\]"):
        Layout(dp=2, zero_stage=4)
    with pytest.raises(ConfigurationError, match=r"data_parallel_shard_size=3 does not divide dp=4; valid: \[1, 2, 4\]"):
        Layout(dp=4, zero_stage=3, dp_shard=3)
    with pytest.raises(ConfigurationError, match=r"pp=9 pipeline stages .* valid: pp <= 5"):
        estimate_memory(LlamaConfig(**TINY), Layout(pp=9))


def test_project_names_need_no_download() -> None:
    shape = model_shape("llama_debug", num_hidden_layers=4)
    assert shape.num_layers == 4 and shape.tied
    assert model_shape("gpt2_debug").kind == "gpt2"
    with pytest.raises(ConfigurationError, match="never downloads"):
        model_shape("no-such-org/no-such-model")


def test_generic_module_counts_parameters_only() -> None:
    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 5))
    est = estimate_memory(net, Layout(dp=2, zero_stage=1))
    assert est.parameter_count == 10 * 20 + 20 + 20 * 5 + 5 and est.optimizer == est.parameter_count * 4
    with pytest.raises(ConfigurationError, match=r"tp=2 is not valid for Sequential; valid: \[1\]"):
        estimate_memory(net, Layout(tp=2))
    with pytest.raises(ConfigurationError, match="tp=1, pp=1 only"):
        estimate_memory(net, Layout(pp=2))


def test_parse_bytes() -> None:
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("24GB") == 24 * 10**9
    assert parse_bytes("512 MiB") == 512 * 2**20
    with pytest.raises(ConfigurationError, match=r"memory_budget='lots' is not a size"):
        parse_bytes("lots")


def test_cli_prints_the_table_and_recommendation(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model=llama_debug", "model.num_hidden_layers=4", "devices=2", "memory_budget=2GiB",
                 "seq_len=64", "batch_size=2", "precision=bf16-mixed"]) == 0
    out = capsys.readouterr().out
    assert "recommended: tp=1 pp=1 dp=2 zero=0 ac=none" in out
    assert "params" in out and "activ" in out and "4 layers" in out


@pytest.mark.parametrize(("args", "message"), [
    (["colour=red"], r"unknown key 'colour'; valid keys: \['model'"),
    (["devices=two"], r"devices='two' is not an integer"),
    (["precision=fp8"], r"precision='fp8' is unknown; valid"),
    (["memory_budget=lots"], r"memory_budget='lots' is not a size"),
    (["devices"], r"argument 'devices' is not key=value"),
    (["model=llama_debug", "model.colour=red"], r"model.colour is not an attribute of LlamaConfig; valid: .*hidden_size"),
    (["devices=4", "memory_budget=1KiB"], r"smaller than any layout on 4 devices"),
])
def test_cli_errors_exit_2_with_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err


def test_cli_help_lists_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for key in ("model", "devices", "memory_budget", "seq_len", "batch_size", "precision", "zero_stage"):
        assert key in out
