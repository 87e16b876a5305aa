"""Precision plugins on the hybrid mesh (CPU gloo): overflow agreed on every rank, global-norm clipping
equal to one process, mixed precision tracking fp32.

Single-process references run in the test process; the parallel runs use ``run_distributed``.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_parallel import HybridParallelStrategy
from lit_parallel.models import ImageClassifier, mlp
from lit_parallel.parallel.data_parallel import local_tensor
from lit_parallel.precision import (
    MASTER_WEIGHT_KEY,
    HybridMixedPrecision,
    HybridPrecision,
    clip_grad_norm_,
)
from lit_parallel.testing import global_batch_order, run_distributed

SEED, STEPS, BATCH, FEATURES = 7, 6, 16, 12
INF_STEP = 2
INIT_SCALE = 2.0**10  # small enough that this model never overflows on its own


class _Recorder(Callback):
    """Per step: logged loss, whether any local parameter changed, the loss scale after the step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.changed: list[bool] = []
        self.scales: list[float | None] = []
        self._before: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = [local_tensor(p.detach()).clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))
        after = [local_tensor(p.detach()) for p in pl_module.parameters()]
        self.changed.append(any(not torch.equal(a, b) for a, b in zip(after, self._before, strict=True)))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales.append(scaler.get_scale() if scaler is not None else None)


class _InjectInf(Callback):
    """Turn one element of one parameter's gradient into inf, on one rank, at one step."""

    def __init__(self, param_name: str, rank: int, step: int) -> None:
        self.param_name, self.rank, self.step = param_name, rank, step
        self._handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            param = dict(pl_module.named_parameters())[self.param_name]
            self._handle = param.register_post_accumulate_grad_hook(_poison)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _poison(param: torch.Tensor) -> None:
    with torch.no_grad():
        local_tensor(param.grad).view(-1)[0] = float("inf")


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = STEPS * BATCH
    return TensorDataset(torch.randn(n, FEATURES, generator=g), torch.randint(0, 10, (n,), generator=g))


def _fit(layout: tuple[int, int] | None, precision: str = "32-true", plugin: str | None = None,
         inject: tuple[str, int] | None = None, clip: float | None = None, optimizer: str = "adamw") -> dict:
    """Train the tiny MLP; ``layout=(tp, pp)`` on the hybrid strategy, ``None`` on one process."""
    L.seed_everything(SEED, verbose=False)
    lr = 1e-2 if optimizer == "adamw" else 5e-2
    module = ImageClassifier(net=mlp(in_features=FEATURES, hidden=32, depth=3), lr=lr, optimizer=optimizer)
    recorder = _Recorder()
    callbacks: list[Callback] = [recorder]
    if inject is not None:
        callbacks.append(_InjectInf(inject[0], inject[1] if layout is not None else 0, INF_STEP))
    plugins = []
    if plugin == "fp16":
        plugins.append(HybridMixedPrecision("16-mixed", device="cpu", init_scale=INIT_SCALE, growth_interval=1000))
    # Without the strategy, the plain Lightning plugin of the same precision is the reference.
    if layout is None and plugin == "fp16":
        from lightning.pytorch.plugins.precision import MixedPrecision

        plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=INIT_SCALE,
                                                                           growth_interval=1000))]
    common = dict(accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                  gradient_clip_val=clip, plugins=plugins or None, precision=None if plugins else precision)
    if layout is None:
        # The batches the strategy's distributed sampler (dp=1, seeded shuffle) gives the parallel runs.
        loader = DataLoader(_data(), batch_size=BATCH, sampler=global_batch_order(STEPS * BATCH, 1, BATCH, SEED))
        trainer = L.Trainer(devices=1, **common)
        trainer.fit(module, loader)
        return {"losses": recorder.losses, "changed": recorder.changed, "scales": recorder.scales,
                "state": {k: v.detach().float().clone() for k, v in module.model.state_dict().items()}}
    tp, pp = layout
    strategy = HybridParallelStrategy(tensor_parallel_size=tp, pipeline_parallel_size=pp, num_microbatches=2)
    loader = DataLoader(_data(), batch_size=BATCH, shuffle=True)
    trainer = L.Trainer(devices=tp * pp, strategy=strategy, **common)
    trainer.fit(module, loader)
    plugin_obj = trainer.precision_plugin
    optimizer = trainer.optimizers[0]
    state_dtypes = sorted({f"{k}:{v.dtype}" for st in optimizer.state.values() for k, v in st.items()
                           if isinstance(v, torch.Tensor) and k != "step"})
    exported = strategy.export_state_dict()
    return {"losses": recorder.losses, "changed": recorder.changed, "scales": recorder.scales,
            "plugin": type(plugin_obj).__name__, "param_dtypes": sorted({str(p.dtype) for p in module.parameters()}),
            "state_dtypes": state_dtypes,
            "state": None if exported is None else {k: v.float() for k, v in exported.items()}}


