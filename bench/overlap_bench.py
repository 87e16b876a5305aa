"""Communication overlap on 2 emulated nodes x 2 ranks (issue 16): all methods side by side, one run.

Run (root, Linux, iproute2), one workload per command, then the plot from both files::

    .venv/bin/python bench/overlap_bench.py --model mnist --rates 100mbit,1gbit --steps 60 \\
        --json bench/results/overlap_mnist.json
    .venv/bin/python bench/overlap_bench.py --model minilm --rates 100mbit,1gbit --steps 40 --batch-size 16 \\
        --json bench/results/overlap_minilm.json
    .venv/bin/python bench/overlap_bench.py --plot bench/results/overlap_mnist.json \\
        bench/results/overlap_minilm.json --out docs/img/step_time_vs_bandwidth.png

A smoke run of a few methods: ``--model mnist --rates 100mbit --steps 6 --warmup 2 --sync-every 4
--methods ddp,diloco``.

Topology (``bench/_netns.py``, prefix ``lpo``): one network namespace per node (``lpo-r<n>``, address
10.214.0.<n+1>), both ranks of a node inside it, the nodes joined through a hub bridge by veth links
shaped with ``tc ... tbf rate R`` at both ends (R full-duplex per node). Every rank binds gloo to its
node's link (``GLOO_SOCKET_IFNAME``); two ranks of one node reach each other at the node's own address,
which Linux routes over the namespace's loopback (unshaped), while cross-node pairs go over the shaped
link. Before the methods of each rate, a probe checks exactly that: an intra-node all-reduce must not
move its bytes over the link (``tx_bytes``), a cross-node send must; otherwise the script stops. Ranks
get ``RANK = node * ranks_per_node + local rank``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``NODE_RANK``,
``WORLD_SIZE`` and ``MASTER_ADDR``/``MASTER_PORT`` (rank 0's node) as a launcher would set them.

Workloads (``bench/_workload.py``): ``mnist`` (the project's MNIST CNN, AdamW) and ``minilm``
(all-MiniLM-L6-v2 on BBC News, AdamW), the same seed and data order for every method, one thread per
rank, raw ``torch.nn.parallel.DistributedDataParallel`` on gloo. Methods (``--methods``):

- ``ddp``: DDP's own all-reduce;
- ``torch_powersgd``, ``torch_batched_powersgd``: torch's ``powerSGD_hook`` / ``batched_powerSGD_hook``
  (``matrix_approximation_rank=4``);
- ``torch_periodic_averager``: torch's post-local SGD as documented: ``post_localSGD_hook`` all-reduces
  gradients inside the node (``new_subgroups(group_size=ranks_per_node)``), ``PeriodicModelAverager``
  averages parameters over all ranks every ``--sync-every`` steps;
- ``torch_hierarchical_averager``: local SGD (``post_localSGD_hook`` without gradient all-reduce) with
  ``HierarchicalModelAverager``: parameters averaged inside the node every ``--sync-every / 4`` steps and
  over all ranks every ``--sync-every`` steps (:func:`torch_hierarchy`);
- ``powersgd_blocking``, ``powersgd_async``: our ``PowerSGD(rank=4)`` hook,
  ``ddp_comm_hook(model, None, blocking=True|False)``;
- ``hier_powersgd``, ``hier_exact``: ``Hierarchical(outer=PowerSGD(rank=4) | NoCompression(),
  node_size=ranks_per_node)`` (:data:`HIERARCHICAL`);
- ``diloco``, ``streaming_diloco``: ``DiLoCoState(params, sync_every=H, ...)`` stepped after every
  optimizer step; streaming: 4 fragments, each exchange applied 1 inner step after its launch
  (:data:`DILOCO`); both send every parameter once per H steps.

The compressors and torch's PowerSGD run ``--warmup`` steps of exact all-reduce first; the averagers start
averaging after ``--warmup`` steps. Reported per method, by rank 0 unless said otherwise: median and mean
step time of the steps after ``--warmup + 1`` (the mean includes the periodic synchronizations that the
median of local SGD / DiLoCo skips), the speed-up of the median against the method's baseline
(:data:`BASELINE`), test accuracy of rank 0's model after the last step, payload bytes per step (what the
compressor handed to collectives; DDP: its gradient bytes; ``n/a`` where torch does not count), inter-node
wire bytes per step (each node's link ``tx_bytes``, averaged over the nodes: TCP/IP headers and gloo framing
included), and for every method the peak of both over the timed steps and their total over all steps;
hierarchical rows also hold the inter-node part of the payload; DiLoCo rows also hold the state's own
``sync_stats`` (exchanges, peak bytes per sync, total bytes). A method that crashes, hangs or runs past
``--timeout`` becomes a row with its first error line (``bench/_runner.py``). Prints a markdown table and
writes the rows as JSON; ``--plot`` draws step time against inter-node bandwidth from such files.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _netns import Star, rate_bytes, tx_bytes  # noqa: E402  (bench/ is the script directory)
from _runner import report_progress, run_processes  # noqa: E402
from _workload import MODELS, Workload  # noqa: E402

STAR = Star(prefix="lpo", subnet="10.214.0", port=29655)  # apart from comm_bench.py's lpb-* namespaces

# The APIs of issue 16 in one place, so that their names can follow a merge (the async hooks and Streaming
# DiLoCo are on main; ``Hierarchical`` is on its way: until then its rows fail with the ImportError).
# Our compressors' DDP hook: keyword arguments of ``compressor.ddp_comm_hook(model, None, **...)``.
HOOK_KWARGS = {"powersgd_blocking": {"blocking": True}, "powersgd_async": {"blocking": False}}
# ``Hierarchical(outer=get_compressor(name, warmup_steps=..., **kwargs), node_size=ranks_per_node)``.
HIERARCHICAL = {"hier_powersgd": ("powersgd", {"rank": 4}), "hier_exact": ("none", {})}
# ``DiLoCoState(params, sync_every=H, outer_lr=..., outer_momentum=..., compressor=..., **kwargs)``.
DILOCO: dict[str, dict[str, Any]] = {"diloco": {}, "streaming_diloco": {"fragments": 4, "overlap_steps": 1}}


def torch_hierarchy(sync_every: int, ranks_per_node: int, world: int) -> OrderedDict[int, int]:
    """``HierarchicalModelAverager``'s ``period_group_size_dict``: the node every H/4 steps, all every H."""
    return OrderedDict([(max(1, sync_every // 4), ranks_per_node), (sync_every, world)])


# The method each one is measured against (speed-up column); ``None``: a baseline.
BASELINE: dict[str, str | None] = {
    "ddp": None,
    "torch_powersgd": "ddp",
    "torch_batched_powersgd": "ddp",
    "torch_periodic_averager": "ddp",
    "torch_hierarchical_averager": "torch_periodic_averager",
    "powersgd_blocking": "ddp",
    "powersgd_async": "powersgd_blocking",
    "hier_exact": "ddp",
    "hier_powersgd": "powersgd_async",
    "diloco": "ddp",
    "streaming_diloco": "diloco",
}
METHODS = tuple(BASELINE)
PROBE = "topology_probe"
PROBE_MB = 16  # per transfer of the topology probe (well above the tbf burst, so its rate is the link's)


# -- one rank ---------------------------------------------------------------------------------------------
@dataclass
class _Method:
    """What the training loop needs of one method.

    Attributes:
        net: what the batches go through (the DDP wrapper, or the model itself).
        after_step: called after every optimizer step (model averaging, DiLoCo's outer step).
        payload: bytes handed to collectives since the last call: a number, the compressor's popped
            ``CommStats`` (a hierarchical one also splits off ``inter_node_bytes_sent``), or ``None``
            where nobody counts them.
        finish: called once after the last step (an exchange still in flight).
        extra: fields of the method's own for the result row, read after ``finish``.
    """

    net: Any
    after_step: Callable[[], None] = lambda: None
    payload: Callable[[], Any] = lambda: None
    finish: Callable[[], None] = lambda: None
    extra: Callable[[], dict[str, Any]] = dict


def _build(args: argparse.Namespace, work: Workload, world: int, ranks_per_node: int) -> _Method:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lit_parallel.compression import get_compressor

    model, method, warmup = work.model, args.method, args.warmup
    if method in DILOCO:
        from lit_parallel.parallel.local_sgd import DiLoCoState

        params = list(model.parameters())
        group = dist.new_group(backend="gloo")  # an exchange in flight gets a group of its own
        compressor = get_compressor("none")
        state = DiLoCoState(params, sync_every=args.sync_every, outer_lr=args.outer_lr,
                            outer_momentum=args.outer_momentum, compressor=compressor, **DILOCO[method])
        stats = state.sync_stats  # the exchanges' own count, by the state

        def sync_fields() -> dict[str, Any]:
            return {"syncs": stats.syncs, "sync_peak_mb": stats.peak_bytes / 1e6,
                    "sync_total_mb": stats.total_bytes / 1e6}

        return _Method(model, lambda: state.step(params, group), compressor.pop_stats, state.close, sync_fields)
    ddp = DistributedDataParallel(model)
    if method == "ddp":
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        return _Method(ddp, payload=lambda: grad_bytes)
    if method in ("torch_powersgd", "torch_batched_powersgd"):
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=4,
                                            start_powerSGD_iter=max(2, warmup))
        batched = method == "torch_batched_powersgd"
        hook = powerSGD_hook.batched_powerSGD_hook if batched else powerSGD_hook.powerSGD_hook
        ddp.register_comm_hook(state, hook)
        return _Method(ddp)
    if method in ("torch_periodic_averager", "torch_hierarchical_averager"):
        from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
            PostLocalSGDState,
            post_localSGD_hook,
        )
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
        from torch.distributed.algorithms.model_averaging.hierarchical_model_averager import (
            HierarchicalModelAverager,
        )

        if method == "torch_periodic_averager":
            # torch's default subgroup is one per machine sized by the CUDA device count: name the node.
            node, _ = dist.new_subgroups(group_size=ranks_per_node)
            hook_state = PostLocalSGDState(process_group=None, subgroup=node, start_localSGD_iter=warmup)
            averager: Any = PeriodicModelAverager(period=args.sync_every, warmup_steps=warmup)
        else:
            hook_state = PostLocalSGDState(process_group=None, subgroup=None, start_localSGD_iter=warmup,
                                           post_local_gradient_allreduce=False)
            averager = HierarchicalModelAverager(torch_hierarchy(args.sync_every, ranks_per_node, world),
                                                 warmup_steps=warmup)
        ddp.register_comm_hook(hook_state, post_localSGD_hook)
        return _Method(ddp, lambda: averager.average_parameters(model.parameters()))
    if method in HIERARCHICAL:
        from lit_parallel.compression import Hierarchical

        name, kwargs = HIERARCHICAL[method]
        outer = get_compressor(name, warmup_steps=warmup, **kwargs)
        compressor = Hierarchical(outer=outer, node_size=ranks_per_node)
        if hasattr(compressor, "setup_groups"):
            compressor.setup_groups([list(range(world))])
        ddp.register_comm_hook(*compressor.ddp_comm_hook(model))
    elif method in HOOK_KWARGS:
        compressor = get_compressor("powersgd", rank=4, warmup_steps=warmup)
        ddp.register_comm_hook(*compressor.ddp_comm_hook(model, None, **HOOK_KWARGS[method]))
    else:
        raise AssertionError(f"method {method!r} has no builder")  # main() accepts only METHODS
    return _Method(ddp, compressor.step, compressor.pop_stats)


def _probe(args: argparse.Namespace, rank: int, world: int, ranks_per_node: int, interface: str) -> None:
    """Intra-node all-reduce, then a cross-node send: how many bytes each moved over this node's link."""
    import torch
    import torch.distributed as dist

    node, _ = dist.new_subgroups(group_size=ranks_per_node)
    tensor = torch.ones(PROBE_MB * 2**20 // 4)
    dist.barrier()
    tx0 = tx_bytes(interface)
    dist.all_reduce(tensor, group=node)
    dist.barrier()
    tx1, t1 = tx_bytes(interface), time.perf_counter()
    if rank == 0:
        dist.send(tensor, dst=ranks_per_node)  # local rank 0 of node 1
    elif rank == ranks_per_node:
        dist.recv(tensor, src=0)
    dist.barrier()
    seconds, tx2 = time.perf_counter() - t1, tx_bytes(interface)
    local = [tx1 - tx0, tx2 - tx1, seconds]
    rows: list[Any] = [None] * world
    dist.all_gather_object(rows, local)
    if rank == 0:
        Path(args.result).write_text(json.dumps({
            "method": PROBE, "mb": PROBE_MB,
            "intra_node_link_mb": [rows[n * ranks_per_node][0] / 1e6 for n in range(world // ranks_per_node)],
            "cross_node_link_mb": [rows[n * ranks_per_node][1] / 1e6 for n in range(world // ranks_per_node)],
            "cross_node_s": seconds,
        }))
    dist.barrier()
    dist.destroy_process_group()


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ranks_per_node, local_rank = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    interface = os.environ["GLOO_SOCKET_IFNAME"]
    if args.method == PROBE:
        _probe(args, rank, world, ranks_per_node, interface)
        return
    work = Workload(args, rank, world)
    method = _build(args, work, world, ranks_per_node)
    times, payload, inter_payload, wire = [], [], [], []
    dist.barrier()
    for step in range(args.steps):
        tx0, t0 = tx_bytes(interface), time.perf_counter()
        work.optimizer.zero_grad()
        work.loss(method.net, step).backward()
        work.optimizer.step()
        if work.scheduler is not None:
            work.scheduler.step()
        method.after_step()
        times.append(time.perf_counter() - t0)
        report_progress(step + 1)
        wire.append(tx_bytes(interface) - tx0)
        stats = method.payload()
        payload.append(getattr(stats, "bytes_sent", stats))
        inter_payload.append(getattr(stats, "inter_node_bytes_sent", None))
    t0 = time.perf_counter()
    method.finish()
    finish_s = time.perf_counter() - t0
    # Per-step link bytes as local rank 0 of each node saw them (the node's two ranks share the link).
    wires: list[Any] = [None] * world
    dist.all_gather_object(wires, wire if local_rank == 0 else None)
    acc = work.test_accuracy() if rank == 0 else 0.0
    if rank == 0:
        measured = slice(args.warmup + 1, None)  # after the warm-up, and after DDP's bucket rebuild
        per_node = [w for w in wires if w is not None]
        counted = None not in payload
        Path(args.result).write_text(json.dumps({
            "method": args.method,
            "model": args.model,
            "workload": work.description,
            "nodes": len(per_node),
            "ranks_per_node": ranks_per_node,
            "steps": args.steps,
            "warmup": args.warmup,
            "sync_every": args.sync_every,
            "batch_size": args.batch_size,
            "params": sum(p.numel() for p in work.model.parameters()),
            "step_ms": 1e3 * statistics.median(times[measured]),
            "mean_step_ms": 1e3 * statistics.mean(times[measured]),
            "train_s": sum(times) + finish_s,
            "payload_mb": statistics.mean(payload[measured]) / 1e6 if counted else None,
            "payload_peak_mb": max(payload[measured]) / 1e6 if counted else None,
            "payload_total_mb": sum(payload) / 1e6 if counted else None,
            "inter_node_payload_mb": (statistics.mean(inter_payload[measured]) / 1e6
                                      if None not in inter_payload else None),
            "wire_mb": statistics.mean(statistics.mean(w[measured]) for w in per_node) / 1e6,
            "wire_peak_mb": max(max(w[measured]) for w in per_node) / 1e6,
            "wire_total_mb": statistics.mean(sum(w) for w in per_node) / 1e6,
            "test_acc": acc,
            **method.extra(),
        }))
    dist.barrier()
    dist.destroy_process_group()


# -- the orchestrator -------------------------------------------------------------------------------------
def _run(args: argparse.Namespace, model: str, rate: str, method: str, out: Path) -> dict:
    commands, envs = [], []
    world = args.nodes * args.ranks_per_node
    for rank in range(world):
        node, local = divmod(rank, args.ranks_per_node)
        envs.append(os.environ | {
            "MASTER_ADDR": STAR.address(0), "MASTER_PORT": str(STAR.port), "WORLD_SIZE": str(world),
            "RANK": str(rank), "LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": str(args.ranks_per_node),
            "NODE_RANK": str(node), "GLOO_SOCKET_IFNAME": STAR.interface(node), "OMP_NUM_THREADS": "1",
        })
        commands.append(["ip", "netns", "exec", STAR.namespace(node), sys.executable, __file__, "--worker",
                         "--method", method, "--model", model, "--steps", str(args.steps), "--warmup",
                         str(args.warmup), "--sync-every", str(args.sync_every), "--batch-size",
                         str(args.batch_size), "--hidden", str(args.hidden), "--lr-schedule", args.lr_schedule,
                         "--outer-lr", str(args.outer_lr), "--outer-momentum", str(args.outer_momentum),
                         "--result", str(out)])
    outcome = run_processes(commands, envs=envs, timeout=args.timeout)
    if not outcome.ok:
        return {"model": model, "rate": rate, "method": method, "error": outcome.status}
    return json.loads(out.read_text()) | {"rate": rate}


def _check_topology(args: argparse.Namespace, rate: str, tmp: Path) -> dict:
    """Run the probe; stop unless intra-node traffic stays off the link and cross-node traffic uses it."""
    row = _run(args, "-", rate, PROBE, tmp / "probe.json")
    if "error" in row:
        raise SystemExit(f"topology probe at {rate}: {row['error']}")
    intra, cross = max(row["intra_node_link_mb"]), row["cross_node_link_mb"][0]
    mbit = 8 * row["mb"] * 2**20 / row["cross_node_s"] / 1e6
    print(f"topology at {rate}: intra-node all-reduce of {row['mb']} MiB put {intra:.3f} MB on the shaped links, "
          f"a cross-node send of {row['mb']} MiB put {cross:.3f} MB on node 0's link ({mbit:.0f} Mbit/s)",
          flush=True)
    size = row["mb"] * 2**20 / 1e6
    if intra > 0.05 * size or cross < size:
        raise SystemExit(f"topology probe at {rate}: intra-node traffic must stay off the shaped link and "
                         f"cross-node traffic must use it; got {intra:.3f} MB and {cross:.3f} MB for {size:.2f} MB")
    return row


def _orchestrate(args: argparse.Namespace, models: list[str], rates: list[str], methods: list[str]) -> None:
    if os.geteuid() != 0:
        raise SystemExit("overlap_bench needs root (network namespaces and tc).")
    rows, probes = [], []
    try:
        for rate in rates:
            STAR.teardown(args.nodes)
            STAR.setup(args.nodes, rate)
            with tempfile.TemporaryDirectory() as tmp:
                probes.append(_check_topology(args, rate, Path(tmp)) | {"rate": rate})
                for model in models:
                    for method in methods:
                        row = _run(args, model, rate, method, Path(tmp) / f"{method}.json")
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    finally:
        STAR.teardown(args.nodes)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "method", "result", "plot", "out")}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"settings": settings, "topology": probes, "rows": rows}, indent=1))
    print(markdown_table(rows))
    print(f"\nwrote {args.json}")


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(rows: Sequence[dict]) -> str:
    """The rows as one markdown table: workload x link rate x method.

    Speed-up: the baseline's median step time over the method's (:data:`BASELINE`). Failed methods show
    their status in the step-time column; hierarchical rows add the inter-node part of their payload.
    """
    lines = [
        "| workload | link | method | median step ms | mean step ms | speed-up | test acc | payload MB/step "
        "| inter-node MB/step | peak MB (payload / wire) | total MB (payload / wire) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ok = {(r["model"], r["rate"], r["method"]): r for r in rows if "error" not in r}
    for r in rows:
        head = f"| {r['model']} | {r['rate']} | {r['method']} |"
        if "error" in r:
            lines.append(f"{head} {r['error'][:240]} | | | | | | | |")
            continue
        base_name = BASELINE.get(r["method"])
        base = ok.get((r["model"], r["rate"], base_name)) if base_name else r
        speedup = f"{base['step_ms'] / r['step_ms']:.2f}x vs {base_name or 'itself'}" if base else "n/a"
        payload = _fmt(r["payload_mb"], ".3f")
        if r.get("inter_node_payload_mb") is not None:
            payload += f" (inter-node {r['inter_node_payload_mb']:.3f})"
        lines.append(
            f"{head} {r['step_ms']:.1f} | {r['mean_step_ms']:.1f} | {speedup} | {100 * r['test_acc']:.2f} % | "
            f"{payload} | {r['wire_mb']:.3f} | "
            f"{_fmt(r['payload_peak_mb'], '.3f')} / {r['wire_peak_mb']:.3f} | "
            f"{_fmt(r['payload_total_mb'], '.1f')} / {r['wire_total_mb']:.1f} |"
        )
    return "\n".join(lines)


def plot_step_time_vs_bandwidth(rows: Sequence[dict], output: str | Path) -> Path:
    """Median step time against inter-node bandwidth: one panel per workload, one line per method.

    Args:
        rows: result rows of one or more runs (failed rows are left out).
        output: the PNG to write.

    Returns:
        ``output`` as a path.

    Raises:
        SystemExit: no row holds a measurement.
        ModuleNotFoundError: matplotlib is not installed (``pip install matplotlib``).

    Example::

        rows = [r for f in files for r in json.loads(Path(f).read_text())["rows"]]
        plot_step_time_vs_bandwidth(rows, "docs/img/step_time_vs_bandwidth.png")
    """
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, ScalarFormatter

    ok = [r for r in rows if "error" not in r]
    if not ok:
        raise SystemExit("no measured rows to plot (every method failed, or no files)")
    models = sorted({r["model"] for r in ok}, key=lambda m: MODELS.index(m) if m in MODELS else len(MODELS))
    fig, axes = plt.subplots(1, len(models), figsize=(6.0 * len(models), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for i, method in enumerate(METHODS):  # a method keeps its colour in every panel and file
            points = sorted((8 * rate_bytes(r["rate"]) / 1e6, r["step_ms"]) for r in ok
                            if r["method"] == method and r["model"] == model)
            if points:
                ax.plot(*zip(*points, strict=True), marker="osD^v<>pPX*"[i % 11], markersize=5, label=method,
                        color=f"C{i % 10}", linestyle="-" if i < 10 else "--")
        rates = sorted({8 * rate_bytes(r["rate"]) / 1e6 for r in ok if r["model"] == model})
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(rates, [f"{x / 1000:g} Gbit/s" if x >= 1000 else f"{x:g} Mbit/s" for x in rates])
        ax.minorticks_off()
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # labels also within one decade
        ax.yaxis.set_major_formatter(ScalarFormatter())
        workload = next(r["workload"] for r in ok if r["model"] == model)
        ranks = next(f"{r['nodes']} nodes x {r['ranks_per_node']} ranks" for r in ok if r["model"] == model)
        ax.set_title(f"{workload}\n{ranks}", fontsize=9)
        ax.set_xlabel("inter-node bandwidth")
        ax.set_ylabel("median step time (ms)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def _choices(option: str, text: str, valid: Sequence[str]) -> list[str]:
    names = [n for n in text.split(",") if n]
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise SystemExit(f"{option} {text!r}: unknown {bad or 'empty'}; valid: {', '.join(valid)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist", help=f"comma-separated workloads: {', '.join(MODELS)}")
    parser.add_argument("--rates", default="100mbit,1gbit", help="comma-separated inter-node tc rates")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, in the table's order")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5,
                        help="exact all-reduce steps of the compressors, steps before local SGD; not timed")
    parser.add_argument("--sync-every", type=int, default=16, help="H of the averagers and DiLoCo")
    parser.add_argument("--outer-lr", type=float, default=0.7, help="DiLoCo's outer learning rate")
    parser.add_argument("--outer-momentum", type=float, default=0.9, help="DiLoCo's outer Nesterov momentum")
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--hidden", type=int, default=1024, help="width of the mlp workload")
    parser.add_argument("--lr-schedule", choices=("constant", "linear"), default="constant")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per method")
    parser.add_argument("--json", default="bench/results/overlap.json", help="where the rows go")
    parser.add_argument("--plot", nargs="+", metavar="JSON", help="only draw the plot from these result files")
    parser.add_argument("--out", default="docs/img/step_time_vs_bandwidth.png", help="the plot (with --plot)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.plot:
        rows = [row for name in args.plot for row in json.loads(Path(name).read_text())["rows"]]
        print(f"wrote {plot_step_time_vs_bandwidth(rows, args.out)}")
        return
    models = _choices("--model", args.model, MODELS)
    methods = _choices("--methods", args.methods, METHODS)
    rates = [r for r in args.rates.split(",") if r]
    for rate in rates:
        rate_bytes(rate)
    if args.steps <= args.warmup + 1:
        raise SystemExit(f"--steps {args.steps} must exceed --warmup + 1 = {args.warmup + 1}: nothing would be timed")
    if args.nodes < 2 or args.ranks_per_node < 1:
        raise SystemExit(f"--nodes {args.nodes} --ranks-per-node {args.ranks_per_node}: need >= 2 nodes of >= 1 rank")
    _orchestrate(args, models, rates, methods)


if __name__ == "__main__":
    main()
