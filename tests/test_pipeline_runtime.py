"""The pure-torch pieces the hybrid strategy wires: one pipeline step (PipelineRuntime) and the atomic sharded
checkpoint folder, each against a single-process reference, without a Trainer (2 gloo ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.pipeline import build_local_model, plan_pipeline
from lit_parallel.parallel.pipeline_runtime import PipelineRuntime, positional_inputs
from lit_parallel.parallel.sharded_checkpoint import META_FILE, load_sharded, read_meta, save_sharded
from lit_parallel.testing import run_distributed

BATCH, FEATURES = 8, 12


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, FEATURES, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=31, n_embd=16, n_layer=2, n_head=2, n_positions=8, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0))


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _runtime_step(accumulation: int) -> dict:
    rank = dist.get_rank()
    x, y = _batch()
    plan = plan_pipeline(_mlp(), 2)
    model, stages = build_local_model(_mlp(), plan, [rank])
    runtime = PipelineRuntime(plan, [rank], stages, dist.group.WORLD, torch.device("cpu"), "1f1b", 4)
    params = list(model.parameters())
    loss = runtime.train_step((x,), y, F.cross_entropy, params, accumulation=accumulation)
    before = [p.grad for p in params]
    runtime.restore_gradients()
    _, logits = runtime.eval_step((x,), y, F.cross_entropy)
    # GPT-2: wte (stage 0) and lm_head (stage 1) are one tensor; each copy gets the sum, the copy is excluded.
    gplan = plan_pipeline(_gpt2(), 2)
    gmodel, gstages = build_local_model(_gpt2(), gplan, [rank])
    ids = torch.randint(0, 31, (4, 8), generator=torch.Generator().manual_seed(2))
    gruntime = PipelineRuntime(gplan, [rank], gstages, dist.group.WORLD, torch.device("cpu"), "gpipe", 2)
    gruntime.train_step((ids,), ids, _lm_loss, list(gmodel.parameters()))
    gruntime.restore_gradients()
    gruntime.sync_tied_gradients(gmodel)
    tied = {n: p.grad.clone() for n, p in gmodel.named_parameters(remove_duplicate=False)
            if n in ("transformer.wte.weight", "lm_head.weight")}
    copies = [n for n, p in gmodel.named_parameters(remove_duplicate=False)
              if any(p is c for c in gruntime.tied_copies(gmodel))]
    return {"loss": loss.item(), "grads_before": before, "logits": logits,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}, "tied": tied, "copies": copies}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_pipeline_runtime_matches_single_process(accumulation):
    results = run_distributed(_runtime_step, world_size=2, args=(accumulation,), timeout=120)
    x, y = _batch()
    ref = _mlp()
    loss = F.cross_entropy(ref(x), y)
    (loss / accumulation).backward()
    gpt = _gpt2()
    ids = torch.randint(0, 31, (4, 8), generator=torch.Generator().manual_seed(2))
    _lm_loss(gpt(ids).logits, ids).backward()
    for rank, result in enumerate(results):
        assert result["loss"] == pytest.approx(loss.item(), rel=1e-6)
        assert all(g is None for g in result["grads_before"]), "gradients must wait for restore_gradients"
        torch.testing.assert_close(result["logits"], ref(x).detach())  # on every pipeline rank
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, dict(ref.named_parameters())[name].grad, msg=f"rank {rank}: {name}")
        for name, grad in result["tied"].items():
            torch.testing.assert_close(grad, gpt.transformer.wte.weight.grad, msg=f"rank {rank}: tied {name}")
        assert result["copies"] == ([] if rank == 0 else ["lm_head.weight"])


def test_positional_inputs():
    ids = torch.ones(2, 3, dtype=torch.long)
    names = ("input_ids", "attention_mask", "token_type_ids")
    assert len(positional_inputs(names, (), {"input_ids": ids})) == 1
    _, mask, types = positional_inputs(names, (), {"input_ids": ids, "token_type_ids": ids})
    torch.testing.assert_close(mask, torch.ones_like(ids))  # "no mask" travels as an all-ones mask
    with pytest.raises(ConfigurationError, match=r"keyword inputs \['pixel_values'\].*valid: positional tensors"):
        positional_inputs(names, (), {"pixel_values": ids})


def _save_then_load(folder: str) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from lit_parallel.parallel.tensor_parallel import apply_tensor_parallel

    path = Path(folder) / "step=3"
    sharded = apply_tensor_parallel(_mlp(), init_device_mesh("cpu", (2,)))  # DTensor shards
    save_sharded(path, {"model": get_model_state_dict(sharded)}, {"global_step": 3},
                 is_writer=dist.get_rank() == 0, barrier=dist.barrier)
    fresh = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    state = {"model": fresh.state_dict()}
    load_sharded(path, state)  # resharded: plain full tensors on every rank
    fresh.load_state_dict(state["model"])
    return {"state": fresh.state_dict(), "meta": read_meta(path), "listing": sorted(p.name for p in Path(folder).iterdir())}


def test_sharded_checkpoint_is_atomic_and_reshards(tmp_path):
    results = run_distributed(_save_then_load, world_size=2, args=(str(tmp_path),), timeout=120)
    ref = _mlp().state_dict()
    for result in results:
        assert result["meta"] == {"global_step": 3}
        assert result["listing"] == ["step=3"], "no .incomplete folder is left behind"
        for name, value in ref.items():
            torch.testing.assert_close(result["state"][name], value)
    (tmp_path / "half").mkdir()
    torch.save({}, tmp_path / "half" / META_FILE)  # no DCP .metadata: a crash mid-save
    with pytest.raises(FileNotFoundError, match=r"not a complete .* checkpoint.*'.incomplete'"):
        read_meta(tmp_path / "half")
