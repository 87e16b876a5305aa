"""Tensor-parallel plans on 2 gloo ranks match the unsharded model: logits, gradients, AdamW steps.

Every rank builds the same tiny model from one seed, keeps an unsharded copy as the reference, shards
the other with :func:`apply_tensor_parallel` and compares. All models run in one spawned job (the
``tp_results`` fixture) to keep process start-up cheap; each test then checks one model's numbers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_parallel.errors import ConfigurationError
from lit_parallel.models.image import mlp, mnist_cnn
from lit_parallel.parallel.tensor_parallel import (
    GQAHeadParallel,
    apply_plan,
    apply_tensor_parallel,
    detect_family,
    supported_families,
    tensor_parallel_plan,
    validate_tensor_parallel,
)
from lit_parallel.testing import run_distributed

TP, STEPS, TOL = 2, 3, 1e-5
VOCAB = 101  # odd: vocabulary shards of 51 and 50 rows


def _bert_config(**overrides: Any) -> Any:
    from transformers import BertConfig

    kw = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
              max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    return BertConfig(**{**kw, **overrides})


def _llama_config(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    kw = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=32, max_position_embeddings=32, tie_word_embeddings=True)
    return LlamaConfig(**{**kw, **overrides})


def _gpt2_config(**overrides: Any) -> Any:
    from transformers import GPT2Config

    kw = dict(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
              attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0, num_labels=3)
    return GPT2Config(**{**kw, **overrides})


def _token_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 8), generator=g)
    ids[0, :4] = torch.tensor([50, 51, 52, VOCAB - 1])  # both sides of the uneven shard boundary
    ids[1, 0] = 0  # BERT's padding_idx
    return ids


def _hf_loss(**batch: Any) -> Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor]]:
    def step(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(**batch)
        return out.logits, out.loss

    return step


def _image_loss(x: torch.Tensor, y: torch.Tensor) -> Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor]]:
    def step(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return logits, F.cross_entropy(logits, y)

    return step


def _build(name: str) -> tuple[nn.Module, Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor]]]:
    """A tiny model (same weights on every rank) and a function giving (logits, loss) on a fixed batch."""
    from transformers import (
        BertForMaskedLM,
        BertForSequenceClassification,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    ids = _token_batch()
    labels3 = torch.tensor([0, 2])
    if name == "mlp":
        x = torch.randn(4, 1, 4, 5)
        return mlp(in_features=20, hidden=16, depth=2, num_classes=3), _image_loss(x, torch.tensor([0, 1, 2, 1]))
    if name == "mnist_cnn":
        x = torch.randn(2, 1, 28, 28)
        return mnist_cnn(num_classes=10, channels=4, hidden=16), _image_loss(x, torch.tensor([3, 7]))
    if name == "bert":
        return BertForSequenceClassification(_bert_config()), _hf_loss(input_ids=ids, labels=labels3)
    if name == "bert_mlm":
        return BertForMaskedLM(_bert_config()), _hf_loss(input_ids=ids, labels=ids)
    if name == "llama":
        return LlamaForCausalLM(_llama_config()), _hf_loss(input_ids=ids, labels=ids)
    if name in ODD_LLAMAS:
        return LlamaForCausalLM(_llama_config(**ODD_LLAMAS[name])), _hf_loss(input_ids=ids, labels=ids)
    if name == "gpt2":
        return GPT2LMHeadModel(_gpt2_config()), _hf_loss(input_ids=ids, labels=ids)
    if name == "gpt2_cls":
        return GPT2ForSequenceClassification(_gpt2_config()), _hf_loss(input_ids=ids, labels=labels3)
    raise AssertionError(name)


# Head counts tp=2 does not divide (SmolLM2-135M: 9 heads, 3 kv heads): split unevenly by kv-head groups.
ODD_LLAMAS: dict[str, dict[str, Any]] = {
    "llama_gqa_odd": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3),   # groups of 2
    "llama_mha_odd": dict(hidden_size=24, num_attention_heads=3, num_key_value_heads=3),   # no GQA
}
MODELS = ("mlp", "mnist_cnn", "bert", "bert_mlm", "llama", "gpt2", "gpt2_cls", *ODD_LLAMAS)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((_full(a[k]) - b[k]).abs().max().item() for k in b)


def _compare(name: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    ref, loss_fn = _build(name)
    tp = copy.deepcopy(ref)
    tied_before = {n for n, _ in ref.named_parameters(remove_duplicate=False)} - {n for n, _ in ref.named_parameters()}
    apply_tensor_parallel(tp, init_device_mesh("cpu", (TP,)))
    out: dict[str, Any] = {
        "fqns_equal": [n for n, _ in tp.named_parameters()] == [n for n, _ in ref.named_parameters()],
        "state_keys_equal": list(tp.state_dict()) == list(ref.state_dict()),
        "all_dtensor": all(isinstance(p, DTensor) for p in tp.parameters()),
        "sharded": sum(isinstance(p, DTensor) and p.placements[0].is_shard() for p in tp.parameters()),
        "tied_kept": tied_before == ({n for n, _ in tp.named_parameters(remove_duplicate=False)}
                                      - {n for n, _ in tp.named_parameters()}),
        "init_diff": _max_diff(dict(tp.named_parameters()), dict(ref.named_parameters())),
    }
    # eps=1e-5: the attention key bias has an analytically zero gradient (softmax ignores a shift shared
    # by all keys), so its computed gradient is rounding noise (~1e-9) whose value depends on summation
    # order; AdamW with eps=1e-8 turns that noise into steps of ~lr/100 that differ between layouts.
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, eps=1e-5, foreach=True)
    opt_tp = torch.optim.AdamW(tp.parameters(), lr=1e-2, eps=1e-5, foreach=True)
    for step in range(STEPS):
        logits_ref, loss_ref = loss_fn(ref)
        logits_tp, loss_tp = loss_fn(tp)
        loss_ref.backward()
        loss_tp.backward()
        if step == 0:
            out["logits_plain"] = type(logits_tp) is torch.Tensor and logits_tp.shape == logits_ref.shape
            out["logits_diff"] = (logits_tp - logits_ref).abs().max().item()
            out["loss_diff"] = abs(loss_tp.item() - loss_ref.item())
            out["grad_diff"] = _max_diff({n: p.grad for n, p in tp.named_parameters()},
                                         {n: p.grad for n, p in ref.named_parameters()})
        opt_ref.step()
        opt_tp.step()
        opt_ref.zero_grad()
        opt_tp.zero_grad()
    out["param_diff"] = _max_diff(dict(tp.named_parameters()), dict(ref.named_parameters()))
    out["state_dict_diff"] = _max_diff(tp.state_dict(), ref.state_dict())
    # Replicated parameters must stay bit-identical across tp ranks; the test compares the ranks' copies.
    out["replicated"] = {n: p.to_local().detach().clone() for n, p in tp.named_parameters()
                         if isinstance(p, DTensor) and p.placements[0].is_replicate()}
    if name in ODD_LLAMAS:
        attn = tp.model.layers[0].self_attn
        hidden = torch.randn(1, 2, attn.q_proj.in_features)
        out["widths"] = {proj: getattr(attn, proj)(hidden).shape[-1] for proj in ("q_proj", "k_proj", "v_proj")}
    return out


def _pruned() -> dict[str, Any]:
    """Pipeline-stage-like models: placeholder layers, embeddings and heads absent."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    mesh = init_device_mesh("cpu", (TP,))
    out: dict[str, Any] = {}
    torch.manual_seed(0)
    hidden = torch.randn(2, 8, 16)

    llama = LlamaForCausalLM(_llama_config(num_hidden_layers=3))
    ref_layer = copy.deepcopy(llama.model.layers[1])
    llama.model.layers[0] = nn.Module()
    llama.model.layers[2] = nn.Module()
    llama.model.embed_tokens = None  # how the pipeline split drops it
    llama.model.norm = nn.Identity()
    del llama.lm_head
    names = [n for n, _ in llama.named_parameters()]
    apply_tensor_parallel(llama, mesh)
    pos = torch.arange(8).unsqueeze(0)
    rope = llama.model.rotary_emb(hidden, pos)
    out["llama_fqns"] = [n for n, _ in llama.named_parameters()] == names
    out["llama_diff"] = (llama.model.layers[1](hidden, position_embeddings=rope)
                         - ref_layer(hidden, position_embeddings=rope)).abs().max().item()

    gpt2 = GPT2LMHeadModel(_gpt2_config(n_layer=2))
    ref_block = copy.deepcopy(gpt2.transformer.h[1])
    gpt2.transformer.h[0] = nn.Module()
    del gpt2.transformer.wte
    gpt2.lm_head = nn.Identity()
    names = [n for n, _ in gpt2.named_parameters()]
    apply_tensor_parallel(gpt2, mesh)
    out["gpt2_fqns"] = [n for n, _ in gpt2.named_parameters()] == names
    out["gpt2_diff"] = (gpt2.transformer.h[1](hidden) - ref_block(hidden)).abs().max().item()

    # A Sequential stage whose first Linear lives on the previous stage: nothing pairs across the gap.
    net = mlp(in_features=16, hidden=16, depth=2, num_classes=4)
    net[0] = net[1] = nn.Module()
    out["seq_plan"] = sorted(tensor_parallel_plan(net))
    return out


