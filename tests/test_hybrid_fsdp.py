"""A sharded data-parallel axis (ZeRO 1-3 with FSDP2, HSDP) and activation checkpointing train exactly like one
process: per-step loss within 1e-5 relative and final exported parameters within 1e-5, fp32, AdamW, 5 steps.

Layouts are ``(tp, pp, dp, zero_stage, dp_shard, activation_checkpointing)``; the single-process reference
replays the same global batches (``global_batch_order``) from the same seed.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
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
        out.append((recorder.losses, strategy.export_state_dict(), _sharded_fraction(strategy),
                    _optimizer_state_fraction(strategy)))
    return out


def _sharded_fraction(strategy: HybridParallelStrategy) -> float:
    """This rank's share of the parameter elements (1 / (tp * pp * dp_shard) for an evenly sharded model)."""
    from lit_parallel.parallel.mesh import local_tensor

    local = sum(local_tensor(p).numel() for p in strategy.lightning_module.parameters())
    full = sum(p.numel() for p in strategy.lightning_module.parameters())
    return local / full


def _optimizer_state_fraction(strategy: HybridParallelStrategy) -> float:
    """This rank's AdamW moments as a share of two moments for every parameter element of the model."""
    from lit_parallel.parallel.mesh import local_tensor

    optimizer = strategy.optimizers[0]
    held = sum(local_tensor(v).numel() for state in optimizer.state.values()
               for k, v in state.items() if k in ("exp_avg", "exp_avg_sq"))
    return held / (2 * sum(p.numel() for p in strategy.lightning_module.parameters()))


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
    for rank_results in results:
        params = [r[2] for r in rank_results]
        states = [r[3] for r in rank_results]
        # every stage keeps about half of the AdamW moments; zero 1 keeps whole parameters, FSDP2 (zero 2 and 3)
        # keeps parameters sharded at rest (zero 2 gathers them once per step, zero 3 again for backward)
        assert params[0] == 1.0 and all(f < 0.6 for f in params[1:]), params
        assert all(0.2 < f < 0.8 for f in states), states


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mlp", "gpt2", "llama_odd_heads"])
def test_fsdp_with_tp_pp_hsdp_match_single_process(family):
    layouts = [(2, 1, 2, 3, "auto", "none"), (1, 2, 2, 3, "auto", "selective"), (1, 1, 4, 3, 2, "full"),
               (1, 2, 2, 2, "auto", "none"), (2, 1, 2, 1, "auto", "none")]
    results = _run(family, layouts, 4)
    for rank_results in results:
        # FSDP2 shards over dp_shard=2 on top of tp / pp: each rank holds at most ~1/2 of the parameters
        assert all(r[2] < 0.6 for r in rank_results[:4]), [r[2] for r in rank_results]
        # zero 1 at tp2 x dp2: whole tp shards of the parameters, about half of their AdamW moments
        params, states = rank_results[4][2:4]
        assert states < 0.75 * params, (params, states)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"zero_stage": 4}, "zero_stage=4 is invalid; valid: 0, 1, 2 or 3"),
        ({"zero_stage": 0, "data_parallel_shard_size": 2}, "data_parallel_shard_size=2 shards nothing"),
        ({"zero_stage": 3, "data_parallel_size": 4, "data_parallel_shard_size": 3},
         "data_parallel_shard_size=3 does not divide the data-parallel size dp=4"),
        ({"activation_checkpointing": "some"}, "activation_checkpointing='some' is invalid"),
        ({"zero_stage": 1, "data_parallel_sync": "diloco"}, "zero_stage=1 with data_parallel_sync=DiLoCo"),
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


# -- checkpoints across zero stages; accumulation, clipping and an LR schedule ----------------------------
def _mlp_module(schedule: str = "constant"):
    from lit_parallel.models import ImageClassifier, mlp

    # (a cosine schedule's length depends on max_epochs, so the resume tests keep the LR constant)
    return ImageClassifier(net=mlp(in_features=12, hidden=32, depth=3), lr=1e-2, weight_decay=0.01,
                           lr_schedule=schedule, warmup_steps=2)


