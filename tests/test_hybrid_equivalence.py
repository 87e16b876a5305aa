"""HybridParallelStrategy trains exactly like one process: per-step loss and final parameters.

Every layout of at most 4 ranks among (tp, pp, dp) is compared, in fp32 with AdamW, against a
single-process Lightning run on the same global batches from the same seed.
"""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lit_parallel import HybridParallelStrategy
from lit_parallel.models import ImageClassifier, mlp
from lit_parallel.testing import global_batch_order, run_distributed

SEED, STEPS, GLOBAL_BATCH, FEATURES = 11, 5, 16, 12
LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2)]  # (tp, pp, dp)


class _LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def _mlp_module() -> ImageClassifier:
    return ImageClassifier(net=mlp(in_features=FEATURES, hidden=32, depth=3), lr=1e-2, optimizer="adamw",
                           weight_decay=0.01)


def _mlp_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = STEPS * GLOBAL_BATCH
    return TensorDataset(torch.randn(n, FEATURES, generator=g), torch.randint(0, 10, (n,), generator=g))


def _fit(layout: tuple[int, int, int] | None, schedule: str = "1f1b", microbatches: int = 2):
    L.seed_everything(SEED, verbose=False)
    module = _mlp_module()
    recorder = _LossRecorder()
    common = dict(accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])
    if layout is None:
        dp = int(os.environ.get("REF_DP", "1"))
        order = global_batch_order(STEPS * GLOBAL_BATCH, dp, GLOBAL_BATCH // dp, SEED)
        loader = DataLoader(_mlp_data(), batch_size=GLOBAL_BATCH, sampler=order)
        trainer = L.Trainer(devices=1, **common)
        trainer.fit(module, loader)
        return recorder.losses, {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    tp, pp, dp = layout
    strategy = HybridParallelStrategy(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp,
                                      num_microbatches=microbatches, pipeline_schedule=schedule)
    loader = DataLoader(_mlp_data(), batch_size=GLOBAL_BATCH // dp, shuffle=True)
    trainer = L.Trainer(devices=tp * pp * dp, strategy=strategy, **common)
    trainer.fit(module, loader)
    return recorder.losses, strategy.export_state_dict()


def _reference(dp: int):
    os.environ["REF_DP"] = str(dp)
    try:
        return _fit(None)
    finally:
        del os.environ["REF_DP"]


def _check(layout, results, reference) -> None:
    ref_losses, ref_state = reference
    for rank, (losses, _) in enumerate(results):
        assert len(losses) == STEPS
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7,
                                   msg=f"layout {layout} rank {rank}: per-step train/loss differs")
    state = results[0][1]
    assert state is not None and sorted(state) == sorted(ref_state)
    for name, value in ref_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=f"layout {layout}: {name}")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: f"tp{t[0]}pp{t[1]}dp{t[2]}")
def test_mlp_layout_matches_single_process(layout):
    reference = _reference(layout[2])
    results = run_distributed(_fit, world_size=layout[0] * layout[1] * layout[2], args=(layout,),
                              init_process_group=False, timeout=240)
    _check(layout, results, reference)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved_1f1b"])
def test_mlp_pipeline_schedules(schedule):
    reference = _reference(1)
    results = run_distributed(_fit, world_size=2, args=((1, 2, 1), schedule, 4), init_process_group=False,
                              timeout=240)
    _check((1, 2, 1), results, reference)
