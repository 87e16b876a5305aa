"""LocalSGDStrategy and DiLoCoStrategy on 2 gloo ranks: DDP equivalence at H=1, sync/divergence pattern,
the DiLoCo outer step and its one-round-late overlapped variant against hand-computed references, byte
accounting, exact resume of outer and per-rank state, and bad input.

Every distributed check runs inside one ``run_distributed`` call (spawning ranks dominates the cost).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lit_parallel import DiLoCoStrategy, LocalSGDStrategy
from lit_parallel.callbacks import CommunicationMonitor
from lit_parallel.compression import Int8
from lit_parallel.errors import ConfigurationError
from lit_parallel.models import ImageClassifier, mlp
from lit_parallel.parallel.local_sgd import DiLoCoState
from lit_parallel.testing import run_distributed

SEED, STEPS, LOCAL_BATCH, IN_FEATURES = 5, 6, 4, 12


def _loader(samples: int = STEPS * LOCAL_BATCH * 2) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(samples, IN_FEATURES, generator=g), torch.randint(0, 10, (samples,), generator=g))
    return DataLoader(data, batch_size=LOCAL_BATCH, shuffle=True)


def _model() -> ImageClassifier:
    L.seed_everything(SEED, verbose=False)
    # Plain SGD with momentum: its update is linear in the gradient, so see test_local_sgd_h1_equals_ddp.
    return ImageClassifier(net=mlp(in_features=IN_FEATURES, hidden=16, depth=1), optimizer="sgd", lr=0.05)


def _vector(model: L.LightningModule) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


class _Recorder(Callback):
    """This rank's parameters after every optimizer step."""

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.params.append(_vector(pl_module))


def _fit(strategy: Any, steps: int = STEPS, callbacks: list[Callback] | None = None) -> L.Trainer:
    model = _model()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks or [],
    )
    trainer.fit(model, train_dataloaders=_loader())
    return trainer


def _trajectory(strategy: Any) -> list[torch.Tensor]:
    recorder = _Recorder()
    _fit(strategy, callbacks=[recorder])
    return recorder.params


# -- pure torch: the outer step by hand --------------------------------------------------------------
def _outer_rounds(overlap: bool) -> list[torch.Tensor]:
    """Global parameters after each of 3 rounds where rank r's local progress is ``-(r + 1) * round``."""
    start = torch.tensor([1.0, -2.0])
    params = [start.clone()]
    state = DiLoCoState(params, sync_every=1, outer_lr=0.5, outer_momentum=0.9, nesterov=True, overlap=overlap)
    history = []
    for k in range(1, 4):
        params[0] -= (dist.get_rank() + 1) * k  # this round's inner progress
        state.step(params)
        assert torch.equal(params[0], state.global_params[0])  # every replica restarts from global
        history.append(state.global_params[0].clone())
    state.close()
    return history


def _expected_outer_rounds(overlap: bool) -> list[torch.Tensor]:
    # Averaged pseudo-gradient of round k: mean over ranks of (r + 1) * k = 1.5 * k.
    lr, mu = 0.5, 0.9
    theta, m, history = torch.tensor([1.0, -2.0]), torch.zeros(2), []
    deltas = [torch.full((2,), 1.5 * k) for k in (1, 2, 3)]
    applied = [None, deltas[0], deltas[1]] if overlap else deltas
    for d in applied:
        if d is not None:
            m = mu * m + d
            theta = theta - lr * (d + mu * m)
        history.append(theta.clone())
    return history


def _fit_with_checkpoints(strategy: Any, ckpt_dir: Path, ckpt_path: str | None) -> tuple[torch.Tensor, Any]:
    model = _model()
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=3, logger=False, callbacks=[saver],
        enable_progress_bar=False, enable_model_summary=False,
    )
    # 16 samples, 4 per rank and step: 2 steps per epoch; H=3 puts the epoch-1 checkpoint (step 4) mid-round.
    trainer.fit(model, train_dataloaders=_loader(16), ckpt_path=ckpt_path)
    return _vector(model), trainer.strategy._state.state_dict()


def _resume(tmp: str, name: str, make: Any) -> bool:
    uninterrupted, outer = _fit_with_checkpoints(make(), Path(tmp) / name, None)
    resumed, resumed_outer = _fit_with_checkpoints(make(), Path(tmp) / f"{name}_resumed",
                                                   str(Path(tmp) / name / "epoch=1-step=4.ckpt"))
    same_outer = all(torch.equal(a, b) for a, b in zip(outer["global_params"], resumed_outer["global_params"],
                                                        strict=True))
    return torch.equal(uninterrupted, resumed) and same_outer and outer["rounds"] == resumed_outer["rounds"] == 2