def _mlp_loader(batch: int) -> DataLoader:
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(48, 12, generator=g), torch.randint(0, 10, (48,), generator=g))
    return DataLoader(data, batch_size=batch, shuffle=True)


def _fit_ckpt(layout: tuple, epochs: int, ckpt_in: str | None = None, ckpt_out: str | None = None,
              schedule: str = "constant", **trainer_kw):
    tp, dp, zero = layout
    L.seed_everything(SEED, verbose=False)
    module, recorder = _mlp_module(schedule), _LossRecorder()
    strategy = HybridParallelStrategy(tensor_parallel_size=tp, data_parallel_size=dp, zero_stage=zero)
    trainer = L.Trainer(accelerator="cpu", devices=tp * dp, strategy=strategy, max_epochs=epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[recorder], **trainer_kw)
    trainer.fit(module, _mlp_loader(8 // dp), ckpt_path=ckpt_in)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    return recorder.losses, strategy.export_state_dict()


def _resume_across_stages(tmp: str) -> list:
    out = []
    for saved, resumed in [((1, 2, 3), (1, 2, 1)), ((1, 2, 1), (1, 2, 3)), ((1, 2, 2), (2, 1, 0))]:
        ckpt = f"{tmp}/zero{saved[2]}_to_{resumed[2]}.ckpt"
        _fit_ckpt(saved, epochs=1, ckpt_out=ckpt)
        out.append((_fit_ckpt(resumed, epochs=2, ckpt_in=ckpt), _fit_ckpt(saved, epochs=2)))
    return out


@pytest.mark.slow
def test_checkpoint_resumes_in_another_zero_stage(tmp_path):
    results = run_distributed(_resume_across_stages, world_size=2, args=(str(tmp_path),), init_process_group=False,
                              timeout=480)
    for (resumed_losses, resumed_state), (full_losses, full_state) in results[0]:
        # the second epoch (the resumed run's losses) equals the uninterrupted run's second epoch
        torch.testing.assert_close(torch.tensor(resumed_losses), torch.tensor(full_losses[-len(resumed_losses):]),
                                   rtol=1e-5, atol=1e-7)
        for name, value in full_state.items():
            torch.testing.assert_close(resumed_state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def _accumulate_clip(zero: int, dp: int) -> tuple:
    return _fit_ckpt((1, dp, zero), epochs=1, schedule="cosine", accumulate_grad_batches=2, gradient_clip_val=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_accumulation_clipping_schedule_match_single_process(zero):
    from lit_parallel.testing import global_batch_order

    results = run_distributed(_accumulate_clip, world_size=2, args=(zero, 2), init_process_group=False, timeout=300)
    L.seed_everything(SEED, verbose=False)
    module, recorder = _mlp_module("cosine"), _LossRecorder()
    loader = _mlp_loader(4)
    order = global_batch_order(len(loader.dataset), 2, 4, SEED)
    L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
              accumulate_grad_batches=2, gradient_clip_val=0.05).fit(
        module, DataLoader(loader.dataset, batch_size=8, sampler=order))
    losses, state = results[0]
    # the reference sees 8-sample batches; each rank saw 4 of them: compare the final parameters
    for name, value in module.model.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=f"zero {zero}: {name}")


def _pruned(zero: int, structured: bool = False) -> dict:
    from test_pruning_distributed import FEATURES, GLOBAL_BATCH, STEPS, _hybrid_data

    from lit_parallel.callbacks import MagnitudePruning, StructuredPruning
    from lit_parallel.models import ImageClassifier, mlp

    L.seed_everything(11, verbose=False)
    module = ImageClassifier(net=mlp(in_features=FEATURES, hidden=32, depth=3), lr=1e-2, optimizer="adamw")
    if structured:
        pruning = StructuredPruning(0.5, start_step=2, end_step=10, every_n_steps=4, make_permanent=False)
    else:
        pruning = MagnitudePruning(0.8, start_step=2, end_step=10, every_n_steps=4, make_permanent=False)
    strategy = HybridParallelStrategy(data_parallel_size=2, zero_stage=zero)
    L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[pruning]).fit(module, DataLoader(_hybrid_data(), batch_size=GLOBAL_BATCH // 2, shuffle=True))
    return strategy.export_state_dict()


def _pruned_stages() -> list:
    return [_pruned(zero, structured) for structured in (False, True) for zero in (0, 1, 3)]


@pytest.mark.slow
def test_pruning_masks_equal_across_zero_stages():
    results = run_distributed(_pruned_stages, world_size=2, init_process_group=False, timeout=300)[0]
    for kind, (replicated, zero1, zero3) in (("magnitude", results[:3]), ("structured", results[3:])):
        _same_masks(kind, replicated, zero1, zero3)


def _same_masks(kind: str, replicated: dict, zero1: dict, zero3: dict) -> None:
    zeros = sum(int((v == 0).sum()) for k, v in replicated.items() if k.endswith("weight"))
    assert zeros > 0, kind
    for name, value in replicated.items():
        for stage, state in ((f"{kind} zero 1", zero1), (f"{kind} zero 3", zero3)):
            if name.endswith("weight"):
                assert torch.equal(state[name] == 0, value == 0), f"{stage}: mask of {name} differs"
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=f"{stage}: {name}")


class _InfAfterBackward(L.Callback):
    """An inf in one element of this rank's local gradient shard of ``name`` at step ``step`` (rank 1 only)."""

    def __init__(self, name: str, step: int) -> None:
        self.name, self.step = name, step

    def on_after_backward(self, trainer, pl_module) -> None:
        from lit_parallel.parallel.mesh import local_tensor

        if trainer.global_step == self.step and trainer.global_rank == 1:
            grad = dict(pl_module.named_parameters())[self.name].grad
            with torch.no_grad():
                local_tensor(grad).view(-1)[0] = float("inf")


def _precision_fit(zero: int, precision: str, inject: bool) -> dict:
    from test_precision_distributed import _Recorder

    from lit_parallel.precision import HybridMixedPrecision

    L.seed_everything(SEED, verbose=False)
    module, data = _build("gpt2")
    callbacks: list = [_Recorder()]
    if inject:
        callbacks.append(_InfAfterBackward("model.transformer.h.0.mlp.c_fc.weight", step=1))
    plugins = [HybridMixedPrecision("16-mixed", device="cpu", init_scale=2.0**10)] if precision == "16-mixed" else None
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=HybridParallelStrategy(zero_stage=zero), max_steps=3,
                        logger=False, precision=None if plugins else precision, plugins=plugins,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks)
    trainer.fit(module, DataLoader(data, batch_size=GLOBAL_BATCH // 2, shuffle=True))
    recorder = callbacks[0]
    return {"losses": recorder.losses, "changed": recorder.changed, "scales": recorder.scales}


_PRECISIONS = ("bf16-mixed", "16-mixed", "bf16-true")


def _precision_runs() -> list[dict]:
    runs = [_precision_fit(zero, p, False) for zero in (0, 1, 3) for p in _PRECISIONS]
    return runs + [_precision_fit(3, "16-mixed", True), _precision_fit(1, "16-mixed", True)]


@pytest.mark.slow
def test_precisions_with_sharded_dp_axis():
    """Every precision at zero 1 and 3 follows zero 0's losses (same mixed-precision math, other reductions); an
    inf in one rank's gradient shard skips the step on every rank and halves the scale."""
    results = run_distributed(_precision_runs, world_size=2, init_process_group=False, timeout=600)
    for rank in range(2):
        runs = results[rank]
        for index, precision in enumerate(_PRECISIONS):
            replicated = runs[index]
            for zero, run in ((1, runs[3 + index]), (3, runs[6 + index])):
                assert all(run["changed"]), (zero, precision, rank)
                torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(replicated["losses"]),
                                           rtol=2e-3, atol=1e-4, msg=f"zero {zero} {precision} rank {rank}")
        for injected in runs[9:]:
            assert injected["changed"] == [True, False, True], injected
            assert injected["scales"] == [1024.0, 512.0, 512.0], injected
