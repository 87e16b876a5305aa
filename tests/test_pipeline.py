"""Pipeline split and schedules against a single-process reference (CPU gloo, fp32, same seed).

Each multi-process test trains an MLP, a tiny GPT-2 (tied embeddings), a tiny BERT classifier and a tiny
Llama for a few AdamW steps through one schedule on 2 ranks, and compares per-step losses, final
parameters and forward-only logits with the unsplit model trained in the parent process.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.pipeline import (
    SCHEDULES,
    build_local_model,
    build_schedule,
    pipeline_step,
    plan_pipeline,
    reduce_tied_gradients,
    stage_ids_for_rank,
    validate_pipeline,
)
from lit_parallel.testing import run_distributed

FAMILIES = ("mlp", "gpt2", "bert", "llama")
VOCAB, SEQ, BATCH, MICROBATCHES, STEPS, LR = 32, 8, 8, 4, 3, 1e-3


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        # lit_parallel.models.image.mlp(12, 16, depth=3, num_classes=5), built here because importing
        # Lightning in every spawned rank costs more than the whole test.
        return nn.Sequential(
            nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
            nn.Linear(16, 5),
        )
    if name in ("gpt2", "gpt2_cls"):
        from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=4, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0, num_labels=5,
        )
        return GPT2LMHeadModel(config) if name == "gpt2" else GPT2ForSequenceClassification(config)
    if name == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=5,
        )
        return BertForSequenceClassification(config)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=SEQ, bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def _batch(name: str, step: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The inputs of the first stage and the loss target for one step."""
    gen = torch.Generator().manual_seed(100 + step)
    if name == "mlp":
        return (torch.randn(BATCH, 12, generator=gen),), torch.randint(0, 5, (BATCH,), generator=gen)
    input_ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -2:] = 0  # right padding in two rows of different microbatches
    mask[6, -3:] = 0
    if name in ("gpt2", "llama"):
        return (input_ids, mask), input_ids
    if name == "gpt2_cls":
        input_ids = input_ids.masked_fill(mask == 0, 0)
    return (input_ids, mask), torch.randint(0, 5, (BATCH,), generator=gen)


