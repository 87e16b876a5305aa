"""Local SGD and DiLoCo as the data-parallel axis of HybridParallelStrategy (tp=2 or pp=2, dp=2, 4 gloo ranks).

References: the exact hybrid strategy (local SGD with H=1 is data-parallel SGD) and DiLoCoStrategy on two
ranks, whose outer step is checked against a hand computation in tests/test_local_sgd.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_local_sgd import STEPS, _loader, _model  # the same model, data and seed as the standalone tests

from lit_parallel import ConfigurationError, DiLoCo, DiLoCoStrategy, HybridParallelStrategy, LocalSGD
from lit_parallel.callbacks import CommunicationMonitor
from lit_parallel.compression import Int8
from lit_parallel.parallel.data_parallel import local_tensor
from lit_parallel.testing import run_distributed


def _local_vector(module: L.LightningModule) -> torch.Tensor:
    return torch.cat([local_tensor(p.detach()).reshape(-1).clone() for _, p in sorted(module.named_parameters())])


class _Recorder(Callback):
    """This rank's local parameter shards after every optimizer step."""

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.params.append(_local_vector(pl_module))


def _trainer(strategy: Any, devices: int, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=callbacks, **kwargs)


def _fit(strategy: Any, devices: int = 4) -> tuple[list[torch.Tensor], Any, dict[str, torch.Tensor] | None]:
    recorder, monitor = _Recorder(), CommunicationMonitor(log_metrics=False)
    trainer = _trainer(strategy, devices, [recorder, monitor], max_steps=STEPS, enable_checkpointing=False)
    trainer.fit(_model(), train_dataloaders=_loader())
    export = strategy.export_state_dict() if isinstance(strategy, HybridParallelStrategy) else None
    return recorder.params, monitor.totals.bytes_sent, export


def _full_params(strategy: DiLoCoStrategy) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in strategy.lightning_module.model.state_dict().items()}


def _reference(_: Any) -> dict[str, torch.Tensor]:
    strategy = DiLoCoStrategy(sync_every=2, outer_lr=0.7, outer_momentum=0.5)
    trainer = _trainer(strategy, 2, [], max_steps=STEPS, enable_checkpointing=False)
    trainer.fit(_model(), train_dataloaders=_loader())
    return _full_params(strategy)


def _fit_with_checkpoints(make: Any, ckpt_dir: Path, ckpt_path: str | None) -> dict[str, torch.Tensor] | None:
    strategy = make()
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    trainer = _trainer(strategy, 4, [saver], max_epochs=3)
    # 16 samples, 4 per dp rank and step: 2 steps per epoch; H=3 puts the epoch-1 checkpoint (step 4) mid-round.
    trainer.fit(_model(), train_dataloaders=_loader(16), ckpt_path=ckpt_path)
    return strategy.export_state_dict()


def _all_checks(tmp: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["exact"] = _fit(HybridParallelStrategy(tensor_parallel_size=2))
    out["local_h1"] = _fit(HybridParallelStrategy(tensor_parallel_size=2, data_parallel_sync=LocalSGD(sync_every=1)))
    diloco = DiLoCo(sync_every=2, outer_lr=0.7, outer_momentum=0.5)
    out["diloco_tp2"] = _fit(HybridParallelStrategy(tensor_parallel_size=2, data_parallel_sync=diloco))
    out["diloco_pp2"] = _fit(HybridParallelStrategy(pipeline_parallel_size=2, num_microbatches=2,
                                                    data_parallel_sync=diloco))

    def make() -> HybridParallelStrategy:
        return HybridParallelStrategy(tensor_parallel_size=2, gradient_compression=Int8(chunk_size=64),
                                      data_parallel_sync=DiLoCo(sync_every=3, outer_momentum=0.5, overlap=True))

    out["uninterrupted"] = _fit_with_checkpoints(make, Path(tmp) / "run", None)
    out["resumed"] = _fit_with_checkpoints(make, Path(tmp) / "resumed", str(Path(tmp) / "run" / "epoch=1-step=4.ckpt"))
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, Any]]:
    tmp = str(tmp_path_factory.mktemp("hybrid_local_sgd"))
    return run_distributed(_all_checks, world_size=4, args=(tmp,), init_process_group=False, timeout=420)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return run_distributed(_reference, world_size=2, args=(None,), init_process_group=False, timeout=240)[0]


def test_local_sgd_h1_equals_exact_hybrid_step_for_step(results):
    for rank in range(4):
        exact, local = results[rank]["exact"][0], results[rank]["local_h1"][0]
        assert len(exact) == len(local) == STEPS
        for step, (a, b) in enumerate(zip(exact, local, strict=True)):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=f"rank {rank} step {step + 1}")


@pytest.mark.parametrize("run", ["diloco_tp2", "diloco_pp2"])
def test_dp_replicas_equal_after_each_sync_and_differ_between(results, run):
    # Mesh ("pp", "dp", "tp"): with tp=2 ranks 0/2 and 1/3 are dp peers; with pp=2 ranks 0/1 and 2/3.
    peers = [(0, 2), (1, 3)] if run == "diloco_tp2" else [(0, 1), (2, 3)]
    for a, b in peers:
        for step, (pa, pb) in enumerate(zip(results[a][run][0], results[b][run][0], strict=True), start=1):
            if step % 2 == 0:
                assert torch.equal(pa, pb), f"{run}: ranks {a}/{b} differ right after the sync of step {step}"
            else:
                assert not torch.equal(pa, pb), f"{run}: ranks {a}/{b} equal between syncs (step {step})"


@pytest.mark.parametrize("run", ["diloco_tp2", "diloco_pp2"])
def test_diloco_on_the_dp_axis_equals_diloco_strategy(results, reference, run):
    export = results[0][run][2]
    assert export is not None and export.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(export[name], value, rtol=0, atol=1e-6, msg=name)


def test_bytes_fall_with_the_round_length(results):
    # Every step the exact run all-reduces each rank's gradient shard; DiLoCo(H=2) its pseudo-gradient
    # (the same number of elements) every other step.
    for rank in range(4):
        exact, diloco = results[rank]["exact"][1], results[rank]["diloco_tp2"][1]
        assert exact > 0 and diloco * 2 == exact, (rank, exact, diloco)


def test_resume_mid_round_with_overlap_and_compression(results):
    uninterrupted, resumed = results[0]["uninterrupted"], results[0]["resumed"]
    assert uninterrupted is not None and resumed is not None
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: HybridParallelStrategy(data_parallel_sync="bogus"), r"data_parallel_sync='bogus' is invalid; valid"),
        (lambda: LocalSGD(sync_every=0), r"sync_every=0.*integer >= 1"),
        (lambda: DiLoCo(outer_lr=0.0), r"outer_lr=0.0.*> 0"),
        (lambda: DiLoCo(outer_momentum=1.0), r"outer_momentum=1.0.*\[0, 1\)"),
        (lambda: HybridParallelStrategy(data_parallel_sync=DiLoCo(overlap=True), gradient_compression=Int8(),
                                        process_group_backend="mpi"), r"cannot run asynchronously on the 'mpi'"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ConfigurationError, match=match):
        make()


def test_dp_sync_without_data_parallelism_is_refused_before_any_process_group():
    import torch.distributed as dist

    strategy = HybridParallelStrategy(data_parallel_sync="diloco")
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, logger=False, max_steps=1)
    with pytest.raises(ConfigurationError, match=r"needs data parallelism, but dp=1"):
        trainer.fit(_model(), _loader())
    assert not dist.is_initialized()
