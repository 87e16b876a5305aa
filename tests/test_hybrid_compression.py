"""Gradient compression on the data-parallel axis of HybridParallelStrategy."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lit_parallel import ConfigurationError, HybridParallelStrategy
from lit_parallel.callbacks import CommunicationMonitor
from lit_parallel.compression import PowerSGD, TopK
from lit_parallel.models import ImageClassifier, mlp
from lit_parallel.parallel.data_parallel import local_tensor
from lit_parallel.testing import run_distributed

FEATURES, BATCH, STEPS_PER_EPOCH = 16, 8, 3


class _Digest(Callback):
    """A hash of this rank's local parameter shards after every optimizer step."""

    def __init__(self) -> None:
        self.digests: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        h = hashlib.sha256()
        for _, p in sorted(pl_module.model.named_parameters()):
            h.update(local_tensor(p.data).contiguous().numpy().tobytes())
        self.digests.append(h.hexdigest())


def _loader(per_rank_batch: int) -> DataLoader:
    g = torch.Generator().manual_seed(5)
    n = 2 * BATCH * STEPS_PER_EPOCH
    data = TensorDataset(torch.randn(n, FEATURES, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=per_rank_batch, shuffle=True)


class _LaunchedBeforeBackward(Callback):
    """How many dp buckets were already on their way when Lightning's backward began."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.counts.append(len(trainer.strategy._dp.grads._pending))


def _fit(compressor, tp: int, devices: int, epochs: int = 1, ckpt_in=None, ckpt_out=None, overlap: bool = True,
         pp: int = 1, launched: _LaunchedBeforeBackward | None = None):
    L.seed_everything(3, verbose=False)
    module = ImageClassifier(net=mlp(in_features=FEATURES, hidden=64, depth=2), lr=1e-2)
    digest, monitor = _Digest(), CommunicationMonitor(log_metrics=False)
    pipeline = {"pipeline_parallel_size": pp, "num_microbatches": 2} if pp > 1 else {}
    strategy = HybridParallelStrategy(tensor_parallel_size=tp, gradient_compression=compressor,
                                      overlap_grad_sync=overlap, **pipeline)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[digest, monitor, *([launched] if launched else [])])
    trainer.fit(module, _loader(BATCH), ckpt_path=ckpt_in)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    ratio = monitor.totals.bytes_uncompressed / max(1, monitor.totals.bytes_sent)
    return digest.digests, ratio, strategy.export_state_dict()


def _replicas(compressors):
    return [_fit(c, tp=2, devices=4)[:2] for c in compressors]


def test_dp_replicas_bit_identical_with_tp2():
    compressors = [TopK(ratio=0.05), PowerSGD(rank=2), None]
    results = run_distributed(_replicas, world_size=4, args=(compressors,), init_process_group=False, timeout=400)
    for index, compressor in enumerate(compressors):
        per_rank = [results[r][index][0] for r in range(4)]
        # Ranks 0/2 and 1/3 are dp peers holding the same tp shard: bit-identical after every step.
        assert per_rank[0] == per_rank[2] and per_rank[1] == per_rank[3], compressor
        assert per_rank[0] != per_rank[1]  # different shards
        ratio = results[0][index][1]
        assert (ratio > 5) if compressor is not None else ratio == pytest.approx(1.0), (compressor, ratio)


def _overlapped_and_serial(compressors):
    # A fresh copy per run: a compressor carries its memory from one fit into the next.
    return [(_fit(copy.deepcopy(c), tp=2, devices=4, epochs=2)[0],
             _fit(copy.deepcopy(c), tp=2, devices=4, epochs=2, overlap=False)[0]) for c in compressors]


@pytest.mark.slow
def test_overlapped_compressed_dp_sync_equals_the_serial_one_bit_for_bit_with_tp2():
    # Compressed buckets are queued on the exchange thread during backward (while tp's own collectives run);
    # MKL in its reproducible mode, see tests/test_data_parallel.py.
    compressors = [PowerSGD(rank=2), TopK(ratio=0.05)]
    results = run_distributed(_overlapped_and_serial, world_size=4, args=(compressors,), init_process_group=False,
                              timeout=400, env={"MKL_CBWR": "AUTO,STRICT"})
    for rank in range(4):
        for index, compressor in enumerate(compressors):
            overlapped, serial = results[rank][index]
            assert len(overlapped) == 2 * STEPS_PER_EPOCH and overlapped == serial, (rank, compressor)


def _pipeline_overlapped_and_serial(compressors):
    out = []
    for c in compressors:
        overlapped, serial = _LaunchedBeforeBackward(), _LaunchedBeforeBackward()
        a = _fit(copy.deepcopy(c), tp=1, pp=2, devices=4, epochs=2, launched=overlapped)[0]
        b = _fit(copy.deepcopy(c), tp=1, pp=2, devices=4, epochs=2, overlap=False, launched=serial)[0]
        out.append((a, b, overlapped.counts, serial.counts))
    return out


@pytest.mark.slow
def test_pipeline_stages_start_their_dp_exchange_inside_the_schedule():
    compressors = [PowerSGD(rank=2), None]
    results = run_distributed(_pipeline_overlapped_and_serial, world_size=4, args=(compressors,),
                              init_process_group=False, timeout=400, env={"MKL_CBWR": "AUTO,STRICT"})
    for rank in range(4):
        for index, compressor in enumerate(compressors):
            overlapped, serial, launched, not_launched = results[rank][index]
            assert len(overlapped) == 2 * STEPS_PER_EPOCH and overlapped == serial, (rank, compressor)
            # The stage's buckets left during the schedule, before Lightning's backward call; not when serial.
            assert min(launched) >= 1 and set(not_launched) == {0}, (rank, compressor, launched, not_launched)


def _resume(tmp: str):
    ckpt = str(Path(tmp) / "c.ckpt")
    _fit(TopK(ratio=0.05), tp=1, devices=2, epochs=1, ckpt_out=ckpt)
    resumed = _fit(TopK(ratio=0.05), tp=1, devices=2, epochs=2, ckpt_in=ckpt)[2]
    straight = _fit(TopK(ratio=0.05), tp=1, devices=2, epochs=2)[2]
    return resumed, straight


def test_resume_restores_error_feedback(tmp_path):
    resumed, straight = run_distributed(_resume, world_size=2, args=(str(tmp_path),), init_process_group=False,
                                        timeout=300)[0]
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-7, msg=name)


def test_compression_needs_data_parallelism():
    module = ImageClassifier(net=mlp(in_features=4, hidden=8, depth=1))
    trainer = L.Trainer(strategy=HybridParallelStrategy(gradient_compression=TopK(0.1)), accelerator="cpu",
                        devices=1, logger=False, max_steps=1)
    with pytest.raises(ConfigurationError, match="needs data parallelism, but dp=1"):
        trainer.fit(module, [])
