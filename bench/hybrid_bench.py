"""HybridParallelStrategy measurements: pipeline bubble vs theory, and parameter bytes per rank.

Run:  .venv/bin/python bench/hybrid_bench.py
(the step-time ratio against Lightning DDP is bench/step_time.py). Prints markdown tables and writes
bench/results/hybrid.json. Nothing is asserted: these are measurements, not tests.

Bubble: an 8-layer MLP (width 1024, batch 256) is timed on one process (1 thread) and as 2 pipeline
stages on 2 ranks (1 thread each) with 1F1B for m microbatches. The reference T1(m) is the single
process running the same m microbatches of size 256/m one after the other (gradient accumulation), so
that it pays the same small-matmul and per-microbatch costs. With perfect overlap the pipelined step
takes T1(m)/p; the measured bubble is 1 - (T1(m)/p) / T_pp(m) (it also contains the p2p transfers),
compared with the schedule's ideal (p-1)/(m+p-1).

A measurement that fails or times out (``--timeout`` per multi-process run; the ranks are killed by
``run_distributed``) becomes a row saying so (``bench/_runner.py``) and the others still run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import lightning as L
import torch
from _runner import guarded  # bench/ is the script directory
from _timing import StepTimer
from torch.utils.data import DataLoader, TensorDataset

from lit_parallel import HybridParallelStrategy
from lit_parallel.models import ImageClassifier, mlp
from lit_parallel.parallel.data_parallel import local_tensor
from lit_parallel.testing import run_distributed

WIDTH, DEPTH, BATCH, STEPS = 1024, 8, 256, 12
OUT = Path(__file__).resolve().parent / "results"


def _loader(batch: int = BATCH) -> DataLoader:
    data = TensorDataset(torch.randn(BATCH * STEPS, WIDTH), torch.randint(0, 10, (BATCH * STEPS,)))
    return DataLoader(data, batch_size=batch, shuffle=True)


def _step_time(pp: int, microbatches: int) -> float:
    """Median optimizer-step time; pp=1 runs the microbatches sequentially (gradient accumulation)."""
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = ImageClassifier(net=mlp(in_features=WIDTH, hidden=WIDTH, depth=DEPTH), optimizer="sgd", lr=1e-3)
    timer = StepTimer()
    strategy = (HybridParallelStrategy(pipeline_parallel_size=pp, num_microbatches=microbatches,
                                       pipeline_schedule="1f1b") if pp > 1 else "auto")
    accumulate = microbatches if pp == 1 else 1
    trainer = L.Trainer(accelerator="cpu", devices=pp, strategy=strategy, max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], accumulate_grad_batches=accumulate)
    trainer.fit(module, _loader(BATCH // accumulate))
    steps = [sum(timer.times[i : i + accumulate]) for i in range(0, len(timer.times) - accumulate + 1, accumulate)]
    return statistics.median(steps[2:])


def _param_bytes(tp: int, pp: int) -> tuple[int, int]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from lit_parallel.models import CausalLM

    L.seed_everything(0, verbose=False)
    config = GPT2Config(vocab_size=8192, n_embd=256, n_layer=8, n_head=8, n_positions=64)
    module = CausalLM(GPT2LMHeadModel(config))
    full = sum(p.numel() * p.element_size() for p in module.model.parameters())
    strategy = HybridParallelStrategy(tensor_parallel_size=tp, pipeline_parallel_size=pp, num_microbatches=2)
    seen: list[int] = []

    class _Bytes(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            seen.append(sum(local_tensor(p.data).numel() * p.element_size() for p in pl_module.parameters()))

    ids = torch.randint(0, 8192, (8, 64))
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(64, dtype=torch.long), "labels": ids[i]}
            for i in range(8)]
    trainer = L.Trainer(accelerator="cpu", devices=tp * pp, strategy=strategy, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[_Bytes()])
    trainer.fit(module, DataLoader(data, batch_size=4))
    return seen[0], full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=600, help="seconds per multi-process run")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    t1 = _step_time(1, 1)
    rows = []
    for m in (2, 4, 8, 16):  # 1F1B needs m >= p
        t1m = _step_time(1, m)
        ranks, status = guarded(f"pp=2 m={m}", run_distributed, _step_time, world_size=2, args=(2, m),
                                init_process_group=False, timeout=args.timeout)
        if ranks is None:
            rows.append({"microbatches": m, "single_step_s": t1m, "status": status, "bubble_ideal": 1 / (m + 1)})
            continue
        tpp = ranks[0]
        measured = 1 - (t1m / 2) / tpp
        rows.append({"microbatches": m, "single_step_s": t1m, "step_s": tpp, "bubble_measured": measured,
                     "bubble_ideal": 1 / (m + 1), "status": status})
    print(f"single process step, whole batch: {t1 * 1e3:.1f} ms\n")
    print("| m | T1(m) single process (ms) | pp=2 step (ms) | measured bubble | ideal (p-1)/(m+p-1) |\n"
          "|---|---|---|---|---|")
    for r in rows:
        if "step_s" not in r:
            print(f"| {r['microbatches']} | {r['single_step_s'] * 1e3:.1f} | {r['status']} | | "
                  f"{r['bubble_ideal']:.2f} |")
            continue
        print(f"| {r['microbatches']} | {r['single_step_s'] * 1e3:.1f} | {r['step_s'] * 1e3:.1f} | "
              f"{r['bubble_measured']:.2f} | {r['bubble_ideal']:.2f} |")
    sizes = []
    for tp, pp in ((1, 1), (2, 1), (1, 2), (2, 2)):
        per_rank, status = guarded(f"tp={tp} pp={pp}", run_distributed, _param_bytes, world_size=tp * pp,
                                   args=(tp, pp), init_process_group=False, timeout=args.timeout)
        if per_rank is None:
            sizes.append({"tp": tp, "pp": pp, "status": status})
            continue
        sizes.append({"tp": tp, "pp": pp, "per_rank": [b for b, _ in per_rank], "full": per_rank[0][1],
                      "status": status})
    print("\n| layout | bytes per rank (MiB) | fraction of the full model |\n|---|---|---|")
    for s in sizes:
        if "per_rank" not in s:
            print(f"| tp={s['tp']} pp={s['pp']} | {s['status']} | |")
            continue
        per = ", ".join(f"{b / 2**20:.2f}" for b in s["per_rank"])
        frac = ", ".join(f"{b / s['full']:.2f}" for b in s["per_rank"])
        print(f"| tp={s['tp']} pp={s['pp']} | {per} | {frac} |")
    (OUT / "hybrid.json").write_text(json.dumps({"single_step_s": t1, "bubble": rows, "param_bytes": sizes},
                                                indent=2))


if __name__ == "__main__":
    main()