def _fit_many(layout: tuple[int, int], runs: list[dict]) -> list[dict]:
    """Several trainings in one set of processes (spawning ranks costs more than these tiny runs)."""
    return [_fit(layout, **run) for run in runs]


# Every run of one layout shares one spawn: (tp=2) and (pp=2) on 2 ranks.
_RUNS = {
    (2, 1): {"overflow": {"plugin": "fp16", "inject": ("model.1.weight", 1)},  # a column shard of tp rank 1
             "fp16": {"plugin": "fp16"},
             "bf16-true": {"precision": "bf16-true"}},
    (1, 2): {"overflow": {"plugin": "fp16", "inject": ("model.7.weight", 1)},  # the head, on the last stage
             "bf16-mixed": {"precision": "bf16-mixed"}},
}


@pytest.fixture(scope="module", params=[(2, 1), (1, 2)], ids=["tp2", "pp2"])
def layout_runs(request) -> tuple[tuple[int, int], dict[str, list[dict]]]:
    layout = request.param
    names = list(_RUNS[layout])
    results = run_distributed(_fit_many, world_size=layout[0] * layout[1],
                              args=(layout, [_RUNS[layout][n] for n in names]), init_process_group=False,
                              timeout=400)
    return layout, {name: [rank_results[i] for rank_results in results] for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def fp32_reference() -> dict:
    return _fit(None)


# -- overflow on one rank -------------------------------------------------------------------------------
def test_overflow_on_one_rank_skips_the_step_everywhere(layout_runs):
    layout, runs = layout_runs
    results = runs["overflow"]
    param_name = _RUNS[layout]["overflow"]["inject"][0]
    reference = _fit(None, plugin="fp16", inject=(param_name, 0))
    expected_scales = [INIT_SCALE] * INF_STEP + [INIT_SCALE / 2] * (STEPS - INF_STEP)
    assert reference["scales"] == expected_scales and reference["changed"][INF_STEP] is False
    for r, result in enumerate(results):
        assert result["plugin"] == "HybridMixedPrecision"
        assert result["scales"] == expected_scales, f"rank {r}: the scale did not halve exactly once"
        assert result["changed"][INF_STEP] is False, f"rank {r} stepped although one rank overflowed"
        assert all(c for i, c in enumerate(result["changed"]) if i != INF_STEP), f"rank {r} stopped training"
        assert result["losses"] == results[0]["losses"], f"rank {r} logs a different loss"
        # fp16 rounding differs between sharded and unsharded matmuls: compare loosely with one process.
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]),
                                   rtol=1e-2, atol=1e-3)


# -- reduced precision tracks fp32 -------------------------------------------------------------------------
_EXPECTED_PLUGIN = {"fp16": "HybridMixedPrecision", "bf16-mixed": "HybridMixedPrecision",
                    "bf16-true": "HybridHalfPrecision"}


def test_reduced_precision_tracks_fp32(layout_runs, fp32_reference):
    _, runs = layout_runs
    for name, results in runs.items():
        if name == "overflow":
            continue
        tolerance = 5e-3 if name == "fp16" else 2e-2
        for rank, result in enumerate(results):
            assert result["plugin"] == _EXPECTED_PLUGIN[name]
            assert all(result["changed"]), f"{name} rank {rank} skipped a step"
            torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(fp32_reference["losses"]),
                                       rtol=tolerance, atol=tolerance, msg=f"{name} rank {rank}")
        if name == "bf16-true":
            assert results[0]["param_dtypes"] == ["torch.bfloat16"]
            assert f"{MASTER_WEIGHT_KEY}:torch.float32" in results[0]["state_dtypes"]
            assert all(d.endswith("float32") for d in results[0]["state_dtypes"]), results[0]["state_dtypes"]


