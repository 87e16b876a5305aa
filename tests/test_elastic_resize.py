"""ElasticResume: a checkpoint written on dp ranks resumes on another dp, same global batch, same batches.

The uninterrupted run trains 8 optimizer steps of global batch 8 on 48 samples (6 steps per epoch, so the resumed
part crosses an epoch boundary) and writes a checkpoint at step 4, mid-epoch. The resized run resumes it on
another number of data-parallel ranks; every optimizer step after the checkpoint must train the same samples,
with a loss (mean over micro-batches and ranks) equal to the uninterrupted run's within 1e-5, and end with
parameters equal within 1e-5 (fp32; only the order of float sums differs).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lit_parallel.callbacks import ElasticResume
from lit_parallel.data import ResumableDataLoader, trainer_batch_position
from lit_parallel.data.global_batch import GlobalBatchSampler, global_batch_indices
from lit_parallel.errors import ConfigurationError
from lit_parallel.testing import DistributedRunError, run_distributed

SEED, SAMPLES, GLOBAL_BATCH, MAX_STEPS, CKPT_STEP = 3, 48, 8, 8, 4


class TinyMLP(L.LightningModule):
    """No dropout: the resized run's random streams start afresh, the batches must carry the equality."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        self.seen: list[tuple[int, float, list[int]]] = []  # (global step, micro-batch loss, sample ids)

    def training_step(self, batch, batch_idx):
        x, y, ids = batch
        loss = F.mse_loss(self.net(x), y)
        self.seen.append((self.global_step, loss.item(), ids.tolist()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _loader(batch_size: int, trainer: L.Trainer, stateful: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(SAMPLES, 4, generator=g), torch.randn(SAMPLES, 1, generator=g),
                         torch.arange(SAMPLES))
    if stateful:  # the datamodules' loader: its saved position counts micro-batches, rescaled on a resize
        return ResumableDataLoader(data, batch_size=batch_size, shuffle=True,
                                   position=lambda: trainer_batch_position(trainer))
    return DataLoader(data, batch_size=batch_size, shuffle=True)


def _strategy(tensor_parallel: int, devices: int, compressed: bool = False):
    if compressed:
        from lit_parallel import CompressedDDPStrategy
        from lit_parallel.parallel.compression import PowerSGD

        return CompressedDDPStrategy(compression=PowerSGD(rank=1, warmup_steps=2))
    if tensor_parallel > 1:
        from lit_parallel import HybridParallelStrategy

        return HybridParallelStrategy(tensor_parallel_size=tensor_parallel)
    return "ddp" if devices > 1 else "auto"


def _fit(root: str, batch_size: int, *, tensor_parallel: int = 1, accumulate: int = 1, ckpt_path: str | None = None,
         write_checkpoints: bool = False, max_steps: int = MAX_STEPS, stateful: bool = False, compressed: bool = False,
         **elastic):
    """One fit; returns (full parameters on global rank 0, the micro-batches this rank trained)."""
    L.seed_everything(SEED, verbose=False)
    devices = int(os.environ.get("WORLD_SIZE", 1))
    model = TinyMLP()
    callbacks = [ElasticResume(**elastic)]
    if write_checkpoints:
        callbacks.append(ModelCheckpoint(dirpath=str(Path(root) / "ckpt"), filename="{step}",
                                         every_n_train_steps=2, save_top_k=-1))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=_strategy(tensor_parallel, devices, compressed),
                        max_steps=max_steps, default_root_dir=root, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=write_checkpoints,
                        accumulate_grad_batches=accumulate, callbacks=callbacks)
    trainer.fit(model, _loader(batch_size, trainer, stateful), ckpt_path=ckpt_path)
    if hasattr(trainer.strategy, "export_state_dict"):
        state = trainer.strategy.export_state_dict()
    else:
        state = {k: v.detach().cpu().clone() for k, v in model.net.state_dict().items()}
    return (state if trainer.is_global_zero else None), model.seen


def _steps(ranks_seen: list[list[tuple[int, float, list[int]]]]) -> dict[int, tuple[float, list[int]]]:
    """Per optimizer step: the mean loss over every micro-batch of every rank, and the samples trained.

    Every micro-batch has the same size, so this mean is the loss of the global batch; tensor-parallel peers
    record the same micro-batch, which leaves the mean unchanged.
    """
    losses: dict[int, list[float]] = {}
    samples: dict[int, set[int]] = {}
    for seen in ranks_seen:
        for step, loss, ids in seen:
            losses.setdefault(step, []).append(loss)
            samples.setdefault(step, set()).update(ids)
    return {step: (sum(v) / len(v), sorted(samples[step])) for step, v in losses.items()}


def _assert_resized_run_follows(reference, resumed, checkpoint_step: int = CKPT_STEP) -> None:
    (ref_state, ref_seen), (state, seen) = reference, resumed
    want, got = _steps(ref_seen), _steps(seen)
    assert sorted(want) == list(range(MAX_STEPS))
    assert sorted(got) == list(range(checkpoint_step, MAX_STEPS))
    for step in got:
        assert got[step][1] == want[step][1], f"step {step} trained other samples"
        assert len(got[step][1]) == GLOBAL_BATCH
        assert abs(got[step][0] - want[step][0]) <= 1e-5, (step, got[step][0], want[step][0])
    assert sorted(state) == sorted(ref_state)
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-5, msg=key)


