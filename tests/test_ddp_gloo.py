"""Two gloo ranks under Lightning DDP train exactly like one process on the same global batches."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_parallel.models import ImageClassifier, mlp
from lit_parallel.testing import run_distributed

STEPS, GLOBAL_BATCH, SEED = 5, 16, 7


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = STEPS * GLOBAL_BATCH
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def _global_batch_order(world: int) -> list[int]:
    """Sample order that gives one process the union of every rank's batch, step by step.

    Lightning always shuffles training data with ``DistributedSampler(seed=PL_GLOBAL_SEED)``: rank r
    takes ``perm[r::world]`` of the epoch's permutation.
    """
    perm = torch.randperm(STEPS * GLOBAL_BATCH, generator=torch.Generator().manual_seed(SEED)).tolist()
    per_rank, local = [perm[r::world] for r in range(world)], GLOBAL_BATCH // world
    return [i for s in range(STEPS) for r in range(world) for i in per_rank[r][s * local : (s + 1) * local]]


def _fit(devices: int) -> dict[str, torch.Tensor]:
    L.seed_everything(SEED, verbose=False)
    model = ImageClassifier(net=mlp(hidden=32, depth=1), lr=1e-2)
    if devices == 1:
        loader = DataLoader(_data(), batch_size=GLOBAL_BATCH, sampler=_global_batch_order(world=2))
    else:
        loader = DataLoader(_data(), batch_size=GLOBAL_BATCH // devices, shuffle=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=STEPS,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=loader)
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def test_two_rank_ddp_matches_single_process():
    reference = _fit(1)
    results = run_distributed(_fit, world_size=2, args=(2,), init_process_group=False, timeout=240)
    for rank_state in results:
        for name, value in reference.items():
            torch.testing.assert_close(rank_state[name], value, rtol=1e-5, atol=1e-6, msg=name)
