"""SyncBatchNorm on 2 gloo ranks equals plain batch norm of one process on the concatenated batch.

Pure torch: outputs, input gradients, DDP-averaged parameter gradients and running statistics of a
conv net with BatchNorm1d (2-D and 3-D inputs, cumulative momentum) and BatchNorm2d, with equal and
unequal local batches, and a BatchNorm3d net; bf16 under autocast; a group of one is plain batch norm.
Lightning: ``Trainer(sync_batchnorm=True)`` under CompressedDDP, local SGD and DiLoCo trains like one
process on the same global batches. Every distributed check runs inside one ``run_distributed`` call.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

from lit_parallel import CompressedDDPStrategy, DiLoCoStrategy, HybridParallelStrategy, LocalSGDStrategy
from lit_parallel.parallel.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm
from lit_parallel.plugins import MeshSyncBatchNorm
from lit_parallel.strategies._launch import mesh_layer_sync
from lit_parallel.testing import global_batch_order, run_distributed

WORLD, SEED, STEPS, GLOBAL_BATCH = 2, 3, 3, 8


def _conv_net(batchnorm: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    norm = (lambda layer: layer) if batchnorm else (lambda layer: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), norm(nn.BatchNorm2d(4)), nn.ReLU(), nn.Flatten(),
        nn.Linear(100, 8), norm(nn.BatchNorm1d(8)), nn.ReLU(),
        nn.Unflatten(1, (2, 4)), norm(nn.BatchNorm1d(2, momentum=None)),  # 3-D input, cumulative average
        nn.Flatten(), nn.Linear(8, 3),
    )


def _bn3d_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3, momentum=0.3), nn.ReLU(), nn.Conv3d(3, 3, 1),
                         nn.BatchNorm3d(3, affine=False))


# name: (model, per-sample input shape, per-sample output shape, local batch size of each rank)
CASES = {
    "conv_equal": (_conv_net, (2, 5, 5), (3,), [4, 4]),
    "conv_unequal": (_conv_net, (2, 5, 5), (3,), [3, 6]),
    "bn3d_unequal": (_bn3d_net, (2, 2, 3, 2), (3, 2, 3, 2), [5, 2]),
}


def _batch(case: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of one step and the fixed weights of its loss ``sum(out * weights)``."""
    _, shape, out_shape, sizes = CASES[case]
    g = torch.Generator().manual_seed(100 * step + len(case))
    return torch.randn(sum(sizes), *shape, generator=g), torch.randn(sum(sizes), *out_shape, generator=g)


# -- pure torch, on every rank --------------------------------------------------------------------------
def _rank_case(case: str) -> dict[str, Any]:
    build, _, _, sizes = CASES[case]
    rank = dist.get_rank()
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    net = convert_sync_batchnorm(build())
    out: dict[str, Any] = {"steps": [], "types": [type(m).__name__ for m in net.modules() if isinstance(m, _BatchNorm)]}
    for step in range(2):
        x_all, weights = _batch(case, step)
        x = x_all[lo:hi].clone().requires_grad_()
        y = net(x)
        (y * weights[lo:hi]).sum().backward()
        grads = {name: p.grad.clone() for name, p in net.named_parameters()}
        for grad in grads.values():  # what DDP does
            dist.all_reduce(grad)
            grad /= WORLD
        out["steps"].append({"y": y.detach(), "x_grad": x.grad, "grads": grads})
        net.zero_grad()
    net.eval()
    out["eval"] = net(x.detach())
    out["state"] = {k: v.clone() for k, v in net.state_dict().items()}
    out["reverted"] = [type(m) for m in revert_sync_batchnorm(net).modules() if isinstance(m, _BatchNorm)]
    return out


def _rank_bf16_autocast() -> dict[str, torch.Tensor]:
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4)))
    x = torch.randn(8, 2, 3, 3, generator=torch.Generator().manual_seed(1))[rank * 4 : rank * 4 + 4]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    return {"y": y, "running_mean": net[1].running_mean.clone(), "running_var": net[1].running_var.clone()}


def _rank_group_of_one() -> bool:
    groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3)
    synced = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), process_group=groups[dist.get_rank()])
    x = torch.randn(4, 3, 2, 2) + dist.get_rank()
    same = torch.equal(plain(x), synced(x)) and torch.equal(plain.running_var, synced[0].running_var)
    return same and synced[0].process_group is groups[dist.get_rank()]