def _run(root: str, batch_size: int, kwargs: dict) -> tuple:
    state, seen = _fit(root, batch_size, **kwargs)
    return state, seen


def _gathered(results: list[tuple]) -> tuple:
    return results[0][0], [seen for _, seen in results]


# -- (e) the data order ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [True, False])
def test_global_batch_order_is_the_same_for_every_data_parallel_size(shuffle):
    """dp in {1, 2, 4} with per-rank batch 2 and accumulation 8 / (2 dp): every optimizer step gets the same
    samples, in the same micro-batch slots (rank r's micro-batch j is slot j * dp + r)."""
    batch, global_batch = 2, 8
    for epoch in (0, 1):
        want = global_batch_indices(SAMPLES, global_batch, seed=SEED, epoch=epoch, shuffle=shuffle)
        for dp in (1, 2, 4):
            accumulate = global_batch // (batch * dp)
            slots: dict[int, list[list[int]]] = {}
            for rank in range(dp):
                sampler = GlobalBatchSampler(SAMPLES, batch, dp, rank, accumulate, seed=SEED, shuffle=shuffle)
                sampler.set_epoch(epoch)
                micro = list(sampler)
                assert len(micro) == len(sampler) == SAMPLES // global_batch * accumulate
                for i, indices in enumerate(micro):
                    step, j = divmod(i, accumulate)
                    slots.setdefault(step, [[]] * (global_batch // batch))[j * dp + rank] = indices
            assert [[i for slot in slots[s] for i in slot] for s in sorted(slots)] == want, (dp, epoch)
    # The epoch's permutation is DistributedSampler's (seed + epoch), cut into consecutive global batches.
    perm = list(DistributedSampler(range(SAMPLES), num_replicas=1, rank=0, seed=SEED, shuffle=shuffle))
    assert [i for step in global_batch_indices(SAMPLES, 8, seed=SEED, epoch=0, shuffle=shuffle) for i in step] == perm


def test_sampler_refuses_bad_sizes():
    with pytest.raises(ValueError, match=r"rank=2; valid: 0 <= rank < data_parallel_size \(2\)"):
        GlobalBatchSampler(8, 2, 2, 2)
    with pytest.raises(ValueError, match=r"batch_size=0; valid: a positive integer"):
        GlobalBatchSampler(8, 0, 2, 0)


# -- (d) bad input ---------------------------------------------------------------------------------------------
def _elastic(record: dict[str, int] | None, configured_accumulation: int = 1, **kwargs) -> ElasticResume:
    callback = ElasticResume(**kwargs)
    callback._record, callback._configured_accumulation = record, configured_accumulation
    return callback


def test_resize_to_a_data_parallel_size_that_does_not_divide_the_global_batch_is_refused_with_the_numbers():
    written_on_3 = {"global_batch_size": 12, "per_rank_batch_size": 4, "data_parallel_size": 3,
                    "accumulate_grad_batches": 1}
    assert _elastic(written_on_3)._accumulation(4, 1) == 3
    assert _elastic(written_on_3)._accumulation(4, 3) == 1
    with pytest.raises(ConfigurationError, match=r"Global batch 12 cannot be split over dp=2 ranks with per-rank "
                                                 r"batch 4: it is not a multiple of 4 x 2 = 8"):
        _elastic(written_on_3)._accumulation(4, 2)
    with pytest.raises(ConfigurationError, match=r"Global batch 10 cannot be split over dp=4"):
        _elastic(None, global_batch_size=10)._accumulation(1, 4)


def test_checkpoint_with_another_global_batch_is_refused_saying_both_and_how_to_override(tmp_path):
    # Written by one process with per-rank batch 4 (global batch 4); resumed with per-rank batch 8.
    _fit(str(tmp_path / "ref"), 4, write_checkpoints=True, max_steps=2)
    checkpoint = str(tmp_path / "ref" / "ckpt" / "step=2.ckpt")
    assert torch.load(checkpoint, weights_only=True)["elastic"] == {
        "global_batch_size": 4, "per_rank_batch_size": 4, "data_parallel_size": 1, "accumulate_grad_batches": 1}
    with pytest.raises(ConfigurationError, match=r"global batch 4 \(per-rank batch 4 x dp 1 x accumulate_grad_batches"
                                                 r" 1\); this run is configured for 8 \(per-rank batch 8 x dp 1 .*"
                                                 r"ElasticResume\(global_batch_size=4\).*allow_global_batch_change"):
        _fit(str(tmp_path / "bad"), 8, ckpt_path=checkpoint, max_steps=4)
    with pytest.raises(ConfigurationError, match=r"configured for 16 .*global_batch_size=16"):
        _fit(str(tmp_path / "bad2"), 4, ckpt_path=checkpoint, max_steps=4, global_batch_size=16)
    with pytest.warns(UserWarning, match=r"Continuing with global batch 8 instead of the checkpoint's 4"):
        _, seen = _fit(str(tmp_path / "changed"), 8, ckpt_path=checkpoint, max_steps=4, allow_global_batch_change=True)
    assert [step for step, _, ids in seen] == [2, 3] and all(len(ids) == 8 for _, _, ids in seen)
    # global_batch_size=4 keeps the checkpoint's global batch with per-rank batch 2: accumulation 2.
    _, seen = _fit(str(tmp_path / "kept"), 2, ckpt_path=checkpoint, max_steps=4, global_batch_size=4)
    assert [step for step, _, _ in seen] == [2, 2, 3, 3]


def test_checkpoint_without_a_global_batch_record_is_resumed_with_a_warning(tmp_path):
    _fit(str(tmp_path / "ref"), 4, write_checkpoints=True, max_steps=2)
    checkpoint = torch.load(tmp_path / "ref" / "ckpt" / "step=2.ckpt", weights_only=True)
    del checkpoint["elastic"]  # as written by ExactResume alone
    torch.save(checkpoint, tmp_path / "plain.ckpt")
    with pytest.warns(UserWarning, match=r"holds no global batch \(it was written without ElasticResume\): this run "
                                         r"trains global batches of 4"):
        _, seen = _fit(str(tmp_path / "resumed"), 4, ckpt_path=str(tmp_path / "plain.ckpt"), max_steps=3)
    assert [step for step, _, _ in seen] == [2]


def test_bad_global_batch_size_is_refused():
    with pytest.raises(ConfigurationError, match=r"global_batch_size=0; valid: a positive integer"):
        ElasticResume(global_batch_size=0)


# -- ExactResume's guarantees hold on the same dp ---------------------------------------------------------------
def test_same_layout_resumes_bitwise_from_mid_epoch_and_epoch_end(tmp_path):
    """One process, global batch 8: step 4 is mid-epoch, step 6 the end of epoch 0."""
    ref_state, ref_seen = _fit(str(tmp_path / "ref"), GLOBAL_BATCH, write_checkpoints=True)
    for step in (4, 6):
        state, seen = _fit(str(tmp_path / f"resumed{step}"), GLOBAL_BATCH,
                           ckpt_path=str(tmp_path / "ref" / "ckpt" / f"step={step}.ckpt"))
        assert seen == ref_seen[step:]
        for key, value in ref_state.items():
            assert torch.equal(state[key], value), (step, key)


def test_order_survives_dataloaders_reloaded_every_epoch(tmp_path):
    """``reload_dataloaders_every_n_epochs=1`` builds new loaders at each epoch: they get the sampler again."""
    L.seed_everything(SEED, verbose=False)
    model = _Reloading()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=MAX_STEPS, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, accumulate_grad_batches=2,
                        reload_dataloaders_every_n_epochs=1, callbacks=[ElasticResume()],
                        default_root_dir=str(tmp_path))
    trainer.fit(model)
    assert model.loaders_built == 2
    want = [s for epoch in (0, 1) for s in global_batch_indices(SAMPLES, 8, seed=SEED, epoch=epoch)][:MAX_STEPS]
    got = _steps([model.seen])
    assert [got[step][1] for step in range(MAX_STEPS)] == [sorted(s) for s in want]


class _Reloading(TinyMLP):
    def __init__(self) -> None:
        super().__init__()
        self.loaders_built = 0

    def train_dataloader(self):
        self.loaders_built += 1
        return _loader(4, self.trainer)


# -- (a)-(c) resized runs --------------------------------------------------------------------------------------
def _reference(tmp_path: Path, world_size: int, batch_size: int, **kwargs) -> tuple:
    results = run_distributed(_run, world_size=world_size, init_process_group=False, timeout=300,
                              args=(str(tmp_path / "ref"), batch_size, {"write_checkpoints": True, **kwargs}))
    return _gathered(results)


@pytest.mark.slow
@pytest.mark.parametrize("stateful", [False, True], ids=["DataLoader", "ResumableDataLoader"])
def test_ddp_dp2_checkpoint_resumes_on_one_process_with_accumulation_2(tmp_path, stateful):
    """Step 4 is mid-epoch; step 6 the end of epoch 0 (ExactResume's epoch-end rewrite, then the rescale)."""
    reference = _reference(tmp_path, 2, GLOBAL_BATCH // 2, stateful=stateful)
    for step in (CKPT_STEP, 6):
        with pytest.warns(UserWarning, match="random state of 2 ranks, this run has 1"):
            state, seen = _fit(str(tmp_path / f"dp1_{step}"), GLOBAL_BATCH // 2, stateful=stateful,
                               ckpt_path=str(tmp_path / "ref" / "ckpt" / f"step={step}.ckpt"))
        assert [s for s, _, _ in seen] == [s for s in range(step, MAX_STEPS) for _ in range(2)]
        _assert_resized_run_follows(reference, (state, [seen]), step)


@pytest.mark.slow
def test_ddp_dp2_checkpoint_resumes_on_four_ranks_with_less_accumulation(tmp_path):
    """dp=2 × accumulation 2 (per-rank batch 2) → dp=4 × accumulation 1."""
    reference = _reference(tmp_path, 2, 2, accumulate=2)
    checkpoint = str(tmp_path / "ref" / "ckpt" / f"step={CKPT_STEP}.ckpt")
    resumed = _gathered(run_distributed(_run, world_size=4, init_process_group=False, timeout=300,
                                        args=(str(tmp_path / "dp4"), 2, {"accumulate": 2, "ckpt_path": checkpoint})))
    assert all([step for step, _, _ in seen] == list(range(CKPT_STEP, MAX_STEPS)) for seen in resumed[1])
    _assert_resized_run_follows(reference, resumed)


@pytest.mark.slow
def test_hybrid_tp2_dp2_checkpoint_resumes_on_tp2_dp1(tmp_path):
    reference = _reference(tmp_path, 4, GLOBAL_BATCH // 2, tensor_parallel=2)
    checkpoint = str(tmp_path / "ref" / "ckpt" / f"step={CKPT_STEP}.ckpt")
    resumed = _gathered(run_distributed(_run, world_size=2, init_process_group=False, timeout=300,
                                        args=(str(tmp_path / "tp2dp1"), GLOBAL_BATCH // 2,
                                              {"tensor_parallel": 2, "ckpt_path": checkpoint})))
    _assert_resized_run_follows(reference, resumed)


@pytest.mark.slow
@pytest.mark.slow
def test_compressed_ddp_dp2_checkpoint_resumes_on_four_ranks_with_fresh_compression_memory(tmp_path):
    """PowerSGD's per-rank error feedback cannot be split: it starts afresh (a warning says so); the resized run
    still trains the same samples in every step (its losses differ: compression is lossy). Compression needs two
    ranks, so the resize goes up: dp=2 × accumulation 2 → dp=4."""
    _, ref_seen = _reference(tmp_path, 2, 2, accumulate=2, compressed=True)
    checkpoint = str(tmp_path / "ref" / "ckpt" / f"step={CKPT_STEP}.ckpt")
    results = run_distributed(_run_warned, world_size=4, init_process_group=False, timeout=300,
                              args=(str(tmp_path / "dp4"), 2, {"accumulate": 2, "compressed": True,
                                                               "ckpt_path": checkpoint}))
    assert any(re.search(r"holds compression state of 2 ranks but the run has world_size=4; PowerSGD.* starts "
                         r"afresh", warning) for warning in results[0][2])
    want, got = _steps(ref_seen), _steps([seen for _, seen, _ in results])
    assert sorted(got) == list(range(CKPT_STEP, MAX_STEPS))
    assert all(got[step][1] == want[step][1] for step in got)


def _run_warned(root: str, batch_size: int, kwargs: dict) -> tuple:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, seen = _fit(root, batch_size, **kwargs)
    return state, seen, [str(w.message) for w in caught]


@pytest.mark.slow
def test_resize_errors_reach_the_caller_of_a_distributed_run(tmp_path):
    """The refusal is raised identically on every rank (no hang) and names the numbers."""
    _fit(str(tmp_path / "ref"), 4, write_checkpoints=True, max_steps=2, global_batch_size=12, accumulate=1)
    with pytest.raises(DistributedRunError, match=r"Global batch 12 cannot be split over dp=2 ranks with per-rank batch 4"):
        run_distributed(_run, world_size=2, init_process_group=False, timeout=300,
                        args=(str(tmp_path / "dp2"), 4, {"ckpt_path": str(tmp_path / "ref" / "ckpt" / "step=2.ckpt"),
                                                       "global_batch_size": 12}))
