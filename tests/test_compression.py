"""Compressors against exact all-reduce on gloo: identical replicas, rounding, error feedback, bad input."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lit_parallel.compression import (
    BF16,
    COMPRESSORS,
    FP16,
    Int8,
    NoCompression,
    OneBit,
    PowerSGD,
    TopK,
    get_compressor,
)
from lit_parallel.errors import ConfigurationError
from lit_parallel.parallel.compression import DDPHookState
from lit_parallel.testing import run_distributed

# Every compressor, compressing from the second step on (the first exercises the warm-up path).
SPECS = [
    ("none", {}),
    ("fp16", {"warmup_steps": 1}),
    ("bf16", {"warmup_steps": 1}),
    ("int8", {"warmup_steps": 1, "chunk_size": 64, "stochastic_rounding": True}),
    ("topk", {"warmup_steps": 1, "ratio": 0.05}),
    ("powersgd", {"warmup_steps": 1, "rank": 2}),
    ("onebit", {"warmup_steps": 1, "chunk_size": 64}),
]
EF_SPECS = [
    ("int8", {"chunk_size": 16}),
    ("topk", {"ratio": 0.1}),
    ("powersgd", {"rank": 1}),
    ("onebit", {"chunk_size": 16}),
]
SHAPES = [(24, 10), (10,), (6, 2, 3, 3), (3,)]


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 32), nn.ReLU(), nn.Linear(32, 4))


def _train_replicas(steps: int) -> dict[str, list[bool]]:
    """Per compressor and step: do all ranks hold bit-identical parameters? (DDP with several buckets)."""
    rank, identical = dist.get_rank(), {}
    for name, kwargs in SPECS:
        torch.manual_seed(0)
        model = _net()
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.01)  # several buckets
        compressor = get_compressor(name, **kwargs)
        ddp.register_comm_hook(*compressor.ddp_comm_hook(model))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        gen = torch.Generator().manual_seed(100 + rank)
        identical[name] = []
        for _ in range(steps):
            x, y = torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen)
            optimizer.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            optimizer.step()
            compressor.step()
            params = nn.utils.parameters_to_vector(model.parameters()).detach()
            gathered = [torch.empty_like(params) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, params)
            identical[name].append(all(torch.equal(gathered[0], g) for g in gathered))
        assert compressor.stats.bytes_sent > 0
    return identical


def _two_rank_checks() -> dict[str, dict]:
    # One spawn for every 2-rank check: starting processes is the slow part on a busy machine.
    return {"replicas": _train_replicas(3), "half": _half_precision_errors(), "ef": _error_feedback(6)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, dict]]:
    return run_distributed(_two_rank_checks, world_size=2, timeout=300)


def test_replicas_stay_bit_identical_on_two_ranks(two_ranks):
    for name, _ in SPECS:
        assert two_ranks[0]["replicas"][name] == [True, True, True], (name, two_ranks[0]["replicas"][name])


def test_replicas_stay_bit_identical_on_four_ranks():
    results = run_distributed(_train_replicas, world_size=4, args=(3,), timeout=300)
    for name, _ in SPECS:
        assert results[0][name] == [True, True, True], (name, results[0][name])


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    return [torch.randn(shape, generator=gen) * (1 + dist.get_rank()) for shape in SHAPES]


def _exact_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    out = [t.double() for t in tensors]
    for t in out:
        dist.all_reduce(t)
    return [t / dist.get_world_size() for t in out]


def _half_precision_errors() -> dict[str, float]:
    """Largest |compressed - exact| over (world * unit roundoff * mean |term|) for FP16 and BF16."""
    ratios = {}
    for compressor, eps in ((FP16(), 2.0**-11), (BF16(), 2.0**-8)):
        grads = _grads(0)
        exact = _exact_mean(grads)
        bound = _exact_mean([t.abs() for t in grads])
        compressor.reduce_("b", grads, None)
        world = dist.get_world_size()
        worst = max(((g.double() - e).abs() / (world * eps * b + 1e-30)).max().item()
                    for g, e, b in zip(grads, exact, bound, strict=True))
        representable = all(torch.equal(g.to(compressor.dtype).float(), g) for g in grads)
        ratios[compressor.name] = worst if representable else float("inf")
    plain = _grads(0)
    NoCompression().reduce_("b", plain, None)
    reference = [t / dist.get_world_size() for t in _grads(0)]
    for t in reference:
        dist.all_reduce(t)
    ratios["none_is_plain_all_reduce"] = float(all(torch.equal(a, b) for a, b in zip(plain, reference, strict=True)))
    return ratios


def test_half_precision_is_within_rounding_of_exact_all_reduce(two_ranks):
    for ratios in (rank["half"] for rank in two_ranks):
        assert ratios["fp16"] <= 1.0 and ratios["bf16"] <= 1.0, ratios
        assert ratios["none_is_plain_all_reduce"] == 1.0


def _residual(compressor, key: str) -> list[torch.Tensor]:
    """The error-feedback memory averaged over ranks, laid out like the gradients."""
    memory = compressor.state_dict()["memory"]
    if isinstance(compressor, PowerSGD):
        parts = [memory.get(f"err:{key}:{i}", torch.zeros(shape)).reshape(shape) for i, shape in enumerate(SHAPES)]
    else:
        parts = list(memory[f"ef:{key}"].split([torch.Size(s).numel() for s in SHAPES]))
        parts = [p.reshape(s) for p, s in zip(parts, SHAPES, strict=True)]
    return _exact_mean(parts)


def _error_feedback(steps: int) -> dict[str, tuple[float, float, float]]:
    """Per compressor: |sum applied + mean residual - sum true| , |sum applied - sum true|, |sum true|."""
    out = {}
    for name, kwargs in EF_SPECS:
        compressor = get_compressor(name, **kwargs)
        applied = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
        true = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
        for step in range(steps):
            grads = _grads(step)
            for acc, t in zip(true, _exact_mean(grads), strict=True):
                acc += t
            compressor.reduce_("bucket", grads, None)
            compressor.step()
            for acc, g in zip(applied, grads, strict=True):
                acc += g.double()
        residual = _residual(compressor, "bucket")
        closed = max((a + r - t).abs().max().item() for a, r, t in zip(applied, residual, true, strict=True))
        gap = max((a - t).abs().max().item() for a, t in zip(applied, true, strict=True))
        out[name] = (closed, gap, max(t.abs().max().item() for t in true))
    return out


def test_error_feedback_carries_the_residual(two_ranks):
    # Sum of applied updates = sum of true mean gradients - the ranks' mean residual, to float32 rounding:
    # nothing the compression dropped is lost, it is only delayed.
    for result in (rank["ef"] for rank in two_ranks):
        for name, (closed, gap, scale) in result.items():
            assert closed <= 1e-4 * scale, (name, closed, scale)
            assert gap > 1e-3 * scale, f"{name} did not compress: applied sum equals true sum"


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: get_compressor("gzip"), "'gzip' is unknown; valid: ['bf16', 'fp16', 'hierarchical', 'int8', 'none'"),
        (lambda: PowerSGD(rank=0), "PowerSGD(rank=0): rank must be an integer >= 1"),
        (lambda: PowerSGD(rank=1.5), "rank=1.5"),
        (lambda: TopK(ratio=0.0), "TopK(ratio=0.0): ratio must be a number in (0, 1]"),
        (lambda: TopK(ratio=1.5), "ratio=1.5"),
        (lambda: Int8(chunk_size=0), "Int8(chunk_size=0)"),
        (lambda: OneBit(chunk_size=12), "multiple of 8"),
        (lambda: FP16(warmup_steps=-1), "FP16(warmup_steps=-1)"),
    ],
)
def test_bad_arguments_raise_configuration_error(make, needle):
    with pytest.raises(ConfigurationError) as err:
        make()
    assert needle in str(err.value)


def test_state_of_another_compressor_is_rejected_naming_both():
    state = PowerSGD(rank=2).state_dict()
    with pytest.raises(ConfigurationError, match=r"PowerSGD\(.*rank=2.*\).*TopK\(.*ratio=0.01"):
        TopK(ratio=0.01).load_state_dict(state)
    with pytest.raises(ConfigurationError, match=r"rank=2.*rank=4"):
        PowerSGD(rank=4).load_state_dict(state)


def test_state_round_trip_and_pickling():
    source = TopK(ratio=0.5, warmup_steps=3)
    source.step()
    source._memory["ef:b"] = torch.arange(4.0)
    target = TopK(ratio=0.5, warmup_steps=3)
    target.load_state_dict(pickle.loads(pickle.dumps(source.state_dict())))
    assert target.step_count == 1 and torch.equal(target._memory["ef:b"], torch.arange(4.0))
    hook_state, _ = PowerSGD().ddp_comm_hook(nn.Linear(2, 2), group=dist.GroupMember.WORLD)
    restored = pickle.loads(pickle.dumps(hook_state))
    assert isinstance(restored, DDPHookState) and restored.process_group is None
    assert set(COMPRESSORS) == {"none", "fp16", "bf16", "int8", "topk", "powersgd", "onebit", "hierarchical"}