def _all_checks(tmp: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["outer"] = [_outer_rounds(overlap) for overlap in (False, True)]
    out["ddp"] = _trajectory("ddp")
    out["local_h1"] = _trajectory(LocalSGDStrategy(sync_every=1))
    out["local_h3"] = _trajectory(LocalSGDStrategy(sync_every=3))
    monitor = CommunicationMonitor(log_metrics=False)
    recorder = _Recorder()
    _fit(DiLoCoStrategy(sync_every=2), callbacks=[monitor, recorder])
    out["diloco"] = recorder.params
    out["diloco_bytes"] = (monitor.steps, monitor.totals.bytes_sent)
    out["registered"] = type(_fit("diloco", steps=1).strategy).__name__
    out["resume_exact"] = _resume(tmp, "exact", lambda: DiLoCoStrategy(sync_every=3))
    out["resume_overlap_int8"] = _resume(
        tmp, "overlap", lambda: DiLoCoStrategy(sync_every=3, overlap=True, compression=Int8(chunk_size=64))
    )
    return out


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        return run_distributed(_all_checks, world_size=2, args=(tmp,), timeout=240)


def test_diloco_outer_step_matches_hand_computed_reference(results):
    """Round k: averaged pseudo-gradient 1.5k; Nesterov: m = 0.9 m + d, global -= 0.5 (d + 0.9 m)."""
    for rank in results:
        plain, overlapped = rank["outer"]
        for got, want in zip(plain, _expected_outer_rounds(overlap=False), strict=True):
            torch.testing.assert_close(got, want)
        # Overlap: nothing is applied at the end of round 1; round k applies round k-1's average.
        for got, want in zip(overlapped, _expected_outer_rounds(overlap=True), strict=True):
            torch.testing.assert_close(got, want)


def test_local_sgd_h1_equals_ddp(results):
    """With identical parameters before every step, SGD's update (momentum included) is linear in the
    gradient, and each rank's momentum buffer is a linear function of its own gradients. So the mean of
    the replicas' parameters after a local step equals the parameters after a step with the mean gradient
    (DDP), and by induction the mean of the momentum buffers is DDP's buffer. The trajectories agree up to
    float rounding (averaging parameters rounds differently from averaging gradients). Adam would not:
    its update is not linear in the gradient."""
    for rank in results:
        for step, (local, ddp) in enumerate(zip(rank["local_h1"], rank["ddp"], strict=True)):
            torch.testing.assert_close(local, ddp, rtol=1e-5, atol=1e-6, msg=f"step {step + 1}")


def test_replicas_identical_after_each_sync_and_different_between(results):
    for key, every in (("local_h3", 3), ("diloco", 2)):
        for step in range(STEPS):
            a, b = results[0][key][step], results[1][key][step]
            synced = (step + 1) % every == 0
            assert torch.equal(a, b) is synced, f"{key} step {step + 1}: synced={synced}"


def test_diloco_pseudo_gradient_bytes_counted(results):
    numel = results[0]["diloco"][0].numel()
    steps, sent = results[0]["diloco_bytes"]
    assert steps == STEPS // 2  # one exchange per round
    assert sent == STEPS // 2 * numel * 4  # fp32 pseudo-gradient, H=2 times fewer bytes than DDP


def test_registered_name(results):
    assert results[0]["registered"] == "DiLoCoStrategy"


def test_resume_restores_outer_and_per_rank_state(results):
    for rank in results:
        assert rank["resume_exact"] is True
        assert rank["resume_overlap_int8"] is True


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LocalSGDStrategy(sync_every=0), "sync_every"),
        (lambda: LocalSGDStrategy(sync_every=True), "sync_every"),
        (lambda: DiLoCoStrategy(sync_every=-1), "sync_every"),
        (lambda: DiLoCoStrategy(outer_lr=0.0), "outer_lr"),
        (lambda: DiLoCoStrategy(outer_lr=-0.7), "outer_lr"),
        (lambda: DiLoCoStrategy(outer_momentum=1.0), "outer_momentum"),
        (lambda: DiLoCoStrategy(compression="zip"), "unknown"),
        (lambda: DiLoCoStrategy(overlap=True, compression=Int8(), process_group_backend="mpi"),
         "cannot run asynchronously"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ConfigurationError, match=match):
        make()
