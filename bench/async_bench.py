"""DiLoCo and local SGD against DDP on a slow network: bytes, wall-clock time and accuracy of a short run.

Run (root, Linux, iproute2)::

    .venv/bin/python bench/async_bench.py --ranks 2 --rate 100mbit --epochs 1 --methods ddp,diloco,diloco_overlap

Uses the rate-limited network namespaces of ``bench/comm_bench.py`` (one namespace per rank, joined by
veth links shaped with ``tc ... tbf``). Each method trains the project's MNIST MLP on gloo from the same
seed and data order, SGD (lr 0.05, momentum 0.9) as the (inner) optimizer, ``batch_size`` images per
rank and step: ``ddp`` (torch ``DistributedDataParallel``), ``local_sgd`` (parameters averaged every H
steps), ``diloco`` and ``diloco_overlap`` (:class:`~lit_parallel.parallel.local_sgd.DiLoCoState` with
``--outer-lr`` and ``--outer-momentum``, Nesterov). Reported: wall time of the training loop (rank 0),
payload bytes the collectives carried (compressor accounting; DDP: the gradient bytes), wire bytes (the
rank's veth ``tx_bytes``) and test accuracy at the end. Prints a markdown table and writes the rows as JSON.
A method that crashes, hangs or runs past ``--timeout`` becomes a row (``bench/_runner.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _netns import Star, tx_bytes  # noqa: E402
from _runner import report_progress, run_processes  # noqa: E402

STAR = Star()  # comm_bench.py's namespaces

METHODS = ("ddp", "local_sgd", "diloco", "diloco_overlap")


def _run_method(args: argparse.Namespace, method: str, out: Path) -> dict:
    commands, envs = [], []
    for r in range(args.ranks):
        envs.append(os.environ | {
            "MASTER_ADDR": STAR.address(0), "MASTER_PORT": str(STAR.port), "WORLD_SIZE": str(args.ranks),
            "RANK": str(r), "GLOO_SOCKET_IFNAME": STAR.interface(r), "OMP_NUM_THREADS": "1",
        })
        commands.append(["ip", "netns", "exec", STAR.namespace(r), sys.executable, __file__, "--worker", "--method", method,
                         "--epochs", str(args.epochs), "--sync-every", str(args.sync_every), "--batch-size",
                         str(args.batch_size), "--hidden", str(args.hidden), "--outer-lr", str(args.outer_lr),
                         "--outer-momentum", str(args.outer_momentum), "--result", str(out)])
    outcome = run_processes(commands, envs=envs, timeout=args.timeout)
    if not outcome.ok:
        return {"method": method, "error": outcome.status}
    return json.loads(out.read_text()) | {"rate": args.rate}


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lit_parallel.compression import get_compressor
    from lit_parallel.data.mnist import MNIST_MEAN, MNIST_STD, load_mnist
    from lit_parallel.models import mlp
    from lit_parallel.parallel.local_sgd import DiLoCoState, LocalSGDState

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    raw = load_mnist()
    images = ((raw["train_images"].float() / 255 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)
    torch.manual_seed(0)
    model = mlp(hidden=args.hidden, depth=2)
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    net: torch.nn.Module = model
    state: LocalSGDState | None = None
    group = None
    compressor = get_compressor("none")
    if args.method == "ddp":
        net = DistributedDataParallel(model)
        net.register_comm_hook(*compressor.ddp_comm_hook(model))
    elif args.method == "local_sgd":
        state = LocalSGDState(args.sync_every, compressor)
    else:
        if args.method == "diloco_overlap":
            group = dist.new_group(backend="gloo")  # the exchange in flight gets a group of its own
        state = DiLoCoState(params, args.sync_every, args.outer_lr, args.outer_momentum,
                            overlap=args.method == "diloco_overlap", compressor=compressor)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps = args.epochs * (len(images) // (world * args.batch_size))
    interface = os.environ["GLOO_SOCKET_IFNAME"]
    dist.barrier()
    tx0, t0 = tx_bytes(interface), time.perf_counter()
    for step in range(steps):
        epoch, index = divmod(step, len(images) // (world * args.batch_size))
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(epoch))
        start = (index * world + rank) * args.batch_size
        idx = order[start : start + args.batch_size]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(images[idx]), raw["train_labels"][idx]).backward()
        optimizer.step()
        if state is not None:
            state.step(params, group)
        report_progress(step + 1)
    if isinstance(state, DiLoCoState):
        state.close()
    wall, wire = time.perf_counter() - t0, tx_bytes(interface) - tx0
    stats = compressor.pop_stats()
    model.eval()
    with torch.no_grad():
        test = ((raw["test_images"].float() / 255 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)
        acc = (model(test).argmax(1) == raw["test_labels"]).float().mean().item()
    if rank == 0:
        Path(args.result).write_text(json.dumps({
            "method": args.method, "params": numel, "steps": steps, "sync_every": args.sync_every,
            "wall_s": wall, "payload_mb": stats.bytes_sent / 1e6, "wire_mb": wire / 1e6, "test_acc": acc,
        }))
    dist.barrier()
    dist.destroy_process_group()


def _print_table(rows: list[dict], args: argparse.Namespace) -> None:
    ok = [r for r in rows if "error" not in r]
    first = ok[0] if ok else {"params": 0, "steps": "?"}
    print(f"\n{args.ranks} ranks at {args.rate}, MLP hidden={args.hidden} ({first['params'] / 1e6:.2f}M params), "
          f"{first['steps']} steps of {args.batch_size} per rank, H={args.sync_every}, "
          f"outer lr {args.outer_lr}, outer momentum {args.outer_momentum}\n")
    print("| method | wall s | speed-up | payload MB | wire MB | bytes vs DDP | test acc |")
    print("|---|---|---|---|---|---|---|")
    base = next((r for r in ok if r["method"] == "ddp"), None)
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | {r['error'][:100]} | | | | | |")
            continue
        speedup = f"{base['wall_s'] / r['wall_s']:.1f}x" if base else "n/a"
        fewer = f"{base['wire_mb'] / r['wire_mb']:.0f}x fewer" if base and r is not base else "1x"
        print(f"| {r['method']} | {r['wall_s']:.1f} | {speedup} | {r['payload_mb']:.1f} | {r['wire_mb']:.1f} | "
              f"{fewer} | {100 * r['test_acc']:.2f} % |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rate", default="100mbit", help="tc rate of every rank's link, e.g. 100mbit")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--sync-every", type=int, default=32, help="H of local_sgd and diloco")
    parser.add_argument("--outer-lr", type=float, default=0.7, help="DiLoCo's outer learning rate")
    parser.add_argument("--outer-momentum", type=float, default=0.9, help="DiLoCo's outer Nesterov momentum")
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--hidden", type=int, default=256, help="MLP width (2 hidden layers)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per method")
    parser.add_argument("--json", default="async_bench.json", help="where the orchestrator writes the rows")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if os.geteuid() != 0:
        raise SystemExit("async_bench needs root (network namespaces and tc).")
    rows = []
    try:
        STAR.teardown(args.ranks)
        STAR.setup(args.ranks, args.rate)
        with tempfile.TemporaryDirectory() as tmp:
            for method in args.methods.split(","):
                row = _run_method(args, method, Path(tmp) / f"{method}.json")
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        STAR.teardown(args.ranks)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    _print_table(rows, args)


if __name__ == "__main__":
    main()
