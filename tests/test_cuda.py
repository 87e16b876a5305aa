"""What runs on a CUDA device (skipped elsewhere; ``bench/gpu_check.sh`` runs this file on a GPU).

Not yet executed on a GPU: see docs/benchmarks.md ("GPU readiness").
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cli_trains_mnist_on_one_gpu_with_nccl(compose_cfg):
    from lit_parallel.cli import train

    # trainer=gpu and strategy=ddp: one rank, an NCCL process group, the model and batches on cuda:0.
    result = train(compose_cfg("recipe=mnist_debug", "trainer=gpu", "trainer.devices=1"))
    assert result["global_step"] == 5
    assert math.isfinite(result["test/loss"])


def test_bf16_causal_lm_on_gpu_matches_fp32_on_cpu():
    from lit_parallel.models.loading import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm("llama_debug").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    with torch.no_grad():
        reference = model(input_ids=ids, labels=ids).loss.item()
        loss = model.to("cuda", torch.bfloat16)(input_ids=ids.cuda(), labels=ids.cuda()).loss.item()
    assert abs(loss - reference) < 0.02 * reference, (loss, reference)


def test_compressor_reduces_cuda_gradients_in_a_one_rank_nccl_group(tmp_path):
    import torch.distributed as dist

    from lit_parallel.compression import get_compressor

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        compressor = get_compressor("none")
        grads = [torch.randn(64, 32, device="cuda"), torch.randn(32, device="cuda")]
        expected = [g.clone() for g in grads]
        compressor.reduce_("bucket0", grads, dist.group.WORLD)
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want)  # the mean over one rank is the gradient itself
        assert compressor.pop_stats().bytes_sent == (64 * 32 + 32) * 4
    finally:
        dist.destroy_process_group()
