"""Precision plugins, single process: plugin selection, errors, scaler, clipping, fp32 master weights."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from torch import nn

from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.context import ParallelContext
from lit_parallel.precision import (
    MASTER_WEIGHT_KEY,
    HybridHalfPrecision,
    HybridMixedPrecision,
    HybridPrecision,
    MeshGradScaler,
    clip_grad_norm_,
    clip_grad_value_,
    to_mesh_aware,
)


# -- selection from Trainer(precision=...) ------------------------------------------------------------
def test_to_mesh_aware_maps_every_supported_precision():
    fp16 = to_mesh_aware(MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=8.0,
                                                                                  growth_interval=7)))
    assert isinstance(fp16, HybridMixedPrecision) and isinstance(fp16, MixedPrecision)
    assert isinstance(fp16.scaler, MeshGradScaler)
    assert (fp16.scaler.get_scale(), fp16.scaler.get_growth_interval()) == (8.0, 7)
    bf16 = to_mesh_aware(MixedPrecision("bf16-mixed", "cpu"))
    assert isinstance(bf16, HybridMixedPrecision) and bf16.scaler is None and bf16.precision == "bf16-mixed"
    half = to_mesh_aware(HalfPrecision("bf16-true"))
    assert isinstance(half, HybridHalfPrecision) and half.master_weights
    assert type(to_mesh_aware(Precision())) is HybridPrecision
    explicit = HybridMixedPrecision("16-mixed", device="cpu", init_scale=4.0)
    assert to_mesh_aware(explicit) is explicit


@pytest.mark.parametrize("plugin", [HalfPrecision("16-true"), DoublePrecision()], ids=["16-true", "64-true"])
def test_unsupported_precision_lists_the_valid_ones(plugin):
    with pytest.raises(ConfigurationError, match=r"valid: Trainer\(precision=...\) in \['16-mixed', 'bf16-mixed'"):
        to_mesh_aware(plugin)


def test_unknown_precision_strings():
    with pytest.raises(ConfigurationError, match=r"'fp8'.*valid: \['16-mixed', 'bf16-mixed'\]"):
        HybridMixedPrecision("fp8")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"'16-true'.*valid: \['bf16-true'\]"):
        HybridHalfPrecision("16-true")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"device='tpu'.*valid"):
        HybridMixedPrecision("16-mixed", device="tpu")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="backoff_factor"):
        HybridMixedPrecision("16-mixed", device="cpu", backoff_factor=2.0)


def test_lightning_trainer_builds_the_mesh_aware_plugin():
    import lightning as L

    from lit_parallel import HybridParallelStrategy

    for precision, expected in [("bf16-mixed", HybridMixedPrecision), ("bf16-true", HybridHalfPrecision),
                                ("32-true", HybridPrecision)]:
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=HybridParallelStrategy(tensor_parallel_size=2),
                            precision=precision, logger=False, enable_progress_bar=False)
        assert type(trainer.precision_plugin) is expected, precision


# -- bad optimizers and devices --------------------------------------------------------------------
def test_fp16_with_a_fused_optimizer_is_rejected():
    model = nn.Linear(4, 2)
    plugin = HybridMixedPrecision("16-mixed", device="cpu")
    fused = torch.optim.AdamW(model.parameters(), fused=True)
    with pytest.raises(ConfigurationError, match=r"AdamW\(fused=True\).*valid with precision='16-mixed'"):
        plugin.connect(model, [fused], [])
    plugin.connect(model, [torch.optim.AdamW(model.parameters(), foreach=True)], [])
    HybridMixedPrecision("bf16-mixed", device="cpu").connect(model, [fused], [])  # no scaler, no conflict


def test_bf16_on_a_gpu_without_bf16_is_rejected(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.raises(ConfigurationError, match=r"'bf16-mixed'.*Tesla T4.*valid on this GPU: '16-mixed'"):
        HybridMixedPrecision("bf16-mixed", device="cuda")
    context = ParallelContext(device=torch.device("cuda", 0), data_parallel_size=1)
    with pytest.raises(ConfigurationError, match=r"'bf16-true'.*Tesla T4"):
        HybridHalfPrecision("bf16-true").attach(context)
    HybridMixedPrecision("16-mixed", device="cuda")  # fp16 is fine there


# -- the scaler without a process group behaves like torch's ------------------------------------------
def test_scaler_skips_on_overflow_and_checkpoints():
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = MeshGradScaler("cpu", init_scale=16.0, growth_interval=1)
    before = model.weight.detach().clone()
    scaler.scale(model(torch.ones(2, 3)).sum()).backward()
    model.weight.grad[0, 0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    assert scaler.skipped_last_step and scaler.get_scale() == 8.0
    assert torch.equal(model.weight.detach(), before)
    optimizer.zero_grad()
    scaler.scale(model(torch.ones(2, 3)).sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    assert not scaler.skipped_last_step and scaler.get_scale() == 16.0
    plugin = HybridMixedPrecision("16-mixed", device="cpu")
    plugin.load_state_dict(scaler.state_dict())
    assert plugin.loss_scale == 16.0 and plugin.state_dict()["growth_interval"] == 1
    assert plugin.scale_loss(torch.tensor(2.0)).item() == 32.0
    assert HybridMixedPrecision("bf16-mixed", device="cpu").scale_loss(torch.tensor(2.0)).item() == 2.0


# -- clipping without a process group equals torch's ------------------------------------------------
def test_local_clipping_equals_torch():
    torch.manual_seed(0)
    a, b = nn.Linear(5, 4), nn.Linear(5, 4)
    b.load_state_dict(a.state_dict())
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        pa.grad = torch.randn_like(pa) * 5
        pb.grad = pa.grad.clone()
    for norm_type in (2.0, 1.0, float("inf")):
        expected = torch.nn.utils.clip_grad_norm_(a.parameters(), 0.7, norm_type)
        got = clip_grad_norm_(b.parameters(), 0.7, norm_type)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-6, atol=0)
    torch.nn.utils.clip_grad_value_(a.parameters(), 0.01)
    clip_grad_value_(b.parameters(), 0.01)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pb.grad, pa.grad)
    with pytest.raises(RuntimeError, match="non-finite"):
        b.weight.grad[0, 0] = float("nan")
        clip_grad_norm_(b.parameters(), 1.0, error_if_nonfinite=True)


# -- fp32 master weights ----------------------------------------------------------------------------
def _bf16_with_masters(model: nn.Module) -> tuple[HybridHalfPrecision, torch.optim.Optimizer]:
    plugin = HybridHalfPrecision("bf16-true", master_weights=True)
    plugin.convert_module(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plugin.connect(model, [optimizer], [])
    return plugin, optimizer


def test_master_weights_step_like_fp32_adamw_and_survive_a_state_dict_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]  # fp32 masters
    ref_opt = torch.optim.AdamW(reference, lr=1e-3)
    _, optimizer = _bf16_with_masters(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for step in range(4):
        model(torch.randn(3, 6, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(step))).sum().backward()
        for ref, param in zip(reference, model.parameters(), strict=True):
            ref.grad = param.grad.float()
        ref_opt.step()
        optimizer.step()
        optimizer.zero_grad()
    for ref, param in zip(reference, model.parameters(), strict=True):
        state = optimizer.state[param]
        assert param.dtype == torch.bfloat16 and state["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(state[MASTER_WEIGHT_KEY], ref.detach(), rtol=0, atol=0)
        torch.testing.assert_close(param.detach(), ref.detach().to(torch.bfloat16), rtol=0, atol=0)
    saved = optimizer.state_dict()

    restored_model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    _, restored = _bf16_with_masters(restored_model)
    restored.load_state_dict(saved)
    for ref, param in zip(reference, restored_model.parameters(), strict=True):
        state = restored.state[param]
        assert state["exp_avg"].dtype == state[MASTER_WEIGHT_KEY].dtype == torch.float32
        torch.testing.assert_close(state[MASTER_WEIGHT_KEY], ref.detach(), rtol=0, atol=0)


def test_master_weights_keep_updates_that_bf16_would_round_away():
    weight = nn.Parameter(torch.ones(4))
    plain = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    module = nn.Module()
    module.weight = weight
    plugin = HybridHalfPrecision("bf16-true", master_weights=True)
    plugin.convert_module(module)
    optimizer = torch.optim.SGD([module.weight], lr=1e-3)
    plugin.connect(module, [optimizer], [])
    plain_opt = torch.optim.SGD([plain], lr=1e-3)
    for _ in range(10):
        module.weight.grad = torch.ones(4, dtype=torch.bfloat16)
        plain.grad = torch.ones(4, dtype=torch.bfloat16)
        optimizer.step()
        plain_opt.step()
    # 1 - 1e-3 rounds back to 1 in bf16: the plain bf16 weight never moves, the master does.
    assert torch.equal(plain.detach(), torch.ones(4, dtype=torch.bfloat16))
    torch.testing.assert_close(optimizer.state[module.weight][MASTER_WEIGHT_KEY], torch.full((4,), 0.99))
    assert module.weight.detach()[0].item() < 1.0


# -- Hydra configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("option", "expected"), [("fp16_mixed_custom", HybridMixedPrecision),
                                                  ("bf16_true_master", HybridHalfPrecision),
                                                  ("bf16_mixed", HybridMixedPrecision), ("fp32", HybridPrecision)])
def test_precision_configs_give_the_mesh_aware_plugin(compose_cfg, option, expected):
    from hydra.utils import instantiate

    cfg = compose_cfg(f"precision={option}", "strategy=hybrid", "strategy.tensor_parallel_size=2")
    trainer = instantiate(cfg.trainer, strategy=instantiate(cfg.strategy), logger=False, enable_checkpointing=False)
    assert type(trainer.precision_plugin) is expected
