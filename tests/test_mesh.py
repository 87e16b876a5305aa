"""ParallelDims validation and HybridParallelStrategy's argument checks (no process group needed)."""

from __future__ import annotations

import lightning as L
import pytest
import torch.distributed as dist

import lit_parallel  # noqa: F401  (registers the strategy names)
from lit_parallel import ConfigurationError, HybridParallelStrategy
from lit_parallel.models import ImageClassifier, mlp
from lit_parallel.parallel.mesh import ParallelDims


def test_resolve_auto_dp():
    assert ParallelDims.resolve(tp=2, pp=2, dp="auto", world_size=8) == ParallelDims(pp=2, dp=2, tp=2, world_size=8)


def test_product_mismatch_names_all_four_numbers():
    with pytest.raises(ConfigurationError, match=r"pp\(2\) \* dp\(2\) \* tp\(2\) = 8 != world_size\(6\)"):
        ParallelDims(pp=2, dp=2, tp=2, world_size=6)


def test_auto_dp_not_divisible():
    with pytest.raises(ConfigurationError, match=r"world_size\(6\) is not divisible by tp\(2\) \* pp\(2\) = 4"):
        ParallelDims.resolve(tp=2, pp=2, dp="auto", world_size=6)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", True])
def test_sizes_must_be_positive_ints(bad):
    with pytest.raises(ConfigurationError, match="tensor_parallel_size"):
        ParallelDims.resolve(tp=bad, pp=1, dp="auto", world_size=2)


def test_coordinates_tp_innermost():
    dims = ParallelDims(pp=2, dp=2, tp=2, world_size=8)
    assert [tuple(dims.coordinates(r)[k] for k in ("pp", "dp", "tp")) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]


def test_sharded_coordinates_split_dp_into_replicate_and_shard():
    dims = ParallelDims(pp=1, dp=4, tp=2, world_size=8, dp_shard=2, sharded=True)
    assert dims.mesh_shape == (1, 2, 2, 2) and dims.dp_replicate == 2
    assert [(dims.coordinates(r)["dp_replicate"], dims.coordinates(r)["dp_shard"]) for r in range(0, 8, 2)] == [
        (0, 0), (0, 1), (1, 0), (1, 1)]
    with pytest.raises(ConfigurationError, match=r"data_parallel_shard_size\(3\) does not divide dp\(4\)"):
        ParallelDims(pp=1, dp=4, tp=1, world_size=4, dp_shard=3)


def test_unknown_schedule_lists_valid_ones():
    with pytest.raises(ConfigurationError, match=r"pipeline_schedule='zigzag' is unknown; valid: \[.*'1f1b'"):
        HybridParallelStrategy(pipeline_parallel_size=2, pipeline_schedule="zigzag")


def test_bad_microbatches():
    with pytest.raises(ConfigurationError, match="num_microbatches=0"):
        HybridParallelStrategy(num_microbatches=0)


def test_registered_presets():
    trainer = L.Trainer(strategy="hybrid_tp2_pp2", accelerator="cpu", devices=4, logger=False)
    assert isinstance(trainer.strategy, HybridParallelStrategy)
    assert (trainer.strategy.tensor_parallel_size, trainer.strategy.pipeline_parallel_size) == (2, 2)


def test_world_size_mismatch_raises_before_process_group():
    module = ImageClassifier(net=mlp(in_features=4, hidden=8, depth=1))
    trainer = L.Trainer(strategy=HybridParallelStrategy(tensor_parallel_size=2, data_parallel_size=2),
                        accelerator="cpu", devices=1, logger=False, max_steps=1)
    with pytest.raises(ConfigurationError, match=r"pp\(1\) \* dp\(2\) \* tp\(2\) = 4 != world_size\(1\)"):
        trainer.fit(module, [])
    assert not dist.is_initialized()


def test_1f1b_needs_a_microbatch_per_stage():
    with pytest.raises(ConfigurationError, match="num_microbatches=1 is below pipeline_parallel_size=2"):
        HybridParallelStrategy(pipeline_parallel_size=2, num_microbatches=1, pipeline_schedule="1f1b")
