"""The replicate axis of a sharded dp axis (zero_stage 3, dp = 2 replicas x 2 shards, 4 gloo ranks) run by the
package instead of FSDP2's HSDP all-reduce: a compressed exchange from FSDP2's all-reduce hook, and local SGD /
DiLoCo rounds on each rank's FSDP2 shards (fault-tolerant HSDP + DiLoCo).

References: FSDP2's own HSDP (exact averaging every step). Local SGD with H=1 and plain SGD is data-parallel SGD;
the exact compressor through the hook is the same average; replicas (ranks 0/2 and 1/3 hold the same shard)
are bitwise equal right after each DiLoCo round and differ between; resume mid-round is exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_hybrid_local_sgd import _Recorder, _trainer
from test_local_sgd import LOCAL_BATCH, STEPS, _loader, _model

from lit_parallel import ConfigurationError, DiLoCo, HybridParallelStrategy, LocalSGD
from lit_parallel.callbacks import CommunicationMonitor
from lit_parallel.compression import Int8, PowerSGD
from lit_parallel.testing import run_distributed

SHARDED = {"data_parallel_size": 4, "zero_stage": 3, "data_parallel_shard_size": 2}
PEERS = [(0, 2), (1, 3)]  # mesh (pp, dp_replicate, dp_shard, tp) = (1, 2, 2, 1): rank = 2 * replica + shard


def _fit(strategy: HybridParallelStrategy) -> tuple[list[torch.Tensor], int, dict | None]:
    recorder, monitor = _Recorder(), CommunicationMonitor(log_metrics=False)
    trainer = _trainer(strategy, 4, [recorder, monitor], max_steps=STEPS, enable_checkpointing=False)
    trainer.fit(_model(), train_dataloaders=_loader(STEPS * LOCAL_BATCH * 4))
    return recorder.params, monitor.totals.bytes_sent, strategy.export_state_dict()


def _fit_with_checkpoints(ckpt_dir: Path, ckpt_path: str | None) -> dict | None:
    strategy = HybridParallelStrategy(**SHARDED, data_parallel_sync=DiLoCo(sync_every=3, outer_momentum=0.5))
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    trainer = _trainer(strategy, 4, [saver], max_epochs=3)
    # 32 samples, 4 per dp rank and step: 2 steps per epoch; H=3 puts the epoch-1 checkpoint (step 4) mid-round.
    trainer.fit(_model(), train_dataloaders=_loader(32), ckpt_path=ckpt_path)
    return strategy.export_state_dict()


def _all_checks(tmp: str) -> dict[str, Any]:
    return {
        "hsdp": _fit(HybridParallelStrategy(**SHARDED)),
        "local_h1": _fit(HybridParallelStrategy(**SHARDED, data_parallel_sync=LocalSGD(sync_every=1))),
        "exact_hook": _fit(HybridParallelStrategy(**SHARDED, gradient_compression="none")),
        "int8": _fit(HybridParallelStrategy(**SHARDED, gradient_compression=Int8(chunk_size=64))),
        "powersgd": _fit(HybridParallelStrategy(**SHARDED, gradient_compression=PowerSGD(rank=1, warmup_steps=0))),
        "diloco": _fit(HybridParallelStrategy(**SHARDED, data_parallel_sync=DiLoCo(sync_every=2, outer_momentum=0.5))),
        "uninterrupted": _fit_with_checkpoints(Path(tmp) / "run", None),
        "resumed": _fit_with_checkpoints(Path(tmp) / "resumed", str(Path(tmp) / "run" / "epoch=1-step=4.ckpt")),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, Any]]:
    tmp = str(tmp_path_factory.mktemp("fsdp_replicate"))
    return run_distributed(_all_checks, world_size=4, args=(tmp,), init_process_group=False, timeout=480)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["local_h1", "exact_hook"])
def test_replicate_axis_of_ours_equals_fsdp2_hsdp(results, run):
    for rank in range(4):
        reference, ours = results[rank]["hsdp"][0], results[rank][run][0]
        assert len(reference) == len(ours) == STEPS
        for step, (a, b) in enumerate(zip(reference, ours, strict=True), start=1):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=f"{run}: rank {rank} step {step}")


@pytest.mark.slow
def test_compressed_replicate_axis_trains_with_fewer_bytes(results):
    for rank in range(4):
        exact_bytes = results[rank]["exact_hook"][1]
        int8_bytes, powersgd_bytes = results[rank]["int8"][1], results[rank]["powersgd"][1]
        assert 0 < int8_bytes < exact_bytes / 2, (rank, exact_bytes, int8_bytes)
        # PowerSGD sees each parameter's gradient shard as a matrix (not the unit's flat buffer): it compresses
        assert 0 < powersgd_bytes < exact_bytes / 2, (rank, exact_bytes, powersgd_bytes)
    for run in ("int8", "powersgd"):
        for a, b in PEERS:  # replicas of the same shard stay bitwise equal (the guard also checks every step)
            assert torch.equal(results[a][run][0][-1], results[b][run][0][-1]), run
        first, last = results[0][run][0][0], results[0][run][0][-1]
        assert not torch.equal(first, last), run


@pytest.mark.slow
def test_diloco_rounds_over_replicas_of_fsdp2_shards(results):
    for a, b in PEERS:
        for step, (pa, pb) in enumerate(zip(results[a]["diloco"][0], results[b]["diloco"][0], strict=True), start=1):
            if step % 2 == 0:
                assert torch.equal(pa, pb), f"ranks {a}/{b} differ right after the round of step {step}"
            else:
                assert not torch.equal(pa, pb), f"ranks {a}/{b} equal between rounds (step {step})"
    # the shards of one replica are different pieces (FSDP2 shards within the replica)
    assert results[0]["diloco"][0][0].numel() == results[1]["diloco"][0][0].numel()
    assert not torch.equal(results[0]["diloco"][0][-1], results[1]["diloco"][0][-1])


@pytest.mark.slow
def test_resume_mid_round_with_fsdp2_shards(results):
    uninterrupted, resumed = results[0]["uninterrupted"], results[0]["resumed"]
    assert uninterrupted is not None and resumed is not None
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name


def _one_replica() -> None:
    strategy = HybridParallelStrategy(data_parallel_size=2, zero_stage=3, data_parallel_sync="diloco")
    L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False,
              enable_checkpointing=False).fit(_model(), train_dataloaders=_loader())


def test_replicate_axis_options_need_replicas():
    with pytest.raises(Exception, match=r"acts on the replicate axis, but dp=2 is 1 replica x 2 shards"):
        run_distributed(_one_replica, world_size=2, init_process_group=False, timeout=120)


def test_zero1_with_rounds_is_refused():
    with pytest.raises(ConfigurationError, match=r"zero_stage=1 with data_parallel_sync=LocalSGD"):
        HybridParallelStrategy(zero_stage=1, data_parallel_sync="local_sgd")
