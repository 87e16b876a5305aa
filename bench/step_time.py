"""Median optimizer-step time of MNIST training: HybridParallelStrategy(tp=pp=1) vs Lightning DDP.

Run (2 CPU ranks each, alternating, several repeats):
    .venv/bin/python bench/step_time.py --repeats 3 --steps 150
Prints a markdown table and writes bench/results/step_time.json. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _worker(strategy: str, steps: int, out: str) -> None:
    import lightning as L
    import torch
    from _timing import StepTimer  # bench/ is the script directory

    from lit_parallel import HybridParallelStrategy
    from lit_parallel.data import MNISTDataModule
    from lit_parallel.models import ImageClassifier, mnist_cnn

    torch.set_num_threads(1)

    L.seed_everything(0, verbose=False)
    timer = StepTimer()
    strat = HybridParallelStrategy() if strategy == "hybrid" else "ddp"
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strat, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[timer])
    trainer.fit(ImageClassifier(net=mnist_cnn(channels=16)), datamodule=MNISTDataModule(batch_size=128))
    if trainer.is_global_zero:
        Path(out).write_text(json.dumps(timer.times[10:]))  # skip warm-up steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--worker", choices=["hybrid", "ddp"])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.steps, args.out)
        return
    results: dict[str, list[float]] = {"hybrid": [], "ddp": []}
    (HERE / "results").mkdir(exist_ok=True)
    for _ in range(args.repeats):
        for name in ("ddp", "hybrid"):
            out = HERE / "results" / f"_{name}.json"
            env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE")}
            subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--out", str(out)],
                           check=True, env=env, capture_output=True)
            results[name].append(statistics.median(json.loads(out.read_text())))
            out.unlink()
    ddp, hybrid = statistics.median(results["ddp"]), statistics.median(results["hybrid"])
    summary = {"ddp_median_step_s": ddp, "hybrid_median_step_s": hybrid, "ratio": hybrid / ddp, "runs": results}
    (HERE / "results" / "step_time.json").write_text(json.dumps(summary, indent=2))
    print("| strategy | median step (ms) |\n|---|---|")
    print(f"| Lightning ddp | {ddp * 1e3:.2f} |\n| HybridParallelStrategy(tp=pp=1) | {hybrid * 1e3:.2f} |")
    print(f"\nratio hybrid/ddp = {hybrid / ddp:.3f}")


if __name__ == "__main__":
    main()
