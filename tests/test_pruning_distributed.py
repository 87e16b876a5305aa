"""Sharded masks equal the unsharded masks of the same weights: tp=2 (DTensor), pp=2 (stages), dp=2 (DDP)."""

from __future__ import annotations

import faulthandler
from collections.abc import Callable

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_parallel import ConfigurationError, DiLoCoStrategy, LocalSGDStrategy
from lit_parallel.callbacks import MagnitudePruning
from lit_parallel.models import ImageClassifier, mlp
from lit_parallel.parallel.pruning import PruningLayout, expand_row_mask, row_norms
from lit_parallel.testing import global_batch_order, run_distributed

SPARSITY = 0.7


def _net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 6), nn.ReLU(),
                         nn.Linear(6, 4))


def _weights(net: nn.Module, layers: list[str]) -> dict[str, torch.Tensor]:
    return {f"{i}.weight": net.get_submodule(i).weight for i in layers}


def _masks(layout: PruningLayout) -> dict[str, dict[str, torch.Tensor]]:
    """Magnitude masks (global and per-layer scope) and row masks of structured pruning."""
    magnitude = [t.detach().abs() for t in layout.local_tensors()]
    rows = [row_norms(t, 0, 2.0) for t in layout.tensors]
    row_masks = layout.masks(rows, SPARSITY, scope="layer", contributes=layout.structured_contributes())
    return {
        "global": dict(zip(layout.names, layout.masks(magnitude, SPARSITY, "global"), strict=True)),
        "layer": dict(zip(layout.names, layout.masks(magnitude, SPARSITY, "layer"), strict=True)),
        "rows": dict(zip(layout.names, [expand_row_mask(m, t, 0) for m, t in zip(row_masks, layout.tensors,
                                                                                   strict=True)], strict=True)),
    }


