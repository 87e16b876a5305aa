"""Median optimizer-step time of MNIST training: HybridParallelStrategy(tp=pp=1) vs Lightning DDP.

Run (2 CPU ranks each, alternating, several repeats):
    .venv/bin/python bench/step_time.py --repeats 3 --steps 150
Prints a markdown table and writes bench/results/step_time.json. Not a test: nothing is asserted.
A run that crashes or exceeds --timeout is reported as such (bench/_runner.py) and the others go on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _runner import report_progress, run_processes  # noqa: E402  (bench/ is the script directory)


def _worker(strategy: str, steps: int, out: str) -> None:
    import lightning as L
    import torch
    from _timing import StepTimer

    from lit_parallel import HybridParallelStrategy
    from lit_parallel.data import MNISTDataModule
    from lit_parallel.models import ImageClassifier, mnist_cnn

    torch.set_num_threads(1)

    L.seed_everything(0, verbose=False)
    timer = StepTimer()

    class _Progress(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            report_progress(trainer.global_step)

    strat = HybridParallelStrategy() if strategy == "hybrid" else "ddp"
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strat, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[timer, _Progress()])
    trainer.fit(ImageClassifier(net=mnist_cnn(channels=16)), datamodule=MNISTDataModule(batch_size=128))
    if trainer.is_global_zero:
        Path(out).write_text(json.dumps(timer.times[10:]))  # skip warm-up steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--worker", choices=["hybrid", "ddp"])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.steps, args.out)
        return
    results: dict[str, list[float]] = {"hybrid": [], "ddp": []}
    failures: dict[str, list[str]] = {"hybrid": [], "ddp": []}
    (HERE / "results").mkdir(exist_ok=True)
    for _ in range(args.repeats):
        for name in ("ddp", "hybrid"):
            out = HERE / "results" / f"_{name}.json"
            env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE")}
            command = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--out", str(out)]
            outcome = run_processes([command], envs=[env], timeout=args.timeout)
            if outcome.ok:
                results[name].append(statistics.median(json.loads(out.read_text())))
                out.unlink()
            else:
                print(f"{name}: {outcome.status}", flush=True)
                failures[name].append(outcome.status)
    median = {k: statistics.median(v) if v else None for k, v in results.items()}
    ddp, hybrid = median["ddp"], median["hybrid"]
    ratio = hybrid / ddp if ddp and hybrid else None
    summary = {"ddp_median_step_s": ddp, "hybrid_median_step_s": hybrid, "ratio": ratio, "runs": results,
               "failures": failures}
    (HERE / "results" / "step_time.json").write_text(json.dumps(summary, indent=2))

    def cell(name: str) -> str:
        shown = f"{median[name] * 1e3:.2f}" if median[name] is not None else "n/a"
        return shown + (f" ({len(failures[name])} runs {failures[name][0]})" if failures[name] else "")

    print("| strategy | median step (ms) |\n|---|---|")
    print(f"| Lightning ddp | {cell('ddp')} |\n| HybridParallelStrategy(tp=pp=1) | {cell('hybrid')} |")
    print(f"\nratio hybrid/ddp = {ratio:.3f}" if ratio else "\nratio hybrid/ddp = n/a")


if __name__ == "__main__":
    main()