# -- Lightning, on every rank ---------------------------------------------------------------------------
class _Classifier(L.LightningModule):
    def __init__(self, batchnorm: bool = True) -> None:
        super().__init__()
        self.net = _conv_net(batchnorm)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Recorder(Callback):
    """The batch-norm classes while training, and the network's state after every optimizer step."""

    def __init__(self) -> None:
        self.types: list[type] = []
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.types = [type(m) for m in pl_module.modules() if isinstance(m, _BatchNorm)]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = STEPS * GLOBAL_BATCH
    return TensorDataset(torch.randn(n, 2, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def _fit(strategy: Any, devices: int, steps: int, batchnorm: bool = True) -> dict[str, Any]:
    L.seed_everything(SEED, verbose=False)
    module, data, recorder = _Classifier(batchnorm), _data(), _Recorder()
    if devices == 1:
        order = global_batch_order(len(data), WORLD, GLOBAL_BATCH // WORLD, SEED)
        loader = DataLoader(data, batch_size=GLOBAL_BATCH, sampler=order)
    else:
        loader = DataLoader(data, batch_size=GLOBAL_BATCH // WORLD, shuffle=True)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, sync_batchnorm=devices > 1,
                        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[recorder])
    trainer.fit(module, loader)
    return {"types": recorder.types, "states": recorder.states,
            "after": [type(m) for m in module.modules() if isinstance(m, _BatchNorm)]}


EXACT = {  # strategies that train exactly like DDP, hence like one process on the global batch
    "CompressedDDPStrategy()": lambda: CompressedDDPStrategy(),
    "LocalSGDStrategy(sync_every=1)": lambda: LocalSGDStrategy(sync_every=1),
    "DiLoCoStrategy(H=1, outer_lr=1, momentum=0)": lambda: DiLoCoStrategy(sync_every=1, outer_lr=1.0,
                                                                           outer_momentum=0.0),
    "HybridParallelStrategy(dp=2)": lambda: HybridParallelStrategy(),
}
NAMES = ["ddp_fp16", "local_sgd", "diloco"]  # registered names: compared after their first step


def _all_checks() -> dict[str, Any]:
    out: dict[str, Any] = {case: _rank_case(case) for case in CASES}
    out["bf16"] = _rank_bf16_autocast()
    out["group_of_one"] = _rank_group_of_one()
    out["exact"] = {name: _fit(make(), WORLD, STEPS) for name, make in EXACT.items()}
    out["names"] = {name: _fit(name, WORLD, 1) for name in NAMES}
    out["no_batchnorm"] = _fit(CompressedDDPStrategy(), WORLD, 1, batchnorm=False)["states"]
    return out


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run_distributed(_all_checks, world_size=WORLD, timeout=300)


# -- single-process references --------------------------------------------------------------------------
def _reference_case(case: str) -> dict[str, Any]:
    net = CASES[case][0]()
    out: dict[str, Any] = {"steps": []}
    for step in range(2):
        x, weights = _batch(case, step)
        x.requires_grad_()
        y = net(x)
        (y * weights).sum().backward()
        out["steps"].append({"y": y.detach(), "x_grad": x.grad,
                             "grads": {name: p.grad / WORLD for name, p in net.named_parameters()}})
        net.zero_grad()
    net.eval()
    out["eval"] = net(x.detach())
    out["state"] = net.state_dict()
    out["types"] = [type(m) for m in net.modules() if isinstance(m, _BatchNorm)]
    return out


@pytest.fixture(scope="module")
def reference_fit() -> dict[str, Any]:
    return _fit("auto", 1, STEPS)


def _close(actual: torch.Tensor, expected: torch.Tensor, msg: str, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol, msg=lambda m: f"{msg}: {m}")


def _grad_atol(grads: dict[str, torch.Tensor]) -> float:
    """float32 rounding at the scale of the step's largest gradient: summation order differs between one
    process and two, and the gradient of a bias right before a batch norm is exactly zero only on paper."""
    return 2e-6 * max(1.0, max(g.abs().max().item() for g in grads.values()))


# -- tests ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_matches_single_process_on_global_batch(results, case):
    ref = _reference_case(case)
    sizes = CASES[case][3]
    for rank, result in enumerate(results):
        got = result[case]
        assert set(got["types"]) == {"SyncBatchNorm"}
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        for step, (mine, want) in enumerate(zip(got["steps"], ref["steps"], strict=True)):
            where = f"{case} rank {rank} step {step}"
            _close(mine["y"], want["y"][lo:hi], f"{where} output")
            _close(mine["x_grad"], want["x_grad"][lo:hi], f"{where} input gradient")
            atol = _grad_atol(want["grads"])
            for name, grad in want["grads"].items():
                _close(mine["grads"][name], grad, f"{where} gradient of {name}", atol=atol)
        _close(got["eval"], ref["eval"][lo:hi], f"{case} rank {rank} eval output")
        assert sorted(got["state"]) == sorted(ref["state"])
        for name, value in ref["state"].items():
            _close(got["state"][name], value, f"{case} rank {rank} {name}", atol=0 if "num_batches" in name else 1e-6)
        assert got["reverted"] == ref["types"]  # back to BatchNorm1d / 2d / 3d


def test_bf16_autocast_keeps_input_dtype_and_float32_statistics(results):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4))
    x = torch.randn(8, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv = net[0](x)
    assert conv.dtype == torch.bfloat16
    want = net[1](conv.float())
    for rank, result in enumerate(results):
        got = result["bf16"]
        assert got["y"].dtype == torch.bfloat16
        torch.testing.assert_close(got["y"].float(), want[rank * 4 : rank * 4 + 4], rtol=2e-2, atol=2e-2)
        _close(got["running_mean"], net[1].running_mean, "running_mean")
        _close(got["running_var"], net[1].running_var, "running_var")


def test_group_of_one_is_plain_batchnorm(results):
    assert [result["group_of_one"] for result in results] == [True, True]


def test_lightning_strategies_train_like_one_process(results, reference_fit):
    for rank, result in enumerate(results):
        for name, fit in result["exact"].items():
            assert fit["types"] == [SyncBatchNorm] * 3, f"{name}: {fit['types']}"
            assert fit["after"] == [nn.BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm1d], f"{name}: not reverted"
            for step, (state, want) in enumerate(zip(fit["states"], reference_fit["states"], strict=True)):
                for key, value in want.items():
                    _close(state[key], value, f"{name} rank {rank} step {step + 1}: {key}",
                           atol=0 if "num_batches" in key else 1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_registered_names_sync_batchnorm(results, reference_fit, name):
    """The first step's statistics come from the initial weights: equal for every strategy, compressed or not."""
    for rank, result in enumerate(results):
        fit = result["names"][name]
        assert fit["types"] == [SyncBatchNorm] * 3
        (state,) = fit["states"]
        for key, value in reference_fit["states"][0].items():
            if "running" in key or "num_batches" in key:
                _close(state[key], value, f"{name} rank {rank}: {key}")


def test_model_without_batchnorm(results):
    assert all(len(result["no_batchnorm"]) == 1 for result in results)


# -- single process -------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", [lambda: CompressedDDPStrategy(), lambda: "ddp_powersgd", lambda: "local_sgd",
                                      lambda: "diloco"])
def test_trainer_sync_batchnorm_selects_mesh_plugin(strategy):
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy(), sync_batchnorm=True, logger=False)
    layer_sync = trainer.strategy._layer_sync
    assert isinstance(layer_sync, MeshSyncBatchNorm) and layer_sync.process_group is None