def _loss_fn(name: str) -> Any:
    if name in ("gpt2", "llama"):
        return _lm_loss
    return _class_loss


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _class_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def _logits(model: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if isinstance(model, nn.Sequential):
        return model(*args)
    return model(input_ids=args[0], attention_mask=args[1]).logits


def _reference(name: str) -> dict[str, Any]:
    """Single-process training: per-step losses, final parameters (every FQN) and final logits."""
    model = _model(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        args, target = _batch(name, step)
        optimizer.zero_grad()
        loss = _loss_fn(name)(_logits(model, args), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        logits = _logits(model, _batch(name, STEPS)[0])
    params = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    return {"losses": losses, "params": params, "logits": logits}


def _stages(modules: list[nn.Module], ids: list[int], num_stages: int) -> list[PipelineStage]:
    return [PipelineStage(m, i, num_stages, torch.device("cpu")) for m, i in zip(modules, ids, strict=True)]


def _pipeline_rank(jobs: list[tuple[str, int, tuple[str, ...]]]) -> dict[tuple[str, str], dict[str, Any]]:
    """On each rank, per job: eval before training, train STEPS steps, eval again; report what it saw."""
    rank, pp = dist.get_rank(), dist.get_world_size()
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for schedule, virtual, families in jobs:
        for name in families:
            full = _model(name)
            eval_args = _batch(name, STEPS)[0]
            with torch.no_grad():
                initial_logits = _logits(full, eval_args)
            model = _model(name)
            plan = plan_pipeline(model, pp * virtual)
            ids = stage_ids_for_rank(rank, pp, schedule, virtual)
            local, modules = build_local_model(model, plan, ids)
            # Separate PipelineStage objects per schedule: each schedule infers its own buffers.
            train_stages = _stages(modules, ids, plan.num_stages)
            eval_stages = _stages(modules, ids, plan.num_stages)
            train = build_schedule(schedule, train_stages, MICROBATCHES, _loss_fn(name))
            evaluate = build_schedule(schedule, eval_stages, MICROBATCHES, None)
            with torch.no_grad():
                _, before = pipeline_step(evaluate, eval_stages, eval_args)
            optimizer = torch.optim.AdamW(local.parameters(), lr=LR)
            losses = []
            for step in range(STEPS):
                args, target = _batch(name, step)
                optimizer.zero_grad()
                loss, _ = pipeline_step(train, train_stages, args, target)
                reduce_tied_gradients(local, plan)
                optimizer.step()
                losses.append(None if loss is None else loss.item())
            with torch.no_grad():
                _, after = pipeline_step(evaluate, eval_stages, eval_args)
            out[schedule, name] = {
                "losses": losses,
                "params": {n: p.detach().clone() for n, p in local.named_parameters(remove_duplicate=False)},
                "logits_before": before,
                "logits_before_ref": initial_logits,
                "logits_after": after,
                "tied": plan.tied_parameters,
            }
    return out


@functools.cache
def _reference_cached(name: str) -> dict[str, Any]:
    return _reference(name)


def _check(per_rank: list[dict[str, Any]], name: str) -> None:
    ref = _reference_cached(name)
    losses = [r["losses"] for r in per_rank if r["losses"][0] is not None]
    assert len(losses) == 1, f"{name}: exactly one rank holds the last stage"
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    names = [n for r in per_rank for n in r["params"]]
    assert sorted(names) == sorted(ref["params"]), f"{name}: FQNs differ from the unsplit model"
    for r in per_rank:
        for fqn, value in r["params"].items():
            torch.testing.assert_close(value, ref["params"][fqn], rtol=0, atol=1e-5, msg=f"{name}.{fqn}")
    logits = [r for r in per_rank if r["logits_after"] is not None]
    assert len(logits) == 1, f"{name}: exactly one rank returns the logits"
    torch.testing.assert_close(logits[0]["logits_before"], logits[0]["logits_before_ref"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits[0]["logits_after"], ref["logits"], rtol=1e-5, atol=1e-5)
    if name == "gpt2":
        assert per_rank[0]["tied"] == (("transformer.wte.weight", "lm_head.weight"),)


# Every family on the three main schedules; GPT-2 (tied embeddings, the hardest case: on the V schedules
# rank 0 holds both copies) on the others. One spawn for all of them: starting ranks dominates the cost.
JOBS = [
    ("gpipe", 1, FAMILIES),
    ("1f1b", 1, (*FAMILIES, "gpt2_cls")),
    ("interleaved_1f1b", 2, FAMILIES),
    ("looped_bfs", 2, ("gpt2",)),
    ("interleaved_zero_bubble", 2, ("gpt2",)),
    ("zbv_zero_bubble", 2, ("gpt2", "mlp")),
    ("dualpipev", 2, ("gpt2",)),
]
CASES = [(schedule, name) for schedule, _, names in JOBS for name in names]


@pytest.fixture(scope="module")
def pipeline_runs() -> list[dict[tuple[str, str], dict[str, Any]]]:
    return run_distributed(_pipeline_rank, world_size=2, args=(JOBS,), timeout=170)


@pytest.mark.parametrize(("schedule", "name"), CASES, ids=[f"{s}-{n}" for s, n in CASES])
def test_schedule_matches_single_process(pipeline_runs: list[dict[Any, Any]], schedule: str, name: str) -> None:
    _check([rank[schedule, name] for rank in pipeline_runs], name)


# --- pure functions: no process group ------------------------------------------------------------------
@pytest.mark.parametrize(("name", "schedule", "virtual"), [
    ("mlp", "1f1b", 1), ("gpt2", "interleaved_1f1b", 2), ("gpt2", "zbv_zero_bubble", 2), ("bert", "gpipe", 1),
    ("llama", "looped_bfs", 2),
])
def test_local_models_keep_fqns_and_partition_parameters(name: str, schedule: str, virtual: int) -> None:
    full = dict(_model(name).named_parameters(remove_duplicate=False))
    seen: list[str] = []
    for rank in range(2):
        model = _model(name)
        plan = plan_pipeline(model, 2 * virtual)
        ids = stage_ids_for_rank(rank, 2, schedule, virtual)
        local, modules = build_local_model(model, plan, ids)
        local_names = [n for n, _ in local.named_parameters(remove_duplicate=False)]
        assert all(plan.stage_of(n) in ids for n in local_names)
        assert sum(p.numel() for m in modules for p in m.parameters()) == sum(
            p.numel() for p in local.parameters()
        ), "stage modules hold exactly the local parameters, each once"
        for n, p in local.named_parameters(remove_duplicate=False):
            torch.testing.assert_close(p, full[n], rtol=0, atol=0)
        seen += local_names
    assert sorted(seen) == sorted(full)


def test_plan_balances_and_places_embeddings_and_head() -> None:
    plan = plan_pipeline(_model("llama"), 2)
    assert plan.family == "llama"
    assert plan.stages[0][0] == "model.embed_tokens" and plan.stages[-1][-2:] == ("model.norm", "lm_head")
    assert plan.stages == (
        ("model.embed_tokens", "model.layers.0", "model.layers.1"),
        ("model.layers.2", "model.layers.3", "model.norm", "lm_head"),
    )
    mlp_plan = plan_pipeline(_model("mlp"), 4)
    assert [s[-1] for s in mlp_plan.stages] == ["2", "4", "6", "7"]  # ReLUs ride with their Linear


def test_split_points() -> None:
    plan = plan_pipeline(_model("gpt2"), 2, split_points=["transformer.h.1"])
    assert plan.stages[0][-1] == "transformer.h.0" and plan.stages[1][0] == "transformer.h.1"
    assert plan_pipeline(_model("mlp"), 2, split_points=["6"]).stages[1] == ("6", "7")
    with pytest.raises(ConfigurationError, match=r"split point 'transformer.h.9'.*valid: \['transformer.h.1'"):
        plan_pipeline(_model("gpt2"), 2, split_points=["transformer.h.9"])
    with pytest.raises(ConfigurationError, match="gives 2 stages but num_stages=3"):
        plan_pipeline(_model("gpt2"), 3, split_points=["transformer.h.2"])
    with pytest.raises(ConfigurationError, match="in model order"):
        plan_pipeline(_model("gpt2"), 3, split_points=["transformer.h.2", "transformer.h.1"])


def test_stage_ids() -> None:
    assert [stage_ids_for_rank(r, 2, "1f1b", 1) for r in range(2)] == [[0], [1]]
    assert [stage_ids_for_rank(r, 2, "interleaved_1f1b", 2) for r in range(2)] == [[0, 2], [1, 3]]
    assert [stage_ids_for_rank(r, 3, "zbv_zero_bubble", 2) for r in range(3)] == [[0, 5], [1, 4], [2, 3]]


def test_every_torch_schedule_has_a_name() -> None:
    import torch.distributed.pipelining as pipelining

    exported = {getattr(pipelining, n) for n in pipelining.__all__ if n.startswith("Schedule")}
    assert exported == set(SCHEDULES.values())


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(model="gpt2", num_stages=5), r"5 pipeline stages but the gpt2 model has only 4 layers.*num_stages <= 4"),
    (dict(model="mlp", num_stages=5), r"only 4 layers"),
    (dict(model="custom", num_stages=2), r"cannot split _Custom.*split_points=\['transformer.h.4'"),
    (dict(model="mlp", num_stages=2, family="t5"), r"model_family='t5' is unknown; valid: 'auto' or one of \[.*'sequential'"),
    (dict(model="bert", num_stages=2, family="gpt2"), r"family='gpt2' does not match BertForSequenceClassification"),
    (dict(model="mlp", num_stages=0), r"num_stages=0 is invalid"),
])
def test_plan_errors(kwargs: dict[str, Any], match: str) -> None:
    name = kwargs.pop("model")
    model = _Custom() if name == "custom" else _model(name)
    with pytest.raises(ConfigurationError, match=match):
        plan_pipeline(model, **kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(schedule="pipedream"), r"pipeline_schedule='pipedream' is unknown; valid: \['1f1b', 'dualpipev'"),
    (dict(batch_size=10), r"batch size 10 is not divisible by num_microbatches=4.*\[1, 2, 5, 10\]"),
    (dict(schedule="interleaved_1f1b", virtual_stages=3), r"3 = 6 stages needs at least one layer per virtual"),
    (dict(virtual_stages=2), r"runs one stage per rank but virtual_stages=2"),
    (dict(schedule="zbv_zero_bubble", virtual_stages=3), r"exactly two stages per rank"),
    (dict(schedule="dualpipev", virtual_stages=2, n_microbatches=2), r"num_microbatches >= number of stages \(4\)"),
    (dict(schedule="interleaved_1f1b", virtual_stages=2, n_microbatches=5, batch_size=10), r"multiple of max\(1, num_micro"),
    (dict(pp_size=8), r"8 pipeline stages but the gpt2 model has only 4 layers"),
    (dict(n_microbatches=0), r"num_microbatches=0 is invalid"),
])
def test_validate_errors(kwargs: dict[str, Any], match: str) -> None:
    config = dict(pp_size=2, virtual_stages=1, schedule="1f1b", n_microbatches=4, batch_size=8) | kwargs
    with pytest.raises(ConfigurationError, match=match):
        validate_pipeline(_model("gpt2"), **config)


def test_validate_accepts_good_configs() -> None:
    for schedule, virtual in [("gpipe", 1), ("interleaved_1f1b", 2), ("zbv_zero_bubble", 2), ("dualpipev", 2)]:
        validate_pipeline(_model("gpt2"), 2, virtual, schedule, 4, batch_size=8)