def _custom_plan() -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4), nn.LayerNorm(4))
    net = copy.deepcopy(ref)
    x = torch.randn(3, 8)
    apply_plan(net, init_device_mesh("cpu", (TP,)), {"0": ColwiseParallel(), "2": RowwiseParallel(), "9": ColwiseParallel()})
    return {"diff": (net(x) - ref(x)).abs().max().item()}


def _checkpoint_across_layouts(name: str, path: str) -> float:
    """Save the sharded model with torch DCP, load it into the unsharded model; return the max difference."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    ref, _ = _build(name)
    sharded = apply_tensor_parallel(copy.deepcopy(ref), init_device_mesh("cpu", (TP,)))
    dcp.save(sharded.state_dict(), checkpoint_id=path)
    torch.manual_seed(123)
    plain, _ = _build(name)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_()
    state = plain.state_dict()
    dcp.load(state, checkpoint_id=path)
    plain.load_state_dict(state)
    return _max_diff(plain.state_dict(), ref.state_dict())


def _all_checks(tmp: str) -> dict[str, Any]:
    results: dict[str, Any] = {name: _compare(name) for name in MODELS}
    results["checkpoint"] = {name: _checkpoint_across_layouts(name, f"{tmp}/{name}")
                             for name in ("gpt2", "llama", "llama_gqa_odd")}
    results["pruned"] = _pruned()
    results["custom"] = _custom_plan()
    return results


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_distributed(_all_checks, world_size=TP, args=(str(tmp_path_factory.mktemp("dcp")),), timeout=240)


@pytest.mark.parametrize("name", MODELS)
def test_matches_unsharded_model(tp_results: list[dict[str, Any]], name: str) -> None:
    for rank, results in enumerate(tp_results):
        r = results[name]
        assert r["fqns_equal"] and r["state_keys_equal"] and r["tied_kept"], (rank, r)
        assert r["all_dtensor"] and r["sharded"] > 0, (rank, r)
        assert r["logits_plain"], (rank, r)
        for key in ("init_diff", "logits_diff", "loss_diff", "grad_diff", "param_diff", "state_dict_diff"):
            assert r[key] < TOL, (rank, key, r)


def test_replicated_parameters_identical_across_ranks(tp_results: list[dict[str, Any]]) -> None:
    for name in MODELS:
        first, *others = (results[name]["replicated"] for results in tp_results)
        for other in others:
            assert first.keys() == other.keys(), name
            unequal = [n for n in first if not torch.equal(first[n], other[n])]
            assert not unequal, (name, unequal)


@pytest.mark.parametrize("name", ODD_LLAMAS)
def test_odd_llama_heads_split_by_kv_groups(tp_results: list[dict[str, Any]], name: str) -> None:
    # 3 kv heads of dim 8 over 2 ranks: 2 + 1, each with its query heads; q/k/v/o stored replicated.
    groups = ODD_LLAMAS[name]["num_attention_heads"] // 3
    assert [r[name]["widths"] for r in tp_results] == [
        {"q_proj": kv * groups * 8, "k_proj": kv * 8, "v_proj": kv * 8} for kv in (2, 1)
    ]
    attention = {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert attention <= tp_results[0][name]["replicated"].keys()
    assert not any(".mlp." in n for n in tp_results[0][name]["replicated"])  # the MLP is sharded


def test_pruned_stage_parallelizes(tp_results: list[dict[str, Any]]) -> None:
    for results in tp_results:
        r = results["pruned"]
        assert r["llama_fqns"] and r["gpt2_fqns"], r
        assert r["llama_diff"] < TOL and r["gpt2_diff"] < TOL, r
        assert r["seq_plan"] == ["3", "5"], r


def test_checkpoint_loads_into_unsharded_model(tp_results: list[dict[str, Any]]) -> None:
    # GPT-2's fused qkv and the odd vocabulary (uneven shards) are the layouts that could go wrong.
    for results in tp_results:
        assert all(diff == 0.0 for diff in results["checkpoint"].values()), results["checkpoint"]


def test_custom_plan(tp_results: list[dict[str, Any]]) -> None:
    assert all(results["custom"]["diff"] < TOL for results in tp_results)


def test_llama_plan_depends_on_tp_size_only_for_odd_heads() -> None:
    odd = _llama_model(**ODD_LLAMAS["llama_gqa_odd"])
    uneven = tensor_parallel_plan(odd, tp_size=2)
    assert isinstance(uneven["model.layers.0.self_attn"], GQAHeadParallel)
    assert "model.layers.0.self_attn.q_proj" not in uneven
    assert "model.layers.0.mlp.up_proj" in uneven
    assert tensor_parallel_plan(odd, tp_size=3).keys() == tensor_parallel_plan(odd).keys()  # 6 and 3 heads: even
    assert "model.layers.0.self_attn.q_proj" in tensor_parallel_plan(odd)
    assert tensor_parallel_plan(_llama_model(), tp_size=2).keys() == tensor_parallel_plan(_llama_model()).keys()


def test_detect_family() -> None:
    from transformers import BertModel, GPT2LMHeadModel, LlamaForCausalLM

    assert detect_family(mnist_cnn()) == "sequential"
    assert detect_family(BertModel(_bert_config(num_hidden_layers=1))) == "bert"
    assert detect_family(LlamaForCausalLM(_llama_config(num_hidden_layers=1))) == "llama"
    assert detect_family(GPT2LMHeadModel(_gpt2_config(n_layer=1))) == "gpt2"
    with pytest.raises(ConfigurationError, match="no model family covers Linear.*registered families.*bert.*gpt2.*llama.*sequential"):
        detect_family(nn.Linear(2, 2))
    assert set(supported_families()) >= {"sequential", "bert", "llama", "gpt2", "qwen2", "mistral", "qwen3"}


@pytest.mark.parametrize(
    ("build", "tp_size", "match"),
    [
        (lambda: _bert_model(num_attention_heads=2, hidden_size=16), 4, "num_attention_heads=2"),
        (lambda: _bert_model(intermediate_size=30), 4, "intermediate_size=30"),
        (lambda: _llama_model(num_attention_heads=4, num_key_value_heads=1), 2, "num_key_value_heads=1"),
        (lambda: _llama_model(num_attention_heads=6, num_key_value_heads=3, hidden_size=24), 4,
         r"tensor_parallel_size=4 cannot split num_attention_heads=6, num_key_value_heads=3 .*valid sizes .*\[1, 2\]"),
        (lambda: _llama_model(num_attention_heads=3, num_key_value_heads=3, hidden_size=24, intermediate_size=30), 4,
         "intermediate_size=30"),
        (lambda: _gpt2_model(n_head=2), 4, "n_head=2"),
        (lambda: _gpt2_model(add_cross_attention=True), 2, "add_cross_attention"),
        (lambda: mlp(in_features=8, hidden=6, depth=1), 4, "1.out_features=6"),
        (lambda: mlp(), 0, "tensor_parallel_size=0"),
    ],
)
def test_validation_errors(build: Callable[[], nn.Module], tp_size: int, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        validate_tensor_parallel(build(), tp_size)


def test_validation_accepts_and_rejects_family_names() -> None:
    validate_tensor_parallel(_llama_model(), 2)
    # SmolLM2-135M's layout: 9 heads, 3 kv heads, intermediate 1536 -> tp 2 and 3 (uneven / even heads).
    smollm2 = dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=72, intermediate_size=96)
    for tp_size in (2, 3):
        validate_tensor_parallel(_llama_model(**smollm2), tp_size)
    validate_tensor_parallel(mlp(), 4, family="sequential")
    with pytest.raises(ConfigurationError, match="family='t5' is unknown; valid: .*gpt2"):
        validate_tensor_parallel(mlp(), 2, family="t5")


def _bert_model(**kw: Any) -> nn.Module:
    from transformers import BertModel

    return BertModel(_bert_config(num_hidden_layers=1, **kw))


def _llama_model(**kw: Any) -> nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(_llama_config(num_hidden_layers=1, **kw))


def _gpt2_model(**kw: Any) -> nn.Module:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(_gpt2_config(n_layer=1, **kw))