# -- global-norm clipping --------------------------------------------------------------------------------
def _stage(index: int) -> nn.Module:
    torch.manual_seed(100 + index)
    stage = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 6))
    stage.register_parameter("gain", nn.Parameter(torch.randn(6)))   # a plain tensor, replicated over tp
    stage.register_parameter("tied", nn.Parameter(torch.randn(5)))   # tied across the two stages
    return stage


def _set_reference_grads(stages: list[nn.Module]) -> None:
    g = torch.Generator().manual_seed(3)
    for stage in stages:
        for param in stage.parameters():
            param.grad = torch.randn(param.shape, generator=g) * 3
    stages[1].tied.grad = stages[0].tied.grad.clone()  # both copies hold the summed gradient


def _clip_worker(max_norm: float, norm_types: tuple[float, ...]) -> list[dict[str, float]]:
    return [_clip_once(max_norm, norm_type) for norm_type in norm_types]


def _clip_once(max_norm: float, norm_type: float) -> dict[str, float]:
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from lit_parallel.parallel.mesh import ParallelDims, build_mesh

    mesh = build_mesh(ParallelDims.resolve(2, 2, 1, 4), "cpu")
    tp_mesh, pp_rank = mesh["tp"], mesh["pp"].get_local_rank()
    stages, reference = [_stage(0), _stage(1)], [_stage(0), _stage(1)]
    _set_reference_grads(stages)
    _set_reference_grads(reference)
    ref_params = [p for s in reference for n, p in s.named_parameters() if not (s is reference[1] and n == "tied")]
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm, norm_type)
    reference[1].tied.grad = reference[0].tied.grad.clone()  # the copy gets the clipped gradient too

    local = stages[pp_rank]
    full_grads = {n: p.grad for n, p in local.named_parameters()}
    parallelize_module(local, tp_mesh, {"0": ColwiseParallel(), "1": RowwiseParallel()})
    for name, param in local.named_parameters():
        is_dtensor = hasattr(param, "placements")
        param.grad = (distribute_tensor(full_grads[name], tp_mesh, param.placements) if is_dtensor
                      else full_grads[name].clone())
    exclude = [local.tied] if pp_rank == 1 else []
    mp_group = mesh["pp", "tp"]._flatten("pp_tp").get_group()
    norm = clip_grad_norm_(local.parameters(), max_norm, norm_type, group=mp_group,
                           replicated_group=tp_mesh.get_group(), exclude=exclude)
    worst = 0.0
    for name, param in local.named_parameters():
        ref_grad = dict(reference[pp_rank].named_parameters())[name].grad
        if hasattr(param, "placements"):
            ref_grad = distribute_tensor(ref_grad, tp_mesh, param.placements).to_local()
        got = local_tensor(param.grad)
        worst = max(worst, float((got - ref_grad).abs().max() / ref_grad.abs().max()))
    return {"norm": float(norm), "ref_norm": float(ref_norm), "grad_rel_err": worst}


def test_global_norm_clipping_tp2_pp2_equals_single_process():
    results = run_distributed(_clip_worker, world_size=4, args=(0.5, (2.0, float("inf"))), timeout=180)
    for rank, per_norm in enumerate(results):
        for r in per_norm:  # the 2-norm, then the inf-norm
            assert abs(r["norm"] - r["ref_norm"]) <= 1e-6 * r["ref_norm"], f"rank {rank}: {r}"
            assert r["grad_rel_err"] <= 1e-6, f"rank {rank}: {r}"
            assert r["ref_norm"] > 0.5  # clipping was active


@pytest.mark.slow
def test_clipped_training_tp2_pp2_matches_single_process():
    # SGD: Adam's per-element normalization would amplify float32 summation-order noise in ~0 gradients.
    reference = _fit(None, clip=0.05, optimizer="sgd")
    results = run_distributed(_fit, world_size=4, args=((2, 2),), kwargs={"clip": 0.05, "optimizer": "sgd"},
                              init_process_group=False, timeout=400)
    for rank, result in enumerate(results):
        assert result["plugin"] == HybridPrecision.__name__
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]),
                                   rtol=1e-5, atol=1e-7, msg=f"rank {rank}")
    for name, value in reference["state"].items():
        torch.testing.assert_close(results[0]["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
