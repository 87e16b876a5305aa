"""Training stall per checkpoint, synchronous vs asynchronous, for the ~110M Llama and the SmolLM2-135M shape.

Run (one benchmark at a time; the machine's cores are shared)::

    nice -n 10 .venv/bin/python bench/checkpoint_stall.py --steps 9 --every 3
    .venv/bin/python bench/checkpoint_stall.py --table            # the markdown table from the JSON

One process, fp32, AdamW, micro-batch 1 x ``--seq`` tokens, random init (the stall depends on the state's size,
not on its values). Models: the Llama of ``bench/memory.py`` (vocab 32000, hidden 768, 10 layers, untied, 112.1M
parameters) and the SmolLM2-135M shape (vocab 49152, hidden 576, intermediate 1536, 30 layers, 9 / 3 heads, tied,
134.5M). Each (model, format, mode) trains ``--steps`` steps with a checkpoint after every ``--every``-th:

* formats: ``dcp``, the hybrid strategy's folder (:func:`save_sharded` vs :func:`async_save_sharded` on a
  dedicated gloo group of one rank), and ``file``, the DDP family's single ``torch.save`` file (Lightning's
  ``TorchCheckpointIO`` write vs :class:`~lit_parallel.plugins.AsyncAtomicCheckpointIO`);
* **stall**: the time the save call blocks the training loop (sync: the whole write; async: the CPU copy and,
  for DCP, planning, plus any wait for the previous write still in flight, shown separately), per checkpoint;
* **overlap**: the extra time of the steps that ran while a background write was in flight, over the median
  step without one, per checkpoint (the write competes with training for cores and memory bandwidth);
* **total**: wall time of the run, including the wait for the last write.

Results go to ``bench/results/checkpoint_stall.json``. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results" / "checkpoint_stall.json"
MODELS = {
    "llama_110m": {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 10,
                   "num_attention_heads": 12, "num_key_value_heads": 4, "tie_word_embeddings": False},
    "smollm2_135m": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True},
}


def _build(name: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODELS[name], max_position_embeddings=512))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, vocab: int, seq: int) -> float:
    t0 = time.perf_counter()
    ids = torch.randint(0, vocab, (1, seq))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


class _Saver:
    """One (format, mode): ``save(step)`` blocks as the strategy's save would; ``busy()``; ``finish()``."""

    def __init__(self, fmt: str, asynchronous: bool, model: Any, optimizer: Any, root: Path, group: Any) -> None:
        from lit_parallel.parallel.async_checkpoint import BackgroundCheckpointWriter
        from lit_parallel.parallel.sharded_checkpoint import remove_path

        self.fmt, self.asynchronous, self.model, self.optimizer, self.root, self.group = (
            fmt, asynchronous, model, optimizer, root, group)
        self.writer = BackgroundCheckpointWriter(remove_path)
        self.paths: list[Path] = []
        self.waited: list[float] = []  # time each save spent waiting for the previous background write

    def save(self, step: int) -> None:
        import torch.distributed as dist
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        from lit_parallel.parallel.async_checkpoint import save_file_atomic, stage_to_cpu
        from lit_parallel.parallel.sharded_checkpoint import async_save_sharded, save_sharded

        path = self.root / f"step{step:07d}.ckpt"
        t0 = time.perf_counter()
        self.writer.wait()
        self.waited.append(time.perf_counter() - t0)
        if self.fmt == "dcp":
            state = {"model": get_model_state_dict(self.model),
                     "optimizer_0": get_optimizer_state_dict(self.model, self.optimizer)}
            meta = {"global_step": step}
            if self.asynchronous:
                self.writer.track(async_save_sharded(path, state, meta, is_writer=True, barrier=dist.barrier,
                                                     process_group=self.group))
            else:
                save_sharded(path, state, meta, is_writer=True, barrier=dist.barrier)
        else:
            checkpoint = {"state_dict": self.model.state_dict(), "optimizer_states": [self.optimizer.state_dict()],
                          "global_step": step}
            if self.asynchronous:
                self.writer.submit(save_file_atomic, stage_to_cpu(checkpoint), path)
            else:
                TorchCheckpointIO().save_checkpoint(checkpoint, path)
        self.paths.append(path)
        while len(self.paths) > 2:  # keep 2, as keep_checkpoints does
            self.writer.remove(self.paths.pop(0))

    def busy(self) -> bool:
        return self.writer.pending and not self.writer._pending.done()  # noqa: SLF001 - measurement only

    def finish(self) -> None:
        self.writer.close()


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _run(name: str, fmt: str, asynchronous: bool, model: Any, optimizer: Any, args: argparse.Namespace,
         group: Any) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="ckpt_stall_", dir=args.dir))
    saver = _Saver(fmt, asynchronous, model, optimizer, root, group)
    vocab = MODELS[name]["vocab_size"]
    quiet, overlapped, stalls = [], [], []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        busy = saver.busy()
        seconds = _step(model, optimizer, vocab, args.seq)
        (overlapped if busy or saver.busy() else quiet).append(seconds)
        if step % args.every == 0:
            t0 = time.perf_counter()
            saver.save(step)
            stalls.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    saver.finish()
    final_wait = time.perf_counter() - t0
    total = time.perf_counter() - start
    size = _size(saver.paths[-1])
    shutil.rmtree(root)
    baseline = statistics.median(quiet) if quiet else float("nan")
    overlap = sum(s - baseline for s in overlapped) / max(1, len(stalls))
    return {"model": name, "format": fmt, "mode": "async" if asynchronous else "sync", "steps": args.steps,
            "every": args.every, "seq": args.seq, "checkpoints": len(stalls), "bytes": size,
            "stall_s": statistics.mean(stalls), "stall_max_s": max(stalls), "overlap_s": overlap,
            "wait_previous_s": statistics.mean(saver.waited),
            "step_s": baseline, "final_wait_s": final_wait, "total_s": total, "threads": torch.get_num_threads()}


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | format | mode | checkpoint | stall / ckpt | of which waiting for the previous write | "
             "overlap slowdown / ckpt | step (no write) | total |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['format']} | {r['mode']} | {r['bytes'] / 2**30:.2f} GiB | "
                     f"{r['stall_s']:.2f} s | {r['wait_previous_s']:.2f} s | {r['overlap_s']:+.2f} s | "
                     f"{r['step_s']:.2f} s | {r['total_s']:.1f} s |")
    first = rows[0] if rows else {}
    return "\n".join(lines) + (f"\n\n{first.get('steps')} steps, a checkpoint every {first.get('every')}, "
                               f"1 x {first.get('seq')} tokens, {first.get('threads')} torch threads.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--formats", nargs="+", default=["dcp", "file"], choices=["dcp", "file"])
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: the temp dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--table", action="store_true", help="print the table of the saved JSON and exit")
    args = parser.parse_args()
    if args.table:
        print(_table(json.loads(RESULTS.read_text())))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)
    group = dist.new_group(backend="gloo")  # the strategy's dedicated checkpoint group
    rows = []
    for name in args.models:
        model, optimizer = _build(name)
        _step(model, optimizer, MODELS[name]["vocab_size"], args.seq)  # optimizer state exists from here
        for fmt in args.formats:
            for asynchronous in (False, True):
                rows.append(_run(name, fmt, asynchronous, model, optimizer, args, group))
                print(json.dumps(rows[-1]), flush=True)
        del model, optimizer
    dist.destroy_process_group()
    RESULTS.parent.mkdir(exist_ok=True)
    # Each run replaces its own rows (model, format, mode) and keeps the others.
    mine = {(r["model"], r["format"], r["mode"]) for r in rows}
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    rows = [r for r in old if (r["model"], r["format"], r["mode"]) not in mine] + rows
    rows.sort(key=lambda r: (list(MODELS).index(r["model"]), r["format"], r["mode"] == "async"))
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    print(_table(rows))


if __name__ == "__main__":
    main()
