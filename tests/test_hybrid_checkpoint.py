"""HybridParallelStrategy checkpoints: atomic DCP folders that resume exactly, across layouts."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lit_parallel import HybridParallelStrategy
from lit_parallel.models import ImageClassifier, mlp
from lit_parallel.testing import run_distributed

SEED, BATCH, STEPS_PER_EPOCH, FEATURES = 3, 8, 3, 12


class _Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics["train/loss"]))


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    n = BATCH * STEPS_PER_EPOCH
    data = TensorDataset(torch.randn(n, FEATURES, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=BATCH, shuffle=True)


def _fit(layout: tuple[int, int], epochs: int, ckpt_in: str | None = None, ckpt_out: str | None = None):
    L.seed_everything(SEED, verbose=False)
    module = ImageClassifier(net=mlp(in_features=FEATURES, hidden=16, depth=3), lr=1e-2)
    losses = _Losses()
    strategy = HybridParallelStrategy(tensor_parallel_size=layout[0], pipeline_parallel_size=layout[1],
                                      num_microbatches=2)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[losses])
    trainer.fit(module, _loader(), ckpt_path=ckpt_in)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    return losses.values, strategy.export_state_dict()


def _save_then_resume_elsewhere(tmp: str):
    ckpt = str(Path(tmp) / "tp2.ckpt")
    _fit((2, 1), epochs=1, ckpt_out=ckpt)
    resumed, resumed_state = _fit((1, 2), epochs=2, ckpt_in=ckpt)
    uninterrupted, full_state = _fit((2, 1), epochs=2)
    return resumed, uninterrupted, resumed_state, full_state, sorted(p.name for p in Path(ckpt).iterdir())


def test_checkpoint_at_tp2_resumes_at_pp2(tmp_path):
    results = run_distributed(_save_then_resume_elsewhere, world_size=2, args=(str(tmp_path),),
                              init_process_group=False, timeout=300)
    resumed, uninterrupted, resumed_state, full_state, files = results[0]
    assert ".metadata" in files and "meta.pt" in files
    assert not list(tmp_path.glob("*.incomplete"))
    assert len(resumed) == STEPS_PER_EPOCH and len(uninterrupted) == 2 * STEPS_PER_EPOCH
    # The next steps after the resume equal those of the run that never stopped.
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(uninterrupted[STEPS_PER_EPOCH:]),
                               rtol=1e-5, atol=1e-7)
    for name, value in full_state.items():
        torch.testing.assert_close(resumed_state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_export_loads_into_plain_model(tmp_path):
    results = run_distributed(_fit, world_size=2, args=((2, 1), 1), init_process_group=False, timeout=300)
    state = results[0][1]
    assert results[1][1] is None  # only rank 0 holds the export
    plain = mlp(in_features=FEATURES, hidden=16, depth=3)
    plain.load_state_dict(state)  # strict: same names and shapes as the unsplit model


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "broken.ckpt").mkdir()
    strategy = HybridParallelStrategy()
    with pytest.raises(FileNotFoundError, match="not a complete HybridParallelStrategy checkpoint"):
        strategy.load_checkpoint(tmp_path / "broken.ckpt")
