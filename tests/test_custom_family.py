"""A model family added from outside the package (docs/hybrid.md, "Adding a model family"), proven equal to one
process under tp=2 and pp=2 (pure torch, 2 gloo ranks). The family part is what the docs show."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lit_parallel.testing import run_distributed

VOCAB, HIDDEN, HEADS, LAYERS, SEQ = 31, 16, 2, 4, 8


# -- the user's network: nothing the package knows --------------------------------------------------
class TinyConfig:
    model_type = "tiny_decoder"
    num_heads, hidden = HEADS, HIDDEN


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, -1, HIDDEN // HEADS).transpose(1, 2) for p in (self.q, self.k, self.v))
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(HIDDEN), Attention(), nn.LayerNorm(HIDDEN)
        self.up, self.down = nn.Linear(HIDDEN, 4 * HIDDEN), nn.Linear(4 * HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = TinyConfig()
        self.decoder = nn.Module()
        self.decoder.embed = nn.Embedding(VOCAB, HIDDEN)
        self.decoder.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.decoder.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.decoder.embed(input_ids)
        for block in self.decoder.blocks:
            x = block(x)
        return self.head(self.decoder.norm(x))


# -- the family: one file in a real project ----------------------------------------------------------
def register_tiny_decoder() -> None:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from lit_parallel import ConfigurationError, ModelFamily, register_family
    from lit_parallel.parallel.families import (
        FULL_ATTENTION,
        PipelineLayout,
        StageModule,
        block_units,
        family_names,
    )

    def tp_plan(model: nn.Module, tp_size: int | None) -> dict:
        plan = {"decoder.embed": RowwiseParallel(input_layouts=Replicate()),
                "head": ColwiseParallel(output_layouts=Replicate())}
        for i, block in enumerate(model.decoder.blocks):
            if hasattr(block, "attn"):  # blocks of other pipeline stages are placeholders
                p = f"decoder.blocks.{i}"
                plan |= {f"{p}.attn.q": ColwiseParallel(), f"{p}.attn.k": ColwiseParallel(),
                         f"{p}.attn.v": ColwiseParallel(), f"{p}.attn.out": RowwiseParallel(),
                         f"{p}.up": ColwiseParallel(), f"{p}.down": RowwiseParallel()}
        return plan

    def validate_tp(model: nn.Module, tp_size: int) -> None:
        if model.config.num_heads % tp_size:
            raise ConfigurationError(f"tensor_parallel_size={tp_size} must divide num_heads={model.config.num_heads}")

    def layout(model: nn.Module, split_points: list[str] | None) -> PipelineLayout:
        return PipelineLayout(block_units(model, "decoder.blocks"), first=["decoder.embed"],
                              last=["decoder.norm", "head"])

    class Stage(StageModule):  # first: (input_ids,) -> hidden -> ... -> last: logits
        def __init__(self, model: nn.Module, blocks: list[nn.Module], is_first: bool, is_last: bool) -> None:
            super().__init__(model.config, blocks, is_first, is_last)
            if is_first:
                self.embed = model.decoder.embed
            if is_last:
                self.norm, self.head = model.decoder.norm, model.head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.embed(x) if self.is_first else x
            for block in self.blocks:
                x = block(x)  # causal attention inside the block, exactly as the model's own forward
            return self.head(self.norm(x)) if self.is_last else x

    if "tiny_decoder" not in family_names():
        register_family(ModelFamily(
            name="tiny_decoder", model_types=("tiny_decoder",), tp_plan=tp_plan, validate_tp=validate_tp,
            pipeline_layout=layout, build_stage=Stage, stage_inputs=("input_ids",),
            attention_kinds=frozenset({FULL_ATTENTION}), attention_module="attn"))


# -- the proof -----------------------------------------------------------------------------------------
def _model() -> TinyDecoder:
    torch.manual_seed(0)
    return TinyDecoder()


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(1))


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _parallel(layout: str) -> tuple[float, dict[str, torch.Tensor]]:
    register_tiny_decoder()
    ids, model = _ids(), _model()
    if layout == "tp2":
        from torch.distributed.device_mesh import init_device_mesh

        from lit_parallel.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, init_device_mesh("cpu", (2,)))  # detected by config.model_type
        loss = _loss(model(ids), ids)
        loss.backward()
        return loss.item(), {n: _full(p.grad) for n, p in model.named_parameters()}
    from lit_parallel.parallel.pipeline import build_local_model, plan_pipeline
    from lit_parallel.parallel.pipeline_runtime import PipelineRuntime

    rank = dist.get_rank()
    plan = plan_pipeline(model, 2)
    local, stages = build_local_model(model, plan, [rank])
    runtime = PipelineRuntime(plan, [rank], stages, dist.group.WORLD, torch.device("cpu"), "1f1b", 2)
    loss = runtime.train_step((ids,), ids, _loss, list(local.parameters()))
    runtime.restore_gradients()
    return loss.item(), {n: p.grad for n, p in local.named_parameters()}


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_registered_family_matches_single_process(layout):
    results = run_distributed(_parallel, world_size=2, args=(layout,), timeout=120)
    ref, ids = _model(), _ids()
    loss = _loss(ref(ids), ids)
    loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for rank, (rank_loss, rank_grads) in enumerate(results):
        assert rank_loss == pytest.approx(loss.item(), rel=1e-6)
        assert rank_grads, f"rank {rank} holds no parameters"
        for name, grad in rank_grads.items():
            torch.testing.assert_close(grad, grads[name], rtol=1e-5, atol=1e-6, msg=f"{layout} rank {rank}: {name}")
    if layout == "pp2":  # the two stages together hold every parameter once
        assert sorted([*results[0][1], *results[1][1]]) == sorted(grads)
