"""GradientSynchronizer: exact averaging over the dp group, overlapped with backward or after it."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lit_parallel.parallel.data_parallel import GradientSynchronizer
from lit_parallel.testing import run_distributed


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def _grads(overlap: bool, accumulate: int) -> dict[str, object]:
    model = _model()
    sync = GradientSynchronizer(model.named_parameters(), bucket_cap_mb=0.5, overlap=overlap)
    torch.manual_seed(1 + dist.get_rank())
    launched_during_backward = []
    for micro in range(accumulate):
        sync.enabled = micro == accumulate - 1  # what block_backward_sync does for accumulation steps
        model(torch.randn(8, 64)).square().mean().backward()
        launched_during_backward.append(len(sync._pending))
    sync.sync()
    return {
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "launched": launched_during_backward,
        "buckets": len(sync.buckets),
        "overlap": sync.overlap,
    }


def _all_cases() -> dict[tuple[bool, int], dict[str, object]]:
    return {(overlap, accumulate): _grads(overlap, accumulate) for overlap in (False, True) for accumulate in (1, 2)}


def _single_process_reference(accumulate: int) -> dict[str, torch.Tensor]:
    model = _model()
    for rank in range(2):
        torch.manual_seed(1 + rank)
        for _ in range(accumulate):
            (model(torch.randn(8, 64)).square().mean() / 2).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_overlapped_sync_launches_during_backward_and_equals_the_serial_sync():
    results = run_distributed(_all_cases, world_size=2)
    for accumulate in (1, 2):
        serial = [r[(False, accumulate)] for r in results]
        overlapped = [r[(True, accumulate)] for r in results]
        reference = _single_process_reference(accumulate)
        assert overlapped[0]["overlap"] and overlapped[0]["buckets"] > 1
        # Every bucket was sent from a gradient hook before backward returned; none during accumulation.
        assert overlapped[0]["launched"] == [0] * (accumulate - 1) + [overlapped[0]["buckets"]]
        assert serial[0]["launched"] == [0] * accumulate
        for name, grad in reference.items():
            for rank in range(2):
                torch.testing.assert_close(overlapped[rank]["grads"][name], serial[rank]["grads"][name],
                                           rtol=0, atol=0)
                torch.testing.assert_close(overlapped[rank]["grads"][name], grad, rtol=1e-6, atol=1e-7)


def test_compressing_compressor_keeps_the_sync_after_backward():
    from lit_parallel.compression import TopK

    model = _model()
    assert not GradientSynchronizer(model.named_parameters(), compressor=TopK(ratio=0.1), overlap=True).overlap
