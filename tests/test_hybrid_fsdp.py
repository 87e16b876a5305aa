"""A sharded data-parallel axis (ZeRO 1-3 with FSDP2, HSDP) and activation checkpointing train exactly like one
process: per-step loss within 1e-5 relative and final exported parameters within 1e-5, fp32, AdamW, 5 steps.

Layouts are ``(tp, pp, dp, zero_stage, dp_shard, activation_checkpointing)``; the single-process reference
replays the same global batches (``global_batch_order``) from the same seed.
"""

from __future__ import annotations

import lightning as L
import pytest
from test_hybrid_equivalence import SEED, _build, _check, _LossRecorder, _trainer
from torch.utils.data import DataLoader

from lit_parallel import ConfigurationError, HybridParallelStrategy
from lit_parallel.testing import run_distributed

GLOBAL_BATCH = 8


def _fit(family: str, layouts: list[tuple], microbatches: int = 2) -> list:
    out = []
    for tp, pp, dp, zero, shard, ac in layouts:
        L.seed_everything(SEED, verbose=False)
        module, data = _build(family)
        recorder = _LossRecorder()
        strategy = HybridParallelStrategy(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp,
                                          num_microbatches=microbatches, zero_stage=zero,
                                          data_parallel_shard_size=shard, activation_checkpointing=ac)
        _trainer(tp * pp * dp, strategy, recorder).fit(module, DataLoader(data, batch_size=GLOBAL_BATCH // dp,
                                                                          shuffle=True))
        out.append((recorder.losses, strategy.export_state_dict(), _sharded_fraction(strategy)))
    return out


def _sharded_fraction(strategy: HybridParallelStrategy) -> float:
    """This rank's share of the parameter elements (1 / (tp * pp * dp_shard) for an evenly sharded model)."""
    from lit_parallel.parallel.mesh import local_tensor

    local = sum(local_tensor(p).numel() for p in strategy.lightning_module.parameters())
    full = sum(p.numel() for p in strategy.lightning_module.parameters())
    return local / full


def _run(family: str, layouts: list[tuple], world: int) -> list:
    results = run_distributed(_fit, world_size=world, args=(family, layouts), init_process_group=False, timeout=480)
    _check(family, [(tp, pp, dp) for tp, pp, dp, *_ in layouts], [[r[:2] for r in rank] for rank in results])
    return results


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mlp", "gpt2", "llama_odd_heads"])
def test_zero_stages_dp2_match_single_process(family):
    layouts = [(1, 1, 2, 1, "auto", "none"), (1, 1, 2, 2, "auto", "none"), (1, 1, 2, 3, "auto", "full"),
               (1, 1, 2, 3, "auto", "none")]
    results = _run(family, layouts, 2)
    # zero 3 holds half of each (evenly divisible) parameter on each rank
    assert results[0][2][2] < 0.6 and results[0][3][2] < 0.6


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mlp", "gpt2", "llama_odd_heads"])
def test_fsdp_with_tp_pp_hsdp_match_single_process(family):
    layouts = [(2, 1, 2, 3, "auto", "none"), (1, 2, 2, 3, "auto", "selective"), (1, 1, 4, 3, 2, "full"),
               (1, 2, 2, 2, "auto", "none")]
    _run(family, layouts, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"zero_stage": 4}, "zero_stage=4 is invalid; valid: 0, 1, 2 or 3"),
        ({"zero_stage": 0, "data_parallel_shard_size": 2}, "data_parallel_shard_size=2 shards nothing"),
        ({"zero_stage": 3, "data_parallel_size": 4, "data_parallel_shard_size": 3},
         "data_parallel_shard_size=3 does not divide the data-parallel size dp=4"),
        ({"activation_checkpointing": "some"}, "activation_checkpointing='some' is invalid"),
        ({"zero_stage": 3, "data_parallel_sync": "diloco"}, "zero_stage=3 with data_parallel_sync=DiLoCo"),
        ({"zero_stage": 2, "gradient_compression": "powersgd"}, "zero_stage=2 with gradient_compression=PowerSGD"),
    ],
)
def test_bad_sharding_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        HybridParallelStrategy(**kwargs)


def test_presets_registered():
    from lightning.pytorch.strategies import StrategyRegistry

    import lit_parallel  # noqa: F401  (registers the presets)

    for name, stage, tp, pp in [("hybrid_fsdp", 3, 1, 1), ("hybrid_tp2_fsdp", 3, 2, 1), ("hybrid_pp2_fsdp", 3, 1, 2)]:
        strategy = StrategyRegistry.get(name)
        assert (strategy.zero_stage, strategy.tensor_parallel_size, strategy.pipeline_parallel_size) == (stage, tp, pp)


def _fit_bad_shard_size() -> None:
    module, data = _build("mlp")
    strategy = HybridParallelStrategy(zero_stage=2, data_parallel_shard_size=3)
    L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False,
              enable_checkpointing=False).fit(module, DataLoader(data, batch_size=4))


def test_shard_size_not_dividing_world_dp_is_refused_at_setup():
    with pytest.raises(Exception, match=r"data_parallel_shard_size=3 does not divide the data-parallel size dp=2"):
        run_distributed(_fit_bad_shard_size, world_size=2, init_process_group=False, timeout=120)
