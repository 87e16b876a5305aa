"""Gradient compression on a slow network: ranks in network namespaces joined by rate-limited veth links.

Run (root, Linux, iproute2): .venv/bin/python bench/comm_bench.py --ranks 2 --rates 100mbit --steps 40

Topology: one namespace per rank (``lpb-r<i>``, address 10.213.0.<i+1>/24) and a hub namespace
(``lpb-hub``) whose bridge joins them; every rank's veth pair is shaped with ``tc qdisc ... tbf rate R``
in both directions, so each rank has an R full-duplex link, like one NIC per machine. Only private
addresses inside the namespaces are used; the host's network is untouched, and the namespaces are
deleted on exit (also after an error or Ctrl-C).

Each method trains the project's MNIST MLP with ``torch.nn.parallel.DistributedDataParallel`` on gloo
for the same steps from the same seed, SGD with momentum, and reports: median time of the steps after
the warm-up, payload bytes per step (what the compressor handed to collectives), wire bytes per step
(the rank's veth ``tx_bytes``: TCP/IP headers and gloo framing included) and test accuracy at the end.
Methods: ``ddp`` (DDP's built-in all-reduce), our compressors by name, and ``torch_powersgd`` (torch's
``powerSGD_hook``). Prints a markdown table and writes the rows as JSON; with ``--eval-every N`` each row
also holds a time-to-accuracy curve (training seconds so far vs test accuracy), which
``bench/plot_time_to_accuracy.py`` draws.

A method that crashes, hangs or runs past ``--timeout`` becomes a row (``failed: <its error>``,
``timed out after N s at step K``): its processes are killed (``bench/_runner.py``) before the
namespaces are deleted, and the remaining methods still run.

Workloads (``--model``): ``mlp`` (MNIST, SGD with momentum) or ``minilm`` (the ``bert_bbc`` recipe's
all-MiniLM-L6-v2 on BBC News, AdamW; offline packages, see the README's set-up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _netns import Star, tx_bytes  # noqa: E402  (bench/ is the script directory)
from _runner import report_progress, run_processes  # noqa: E402
from _workload import Workload  # noqa: E402

STAR = Star()  # the namespaces lpb-r<i> and lpb-hub, 10.213.0.<i+1>
METHODS = ("ddp", "powersgd", "topk", "int8", "onebit", "torch_powersgd")


def _run_method(args: argparse.Namespace, rate: str, method: str, out: Path) -> dict:
    commands, envs = [], []
    for r in range(args.ranks):
        envs.append(os.environ | {
            "MASTER_ADDR": STAR.address(0), "MASTER_PORT": str(STAR.port), "WORLD_SIZE": str(args.ranks),
            "RANK": str(r), "GLOO_SOCKET_IFNAME": STAR.interface(r), "OMP_NUM_THREADS": "1",
        })
        commands.append(["ip", "netns", "exec", STAR.namespace(r), sys.executable, __file__, "--worker", "--method", method,
                         "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size",
                         str(args.batch_size), "--hidden", str(args.hidden), "--model", args.model, "--eval-every",
                         str(args.eval_every), "--lr-schedule", args.lr_schedule, "--result", str(out)])
    outcome = run_processes(commands, envs=envs, timeout=args.timeout)
    if not outcome.ok:
        return {"rate": rate, "method": method, "error": outcome.status}
    return json.loads(out.read_text()) | {"rate": rate}


def _orchestrate(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise SystemExit("comm_bench needs root (network namespaces and tc).")
    rows = []
    try:
        for rate in args.rates.split(","):
            STAR.teardown(args.ranks)
            STAR.setup(args.ranks, rate)
            with tempfile.TemporaryDirectory() as tmp:
                for method in args.methods.split(","):
                    row = _run_method(args, rate, method, Path(tmp) / f"{method}.json")
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    finally:
        STAR.teardown(args.ranks)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    _print_table(rows, args)


def _print_table(rows: list[dict], args: argparse.Namespace) -> None:
    what = f"MLP hidden={args.hidden}" if args.model == "mlp" else "all-MiniLM-L6-v2 + 5-class head"
    params = next((r["params"] for r in rows if "params" in r), 0)
    print(f"\n{args.ranks} ranks, {what} ({params / 1e6:.2f}M params), "
          f"{args.steps} steps of {args.batch_size} per rank, warm-up {args.warmup}\n")
    print("| link | method | median step s | speed-up | payload MB/step | wire MB/step | test acc |")
    print("|---|---|---|---|---|---|---|")
    base = {r["rate"]: r["step_s"] for r in rows if r["method"] == "ddp" and "step_s" in r}
    for r in rows:
        if "error" in r:
            print(f"| {r['rate']} | {r['method']} | {r['error'][:100]} | | | | |")
            continue
        payload = f"{r['payload_mb']:.3f}" if r["payload_mb"] is not None else "n/a"
        speedup = f"{base[r['rate']] / r['step_s']:.1f}x" if r["rate"] in base else "n/a"
        print(f"| {r['rate']} | {r['method']} | {r['step_s']:.3f} | {speedup} | {payload} | "
              f"{r['wire_mb']:.3f} | {100 * r['test_acc']:.1f} % |")


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lit_parallel.compression import get_compressor

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    work = Workload(args, rank, world)
    model = work.model
    ddp = DistributedDataParallel(model)
    compressor = None
    if args.method == "torch_powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=4,
                                            start_powerSGD_iter=max(2, args.warmup))
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif args.method != "ddp":
        kwargs = {"powersgd": {"rank": 4}, "topk": {"ratio": 0.01}}.get(args.method, {})
        compressor = get_compressor(args.method, warmup_steps=args.warmup, **kwargs)
        ddp.register_comm_hook(*compressor.ddp_comm_hook(model))
    optimizer = work.optimizer
    interface = os.environ["GLOO_SOCKET_IFNAME"]
    times, wire, payload, curve = [], [], [], []
    for step in range(args.steps):
        tx0, t0 = tx_bytes(interface), time.perf_counter()
        optimizer.zero_grad()
        work.loss(ddp, step).backward()
        optimizer.step()
        if work.scheduler is not None:
            work.scheduler.step()
        if compressor is not None:
            compressor.step()
        times.append(time.perf_counter() - t0)
        report_progress(step + 1)
        wire.append(tx_bytes(interface) - tx0)
        if compressor is not None:
            payload.append(compressor.pop_stats().bytes_sent)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            # Time-to-accuracy: training seconds so far (evaluation excluded) and test accuracy.
            if rank == 0:
                curve.append({"step": step + 1, "train_s": sum(times), "test_acc": work.test_accuracy()})
            dist.barrier()
    measured = slice(args.warmup + 1, None)  # after the warm-up, and after DDP's bucket rebuild
    acc = work.test_accuracy() if rank == 0 else 0.0
    curve.append({"step": args.steps, "train_s": sum(times), "test_acc": acc})
    if rank == 0:
        Path(args.result).write_text(json.dumps({
            "method": args.method,
            "model": args.model,
            "ranks": world,
            "steps": args.steps,
            "lr_schedule": args.lr_schedule,
            "params": sum(p.numel() for p in model.parameters()),
            "step_s": statistics.median(times[measured]),
            "train_s": sum(times),
            "payload_mb": statistics.median(payload[measured]) / 1e6 if payload else None,
            "wire_mb": statistics.median(wire[measured]) / 1e6,
            "wire_total_mb": sum(wire) / 1e6,
            "test_acc": acc,
            "curve": curve,
        }))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rates", default="100mbit", help="comma-separated tc rates, e.g. 100mbit,1gbit")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="plain all-reduce steps before compressing")
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--hidden", type=int, default=1024, help="MLP width (2 hidden layers)")
    parser.add_argument("--model", choices=("mlp", "minilm"), default="mlp",
                        help="mlp: MNIST MLP, SGD; minilm: all-MiniLM-L6-v2 on BBC News, AdamW 2e-4")
    parser.add_argument("--lr-schedule", choices=("constant", "linear"), default="constant",
                        help="linear: 10 warm-up steps, then linear decay to 0 at --steps (as the recipes)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="also record test accuracy every N steps (time-to-accuracy curves)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per method")
    parser.add_argument("--json", default="comm_bench.json", help="where the orchestrator writes the rows")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
    else:
        _orchestrate(args)


if __name__ == "__main__":
    main()