def _reference(layers: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    return _masks(PruningLayout(_weights(_net(), layers), group=None))


def _full(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(like, DTensor):
        return DTensor.from_local(mask, like.device_mesh, like.placements, run_check=False).full_tensor()
    return mask


def _tensor_parallel_masks() -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2,))
    net = _net()
    parallelize_module(net, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    # Layer 4: a replicated DTensor; layer 6 stays a plain tensor that both ranks hold.
    net[4].weight = nn.Parameter(distribute_tensor(net[4].weight.data, mesh, [Replicate()]))
    params = _weights(net, ["0", "2", "4", "6"])
    layout = PruningLayout(params, group=dist.group.WORLD)
    masks = {kind: {n: _full(m, params[n]) for n, m in by_name.items()} for kind, by_name in _masks(layout).items()}
    overall, _ = layout.sparsity(list(_masks(layout)["global"].values()))
    return masks, overall


def _tied() -> torch.Tensor:
    """A weight both pipeline ends hold under different names (GPT-2's wte / lm_head)."""
    return torch.randn(10, 6, generator=torch.Generator().manual_seed(5))


def _pipeline_masks() -> dict[str, dict[str, torch.Tensor]]:
    rank = dist.get_rank()
    weights = _weights(_net(), [["0", "2"], ["4", "6"]][rank])
    weights["wte.weight" if rank == 0 else "lm_head.weight"] = _tied()
    return _masks(PruningLayout(weights, group=dist.group.WORLD))


def _assert_equal(got: dict[str, dict[str, torch.Tensor]], want: dict[str, dict[str, torch.Tensor]]) -> None:
    for kind, by_name in got.items():
        for name, mask in by_name.items():
            assert torch.equal(mask, want[kind][name]), f"{kind} mask of {name} differs from the unsharded one"


def test_tensor_parallel_masks_equal_unsharded(ranks):
    reference = _reference(["0", "2", "4", "6"])
    for masks, overall in (result["tp"] for result in ranks):
        _assert_equal(masks, reference)
        # Replicated elements (DTensor Replicate and the plain layer) are counted once.
        numel = sum(m.numel() for m in reference["global"].values())
        pruned = sum(int((~m).sum()) for m in reference["global"].values())
        assert overall == pruned / numel
        assert abs(overall - SPARSITY) < 0.005


def test_pipeline_parallel_masks_equal_unsharded(ranks):
    # The unsharded model holds the tied weight once; the stages hold one copy each.
    reference = _masks(PruningLayout({**_weights(_net(), ["0", "2", "4", "6"]), "wte.weight": _tied()}))
    for kind in reference.values():
        kind["lm_head.weight"] = kind["wte.weight"]
    for rank, masks in enumerate(result["pp"] for result in ranks):
        own = {"0.weight", "2.weight", "wte.weight"} if rank == 0 else {"4.weight", "6.weight", "lm_head.weight"}
        assert set(masks["global"]) == own
        _assert_equal(masks, reference)


# -- data parallel: two DDP replicas train with pruning and hold identical masks ---------------------------
STEPS, GLOBAL_BATCH = 12, 16


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = STEPS * GLOBAL_BATCH
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def _fit_pruned(devices: int, strategy: object = None, every_n_steps: int = 4) -> dict[str, torch.Tensor]:
    L.seed_everything(7, verbose=False)
    model = ImageClassifier(net=mlp(hidden=32, depth=1), lr=1e-2, optimizer="adam")
    loader = DataLoader(_data(), batch_size=GLOBAL_BATCH // devices, shuffle=devices > 1)
    pruning = MagnitudePruning(0.8, start_step=2, end_step=10, every_n_steps=every_n_steps, make_permanent=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy or ("ddp" if devices > 1 else "auto"), max_steps=STEPS,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[pruning],
    )
    trainer.fit(model, train_dataloaders=loader)
    return {n: p.detach() != 0 for n, p in model.named_parameters() if n.endswith("weight")}


@pytest.mark.parametrize("case", ["dp", "diloco"])
def test_data_parallel_replicas_hold_identical_masks(ranks, case):
    # "diloco": replicas differ between synchronizations; masks are computed right after one.
    first, second = (result[case] for result in ranks)
    for name, mask in first.items():
        assert torch.equal(mask, second[name]), name
    total = sum(m.numel() for m in first.values())
    pruned = sum(int((~m).sum()) for m in first.values())
    assert abs(pruned / total - 0.8) < 0.005


# -- end to end: MagnitudePruning under HybridParallelStrategy (tp=2, then pp=2) vs one process ----------
FEATURES = 12


def _hybrid_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = STEPS * GLOBAL_BATCH
    return TensorDataset(torch.randn(n, FEATURES, generator=g), torch.randint(0, 10, (n,), generator=g))


def _hybrid_fit(layout: tuple[int, int] | None) -> dict[str, torch.Tensor] | None:
    from lit_parallel import HybridParallelStrategy

    L.seed_everything(11, verbose=False)
    module = ImageClassifier(net=mlp(in_features=FEATURES, hidden=32, depth=3), lr=1e-2, optimizer="adamw")
    pruning = MagnitudePruning(0.8, start_step=2, end_step=10, every_n_steps=4, make_permanent=False)
    common = dict(accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[pruning])
    if layout is None:
        order = global_batch_order(STEPS * GLOBAL_BATCH, 1, GLOBAL_BATCH, seed=11)
        loader = DataLoader(_hybrid_data(), batch_size=GLOBAL_BATCH, sampler=order)
        L.Trainer(devices=1, **common).fit(module, loader)
        return {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    tp, pp = layout
    strategy = HybridParallelStrategy(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=1,
                                      num_microbatches=2)
    L.Trainer(devices=tp * pp, strategy=strategy, **common).fit(
        module, DataLoader(_hybrid_data(), batch_size=GLOBAL_BATCH, shuffle=True))
    return strategy.export_state_dict()


def test_magnitude_pruning_under_hybrid_strategy_matches_one_process(ranks):
    reference = _hybrid_fit(None)
    zeros = sum(int((v == 0).sum()) for k, v in reference.items() if k.endswith("weight"))
    total = sum(v.numel() for k, v in reference.items() if k.endswith("weight"))
    assert abs(zeros / total - 0.8) < 0.005
    for layout in ("tp=2", "pp=2"):
        state = ranks[0][layout]
        for name, value in reference.items():
            if name.endswith("weight"):
                assert torch.equal(state[name] == 0, value == 0), f"{layout}: mask of {name} differs"
            torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=f"{layout}: {name}")


def _every_case() -> dict[str, object]:
    """All 2-rank cases in one process group: Lightning fits first (they create the group), then the
    pure-torch layouts on the same group."""
    return {
        "tp=2": _hybrid_fit((2, 1)),
        "pp=2": _hybrid_fit((1, 2)),
        "dp": _fit_pruned(2),
        "diloco": _fit_pruned(2, DiLoCoStrategy(sync_every=2, outer_momentum=0.5)),
        "misaligned": _refusal(lambda: _fit_pruned(2, LocalSGDStrategy(sync_every=2), every_n_steps=3)),
        "streaming": _refusal(lambda: _fit_pruned(2, DiLoCoStrategy(sync_every=2, fragments=2))),
        "tp": _tensor_parallel_masks(),
        "pp": _pipeline_masks(),
    }


def _refusal(fit: Callable[[], object]) -> str:
    try:
        fit()
    except ConfigurationError as err:
        # The strategy armed its exit watchdog for the failed fit; this process goes on with other cases.
        faulthandler.cancel_dump_traceback_later()
        return str(err)
    return "no error"


def test_mask_updates_off_the_synchronization_steps_are_refused(ranks):
    for result in ranks:
        assert "every_n_steps=3 under LocalSGDStrategy with sync_every=2" in result["misaligned"]
        assert "valid: multiples of 2" in result["misaligned"]
        assert "under Streaming DiLoCo (DiLoCoStrategy with fragments > 1" in result["streaming"]
        assert "valid: fragments=1, overlap_steps=0, fragment_update_alpha=0" in result["streaming"]


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, object]]:
    """Every rank's results of one 2-rank run (spawning ranks is the slow part of these tests)."""
    return run_distributed(_every_case, world_size=2, init_process_group=False, timeout=300)
