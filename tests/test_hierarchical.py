"""Hierarchical all-reduce on 4 gloo ranks as 2 nodes x 2 (``node_size=2``): exact mode against a flat
all-reduce and a single-process mean, PowerSGD between nodes against PowerSGD run on the inter-node pairs with
the node means as inputs, resume, byte accounting by link, the strategies (CompressedDDP, hybrid dp axis,
DiLoCo) against their exact counterparts, and bad input.

Every distributed check of a kind runs inside one ``run_distributed`` call (spawning ranks dominates the cost).
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from lit_parallel import CompressedDDPStrategy, DiLoCoStrategy, HybridParallelStrategy
from lit_parallel.compression import (
    Hierarchical,
    HierarchicalCommStats,
    NoCompression,
    PowerSGD,
    get_compressor,
)
from lit_parallel.errors import ConfigurationError
from lit_parallel.models import ImageClassifier, mlp
from lit_parallel.parallel.compression.hierarchical import assign_owners, plan_hierarchy
from lit_parallel.parallel.local_sgd import DiLoCo
from lit_parallel.testing import run_distributed

WORLD, NODE = 4, 2
ALL = [list(range(WORLD))]
SHAPES = {
    "mixed": [(4, 3), (5,), (2, 2, 2)],
    "unequal": [(7, 3), (1,), (11,), (2, 5, 3), (4, 4)],
    "single": [(6, 5)],  # one tensor: the second rank of each node owns an empty block
}
POWERSGD_SHAPES = [(8, 6), (5,), (6, 4), (3, 3, 2), (10, 7)]  # owners [1, 1, 1, 0, 0]


def _grads(shapes: list[tuple[int, ...]], rank: int, seed: int, integer: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * seed + rank)
    if integer:
        return [torch.randint(-64, 64, shape, generator=g).float() for shape in shapes]
    return [torch.randn(shape, generator=g) for shape in shapes]


def _reduced(compressor: Any, tensors: list[torch.Tensor], group: Any = None, key: str = "b") -> list[torch.Tensor]:
    out = [t.clone() for t in tensors]
    compressor.reduce_(key, out, group)
    return out


# -- pure: owner assignment and group plans ---------------------------------------------------------
def test_assign_owners_is_balanced_and_deterministic():
    assert assign_owners([100, 10, 60, 50], parts=2) == [0, 0, 1, 1]
    assert assign_owners([48, 5, 24, 18, 70], parts=2) == [1, 1, 1, 0, 0]
    assert assign_owners([30], parts=2) == [0]  # owner 1 gets an empty block
    assert assign_owners([], parts=3) == []
    numels = [int(n) for n in torch.randint(1, 1000, (40,), generator=torch.Generator().manual_seed(0))]
    owners = assign_owners(numels, parts=4)
    assert owners == assign_owners(list(numels), parts=4)
    loads = [sum(n for n, o in zip(numels, owners, strict=True) if o == p) for p in range(4)]
    # Greedy largest-first: no load exceeds the mean by more than the largest tensor.
    assert max(loads) - sum(numels) / 4 <= max(numels)


def test_plan_hierarchy_layouts():
    assert plan_hierarchy(ALL, 2, 4) == [([[0, 1], [2, 3]], [[0, 2], [1, 3]])]
    # The dp groups of a tp=2 mesh on 2 nodes of 4: two dp ranks per node.
    assert plan_hierarchy([[0, 2, 4, 6], [1, 3, 5, 7]], 4, 8) == [
        ([[0, 2], [4, 6]], [[0, 4], [2, 6]]), ([[1, 3], [5, 7]], [[1, 5], [3, 7]])]
    assert plan_hierarchy(ALL, 4, 4) == [([[0, 1, 2, 3]], [[0], [1], [2], [3]])]  # one node
    assert plan_hierarchy(ALL, 1, 4) == [([[0], [1], [2], [3]], [[0, 1, 2, 3]])]  # one rank per node


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: plan_hierarchy(ALL, 3, 4), r"node_size=3\) does not divide the world size 4; valid: \[1, 2, 4\]"),
        (lambda: plan_hierarchy([[0, 1, 2]], 2, 4), r"\[0, 1, 2\] \(size 3\) does not split evenly.*\{0: 2, 1: 1\}"),
        (lambda: plan_hierarchy([[0, 1, 1]], 2, 4), r"distinct global ranks in \[0, 4\)"),
        (lambda: Hierarchical(node_size=0), r"node_size=0"),
        (lambda: Hierarchical(node_size="2"), r"node_size='2'"),
        (lambda: Hierarchical(outer="zip"), r"outer='zip'\) is unknown; valid: None or one of \[.*'powersgd'"),
        (lambda: Hierarchical(outer="hierarchical"), r"outer='hierarchical'\) is unknown"),
        (lambda: Hierarchical(outer=Hierarchical()), r"not a compressor for the inter-node exchange"),
        (lambda: Hierarchical(outer=3), r"outer=3\) is not a compressor"),
        (lambda: HybridParallelStrategy(zero_stage=2, gradient_compression=Hierarchical(outer="int8", node_size=4)),
         r"HSDP with data_parallel_shard_size=4 plus gradient_compression=Int8\(.*\) already is this topology"),
        (lambda: HybridParallelStrategy(zero_stage=3, gradient_compression=Hierarchical()),
         r"data_parallel_shard_size=<ranks per node> plus gradient_compression=None"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ConfigurationError, match=match):
        make()


def test_node_size_needed(monkeypatch):
    # Refused before any process-group work: no group exists here.
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with pytest.raises(ConfigurationError, match=r"Pass node_size=<ranks per node>"):
        Hierarchical().setup_groups(ALL)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(ConfigurationError, match=r"LOCAL_WORLD_SIZE='two'"):
        Hierarchical().setup_groups(ALL)


def test_config_state_and_pickling():
    h = Hierarchical(outer=PowerSGD(rank=2), node_size=2)
    assert h.config() == {"outer": {"type": "PowerSGD", **PowerSGD(rank=2).config()}, "node_size": 2}
    assert Hierarchical(outer="none").config() == Hierarchical().config() == {"outer": None, "node_size": None}
    assert get_compressor("hierarchical", outer="int8").config()["outer"]["type"] == "Int8"
    h.step()
    h.outer._memory["q:b:0"] = torch.ones(3, 2)
    state = pickle.loads(pickle.dumps(h.state_dict()))
    target = Hierarchical(outer=PowerSGD(rank=2), node_size=2)
    target.load_state_dict(state)
    assert target.step_count == target.outer.step_count == 1
    assert torch.equal(target.outer._memory["q:b:0"], torch.ones(3, 2))
    with pytest.raises(ConfigurationError, match=r"rank=2.*rank=4"):
        Hierarchical(outer=PowerSGD(rank=4), node_size=2).load_state_dict(state)
    h._plans[(0, 1)] = object()  # stands for this rank's process groups, which do not pickle
    assert pickle.loads(pickle.dumps(h))._plans == {}
    assert isinstance(h.pop_stats(), HierarchicalCommStats)


# -- 4 ranks: exact mode ------------------------------------------------------------------------------
def _exact_checks() -> dict[str, Any]:
    rank = dist.get_rank()
    out: dict[str, Any] = {}
    h = Hierarchical(node_size=NODE)
    h.setup_groups(ALL)
    for name, shapes in SHAPES.items():
        for integer in (True, False):
            grads = _grads(shapes, rank, seed=len(shapes), integer=integer)
            # Single-process reference: every rank draws every rank's gradients and averages them here.
            everyone = [_grads(shapes, r, seed=len(shapes), integer=integer) for r in range(WORLD)]
            mean = [torch.stack([e[i] for e in everyone]).mean(0) for i in range(len(shapes))]
            out[(name, integer)] = (_reduced(h, grads), _reduced(NoCompression(), grads), mean)
    # Bytes by link, for the single (6, 5) tensor: reduce-scatter of 2 padded blocks of 30 + all-gather of 30.
    h.pop_stats()
    _reduced(h, _grads(SHAPES["single"], rank, 0, False))
    out["stats"] = h.pop_stats()
    # Other topologies of the same 4 ranks.
    grads = _grads(SHAPES["unequal"], rank, 1, True)
    flat = _reduced(NoCompression(), grads)
    one_per_node = Hierarchical(node_size=1)  # every rank a node: the outer exchange on the dp group itself
    one_per_node.setup_groups(ALL)
    out["one_per_node"] = (_reduced(one_per_node, grads), flat, one_per_node.pop_stats())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        one_node = Hierarchical(node_size=4)
        one_node.setup_groups(ALL)
    out["one_node"] = (_reduced(one_node, grads), flat, one_node.pop_stats(), [str(w.message) for w in caught])
    # Two dp groups (a tp=2 layout): [0, 2] and [1, 3] each span both nodes with one rank per node.
    strided = Hierarchical(node_size=NODE)
    strided.setup_groups([[0, 2], [1, 3]])
    pair = [dist.new_group(members) for members in ([0, 2], [1, 3])][rank % NODE]
    out["strided"] = (_reduced(strided, grads, pair), _reduced(NoCompression(), grads, pair))
    # Node size: the argument, else the strategy's default, else LOCAL_WORLD_SIZE (the harness sets 4).
    explicit, default, env = Hierarchical(node_size=NODE), Hierarchical(), Hierarchical()
    explicit.setup_groups(ALL, default_node_size=4)
    default.setup_groups(ALL, default_node_size=NODE)
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    env.setup_groups(ALL)
    out["node_sizes"] = (explicit.node_size_in_use, default.node_size_in_use, env.node_size_in_use)
    # Misuse, refused on every rank before any collective.
    try:
        Hierarchical(node_size=3).setup_groups(ALL)
    except ConfigurationError as err:
        out["bad_node_size"] = str(err)
    try:
        h.reduce_("b", grads, pair)
    except RuntimeError as err:
        out["not_set_up"] = str(err)
    return out


def _ddp_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 24), torch.nn.ReLU(),
                               torch.nn.Linear(24, 4))


def _ddp_train(blocking: bool) -> torch.Tensor:
    model = _ddp_net()
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.002)  # several buckets
    compressor = Hierarchical(outer=PowerSGD(rank=2, warmup_steps=1), node_size=NODE)
    compressor.setup_groups(ALL)
    ddp.register_comm_hook(*compressor.ddp_comm_hook(model, blocking=blocking))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + dist.get_rank())
    for _ in range(4):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(ddp(torch.randn(8, 12, generator=gen)),
                                          torch.randint(0, 4, (8,), generator=gen)).backward()
        optimizer.step()
        compressor.step()
    compressor.close()
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def _checks() -> dict[str, Any]:
    return {"exact": _exact_checks(), "powersgd": _powersgd_checks(steps=5, resume_at=2),
            "ddp_hook": (_ddp_train(blocking=True), _ddp_train(blocking=False))}


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    # One spawn for the exact and the PowerSGD checks: starting 4 processes is the slow part.
    return run_distributed(_checks, world_size=WORLD, timeout=300)


@pytest.fixture(scope="module")
def exact(results) -> list[dict[str, Any]]:
    return [rank["exact"] for rank in results]


@pytest.mark.slow
def test_exact_equals_flat_all_reduce(exact):
    for name in SHAPES:
        for rank in exact:
            hier, flat, mean = rank[(name, True)]
            assert all(torch.equal(a, b) for a, b in zip(hier, flat, strict=True)), name  # integer-valued: bitwise
            assert all(torch.equal(a, b) for a, b in zip(hier, mean, strict=True)), name
            hier, flat, mean = rank[(name, False)]
            for a, b, c in zip(hier, flat, mean, strict=True):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)
            # Replicas bitwise identical.
            assert all(torch.equal(a, b) for a, b in zip(rank[(name, False)][0], exact[0][(name, False)][0], strict=True))


@pytest.mark.slow
def test_bytes_by_link(exact):
    for rank, result in enumerate(exact):
        stats = result["stats"]
        assert stats.intra_node_bytes_sent == (2 * 30 + 30) * 4
        # Local rank 0 owns the tensor and exchanges it (an exact all-reduce of 30 fp32); local rank 1 sends nothing.
        assert stats.inter_node_bytes_sent == (30 * 4 if rank % NODE == 0 else 0)
        assert stats.bytes_sent == stats.intra_node_bytes_sent + stats.inter_node_bytes_sent
        assert stats.bytes_uncompressed == 30 * 4 and stats.calls == 1


@pytest.mark.slow
def test_degenerate_topologies(exact):
    numel = sum(torch.Size(s).numel() for s in SHAPES["unequal"])
    for rank, result in enumerate(exact):
        hier, flat, stats = result["one_per_node"]
        assert all(torch.equal(a, b) for a, b in zip(hier, flat, strict=True))
        assert stats.inter_node_bytes_sent == stats.bytes_sent == numel * 4 and stats.intra_node_bytes_sent == 0
        hier, flat, stats, caught = result["one_node"]
        assert all(torch.equal(a, b) for a, b in zip(hier, flat, strict=True))
        assert stats.intra_node_bytes_sent == stats.bytes_sent == numel * 4 and stats.inter_node_bytes_sent == 0
        assert any("[0, 1, 2, 3] lies on one node" in m and "reduces to a flat one" in m for m in caught), caught
        hier, pair_mean = result["strided"]
        assert all(torch.equal(a, b) for a, b in zip(hier, pair_mean, strict=True))
        assert result["node_sizes"] == (2, 2, 2)
        assert "node_size=3) does not divide the world size 4" in result["bad_node_size"]
        if rank in (0, 2):
            assert "ranks [0, 2], which setup_groups did not set up" in result["not_set_up"]
            assert "call compressor.setup_groups(" in result["not_set_up"]


# -- 4 ranks: PowerSGD between nodes ----------------------------------------------------------------
def _powersgd_checks(steps: int, resume_at: int) -> dict[str, Any]:
    rank, local = dist.get_rank(), dist.get_rank() % NODE

    def make() -> Hierarchical:
        # node_size=None: the node size comes from setup_groups, as the strategies hand it over.
        return Hierarchical(outer=PowerSGD(rank=2, warmup_steps=1))

    h = make()
    h.setup_groups(ALL, default_node_size=NODE)
    # Reference: PowerSGD itself on the inter-node pair of this local index, fed the node means of the owned
    # tensors (computed here from every rank's gradients; a + b is bitwise b + a, so the means match exactly).
    pair = [dist.new_group(members) for members in ([0, 2], [1, 3])][local]
    ref = PowerSGD(rank=2, warmup_steps=1)
    owners = assign_owners([torch.Size(s).numel() for s in POWERSGD_SHAPES], NODE)
    mine = [i for i, o in enumerate(owners) if o == local]
    node = rank // NODE
    out: dict[str, Any] = {"hier": [], "ref": [], "mean": [], "resumed": [], "inter": []}
    resumed = None
    for step in range(steps):
        grads = _grads(POWERSGD_SHAPES, rank, 10 + step, integer=False)
        everyone = [_grads(POWERSGD_SHAPES, r, 10 + step, integer=False) for r in range(WORLD)]
        node_mean = [everyone[NODE * node][i] / NODE + everyone[NODE * node + 1][i] / NODE for i in mine]
        out["mean"].append([torch.stack([e[i] for e in everyone]).mean(0) for i in range(len(POWERSGD_SHAPES))])
        out["hier"].append(_reduced(h, grads))
        out["ref"].append(dict(zip(mine, _reduced(ref, node_mean, pair), strict=True)))
        out["inter"].append(h.pop_stats().inter_node_bytes_sent)
        if resumed is not None:
            out["resumed"].append(_reduced(resumed, grads))
            resumed.step()
        h.step()
        ref.step()
        if step + 1 == resume_at:
            buffer = io.BytesIO()
            torch.save(h.state_dict(), buffer)  # as in a checkpoint: loaded with weights_only
            buffer.seek(0)
            state = torch.load(buffer, weights_only=True)
            resumed = make()
            resumed.load_state_dict(state)
            resumed.setup_groups(ALL, default_node_size=NODE)
            try:
                mismatched = make()
                mismatched.load_state_dict(state)
                mismatched.setup_groups(ALL, default_node_size=1)
            except ConfigurationError as err:
                out["mismatch"] = str(err)
    return out


@pytest.fixture(scope="module")
def powersgd(results) -> list[dict[str, Any]]:
    return [rank["powersgd"] for rank in results]


@pytest.mark.slow
def test_powersgd_between_nodes_equals_reference(powersgd):
    steps = len(powersgd[0]["hier"])
    for step in range(steps):
        for rank, result in enumerate(powersgd):
            hier = result["hier"][step]
            assert all(torch.equal(a, b) for a, b in zip(hier, powersgd[0]["hier"][step], strict=True))  # replicas
            # Every tensor equals the reference result of the rank that owns it (on either node).
            for peer in powersgd:
                for i, expected in peer["ref"][step].items():
                    assert torch.equal(hier[i], expected), (step, rank, i)
        if step == 0:  # the outer's warm-up: hierarchical and exact
            for a, b in zip(powersgd[0]["hier"][0], powersgd[0]["mean"][0], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:  # compressed: the (10, 7) matrix is a rank-2 approximation, no longer the mean
            assert not torch.allclose(powersgd[0]["hier"][step][4], powersgd[0]["mean"][step][4], atol=1e-3)
    # Local rank 0 owns (3, 3, 2) and (10, 7): exact 88 fp32 in the warm-up, then 18 dense + 34 factor elements.
    assert powersgd[0]["inter"] == [88 * 4] + [(18 + 10 * 2 + 7 * 2) * 4] * (steps - 1)


@pytest.mark.slow
def test_powersgd_resume_is_exact(powersgd):
    for result in powersgd:
        resumed = result["resumed"]
        assert len(resumed) == 3
        for got, expected in zip(resumed, result["hier"][2:], strict=True):
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        assert "saved with 2 ranks per node, this run has node_size=1" in result["mismatch"]


@pytest.mark.slow
def test_ddp_hook_async_equals_blocking(results):
    # The asynchronous hook runs the hierarchical exchange (three groups' collectives) on the compressor's thread.
    for result in results:
        blocking, overlapped = result["ddp_hook"]
        assert torch.equal(blocking, overlapped)
        assert torch.equal(overlapped, results[0]["ddp_hook"][1])  # replicas
    assert not torch.equal(results[0]["ddp_hook"][0], _ddp_initial())


def _ddp_initial() -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(_ddp_net().parameters()).detach().clone()


# -- 4 ranks: the strategies --------------------------------------------------------------------------
FEATURES, BATCH, STEPS = 12, 4, 4  # DiLoCo's round every 2 steps ends the run


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = WORLD * BATCH * STEPS
    data = TensorDataset(torch.randn(n, FEATURES, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=BATCH, shuffle=True)


def _fit(strategy: Any) -> tuple[torch.Tensor, Any]:
    L.seed_everything(7, verbose=False)
    model = ImageClassifier(net=mlp(in_features=FEATURES, hidden=16, depth=1), optimizer="sgd", lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=STEPS, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  ).fit(model, _loader())
    one_node = any("lies on one node" in str(w.message) for w in caught)
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone(), one_node


def _strategy_checks() -> dict[str, Any]:
    def hier(**kwargs: Any) -> Hierarchical:
        return Hierarchical(node_size=NODE, **kwargs)

    def used(compressor: Hierarchical) -> tuple[int | None, int, bool]:
        stats = compressor.pop_stats()
        return compressor.node_size_in_use, stats.calls, stats.intra_node_bytes_sent > 0 < stats.inter_node_bytes_sent

    out: dict[str, Any] = {}
    ddp = CompressedDDPStrategy(compression=hier())
    out["ddp"] = (_fit(DDPStrategy())[0], _fit(ddp)[0], *used(ddp.compressor))
    default = CompressedDDPStrategy(compression=Hierarchical(outer="powersgd"))  # node size: devices per node (4)
    out["ddp_default"] = (_fit(default)[1], default.compressor.node_size_in_use)
    hybrid = HybridParallelStrategy(gradient_compression=hier())
    out["hybrid"] = (_fit(HybridParallelStrategy())[0], _fit(hybrid)[0], *used(hybrid.compressor))
    diloco = DiLoCoStrategy(sync_every=2, compression=hier())
    out["diloco"] = (_fit(DiLoCoStrategy(sync_every=2))[0], _fit(diloco)[0], *used(diloco.compressor))
    # The overlapped round runs the compressor in a background thread, on the groups made at setup.
    overlapped = DiLoCoStrategy(sync_every=2, overlap=True, compression=hier())
    out["diloco_overlap"] = (_fit(DiLoCoStrategy(sync_every=2, overlap=True))[0], _fit(overlapped)[0],
                             *used(overlapped.compressor))
    sync = HybridParallelStrategy(data_parallel_sync=DiLoCo(sync_every=2), gradient_compression=hier())
    out["hybrid_diloco"] = (_fit(HybridParallelStrategy(data_parallel_sync=DiLoCo(sync_every=2)))[0], _fit(sync)[0],
                            *used(sync.compressor))
    zero1 = HybridParallelStrategy(zero_stage=1, data_parallel_shard_size=2, gradient_compression=hier())
    out["hybrid_zero1"] = (_fit(HybridParallelStrategy(zero_stage=1, data_parallel_shard_size=2))[0], _fit(zero1)[0],
                           *used(zero1.compressor))
    return out


@pytest.fixture(scope="module")
def strategies() -> list[dict[str, Any]]:
    return run_distributed(_strategy_checks, world_size=WORLD, init_process_group=False, timeout=480)


@pytest.mark.slow
@pytest.mark.parametrize("name, calls", [("ddp", STEPS), ("hybrid", STEPS), ("hybrid_zero1", STEPS),
                                         ("diloco", STEPS // 2), ("hybrid_diloco", STEPS // 2)])
def test_strategy_with_exact_hierarchical_equals_flat(strategies, name, calls):
    for result in strategies:
        flat, hier, node_size, hier_calls, both_links = result[name]
        # The hierarchical exchange ran (one bucket per step; DiLoCo: one per round) over both kinds of link.
        assert (node_size, hier_calls, both_links) == (NODE, calls, True)
        assert not torch.equal(flat, _initial())  # it trained
        assert (hier - flat).abs().max() <= 1e-6, (name, (hier - flat).abs().max())
        assert torch.equal(hier, strategies[0][name][1])  # replicas bitwise identical


@pytest.mark.slow
def test_overlapped_diloco_round_through_hierarchical(strategies):
    # overlap=True applies each round's average one round late: round 1's exchange completes at round 2.
    for result in strategies:
        flat, hier, node_size, calls, both_links = result["diloco_overlap"]
        assert (node_size, calls, both_links) == (NODE, STEPS // 2, True)
        assert not torch.equal(flat, _initial())
        assert (hier - flat).abs().max() <= 1e-6


@pytest.mark.slow
def test_strategy_default_node_size_is_devices_per_node(strategies):
    for result in strategies:
        assert result["ddp_default"] == (True, WORLD)  # Trainer(devices=4) is one node: warned, flat PowerSGD


def _initial() -> torch.Tensor:
    L.seed_everything(7, verbose=False)
    model = ImageClassifier(net=mlp(in_features=FEATURES, hidden=16, depth=1), optimizer="sgd", lr=0.05)
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
