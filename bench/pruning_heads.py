"""Inference speed-up and checkpoint size after removing half the attention heads of a random BERT.

Run: .venv/bin/python bench/pruning_heads.py   (CPU, 1 thread; prints a markdown table row)

The model has all-MiniLM-L6-v2's shape (6 layers, 12 heads, hidden 384), random weights: head removal
changes only shapes, so speed and size do not depend on trained values. Timings interleave the two
models and report medians, which keeps a shared machine's noise out of the ratio.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from lit_parallel.callbacks import export_pruned
from lit_parallel.callbacks.head_pruning import head_importance, prune_heads, select_heads

BATCH, SEQ, REPEATS = 8, 128, 15


def _bert() -> transformers.BertForSequenceClassification:
    config = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536, num_labels=5)
    return transformers.BertForSequenceClassification(config).eval()


def _size_mb(model: torch.nn.Module) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        export_pruned(model, tmp)
        return sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors")) / 2**20


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    full, pruned = _bert(), _bert()
    pruned.load_state_dict(full.state_dict())
    ids = torch.randint(0, full.config.vocab_size, (BATCH, SEQ))
    labels = torch.randint(0, 5, (BATCH,))
    scores = head_importance(pruned, [ids] * 2, lambda b: pruned(input_ids=b, labels=labels).loss)
    prune_heads(pruned, select_heads(scores, 0.5))
    times: dict[str, list[float]] = {"full": [], "pruned": []}
    with torch.inference_mode():
        for model in (full, pruned):
            model(input_ids=ids)  # warm-up
        for _ in range(REPEATS):
            for name, model in (("full", full), ("pruned", pruned)):
                start = time.perf_counter()
                model(input_ids=ids)
                times[name].append(time.perf_counter() - start)
    full_ms, pruned_ms = (1000 * statistics.median(times[k]) for k in ("full", "pruned"))
    params = [sum(p.numel() for p in m.parameters()) for m in (full, pruned)]
    sizes = [_size_mb(m) for m in (full, pruned)]
    print("| model | heads | parameters | safetensors MB | latency ms (batch 8 x 128, 1 thread) |")
    print("|---|---|---|---|---|")
    print(f"| full | 72 | {params[0]:,} | {sizes[0]:.1f} | {full_ms:.0f} |")
    print(f"| 50 % heads removed | 36 | {params[1]:,} | {sizes[1]:.1f} | {pruned_ms:.0f} |")
    print(f"speed-up x{full_ms / pruned_ms:.2f}; checkpoint {sizes[1] / sizes[0]:.2f} of the full one")


if __name__ == "__main__":
    main()