def test_custom_layer_sync_kept():
    class Custom(TorchSyncBatchNorm):
        pass

    custom, strategy = Custom(), CompressedDDPStrategy()
    strategy._layer_sync = custom
    assert strategy._layer_sync is custom
    strategy._layer_sync = None
    assert strategy._layer_sync is None
    group = object()
    assert mesh_layer_sync(custom, group) is custom
    assert mesh_layer_sync(TorchSyncBatchNorm(), group).process_group is group
    mine = MeshSyncBatchNorm()
    assert mesh_layer_sync(mine, group) is mine and mine.process_group is group


def test_convert_and_revert_share_parameters_and_buffers():
    net = _conv_net()
    net[1].weight.requires_grad_(False)
    net.eval()
    plain = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    tensors = [(m.weight, m.bias, m.running_mean, m.running_var, m.num_batches_tracked) for m in plain]
    converted = convert_sync_batchnorm(net)
    synced = [m for m in converted.modules() if isinstance(m, _BatchNorm)]
    assert converted is net and all(type(m) is SyncBatchNorm and not m.training for m in synced)
    for m, shared in zip(synced, tensors, strict=True):
        assert all(a is b for a, b in zip((m.weight, m.bias, m.running_mean, m.running_var, m.num_batches_tracked),
                                          shared, strict=True))
    assert synced[0].weight.requires_grad is False and synced[2].momentum is None
    reverted = [m for m in revert_sync_batchnorm(net).modules() if isinstance(m, _BatchNorm)]
    assert [type(m) for m in reverted] == [nn.BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm1d]
    assert reverted[0].weight is tensors[0][0] and not reverted[0].weight.requires_grad

    layer = convert_sync_batchnorm(nn.BatchNorm1d(5, affine=False).to(torch.float64))
    assert isinstance(layer, SyncBatchNorm) and layer.weight is None and layer.running_mean.dtype == torch.float64
    assert type(revert_sync_batchnorm(SyncBatchNorm(3))).__name__ == "_BatchNormNd"  # any input dimensionality


def test_without_process_group_is_plain_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 2, 2)
    plain, synced = nn.BatchNorm3d(3, momentum=None), SyncBatchNorm(3, momentum=None)
    for _ in range(2):
        torch.testing.assert_close(synced(x), plain(x))
    torch.testing.assert_close(synced.state_dict(), plain.state_dict())
    with pytest.raises(ValueError, match="at least 2D"):
        synced(torch.randn(3))
