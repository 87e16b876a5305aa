"""Time-to-accuracy curves from the JSON rows of ``bench/comm_bench.py --eval-every N``.

Run: .venv/bin/python bench/plot_time_to_accuracy.py bench/results/comm_mnist_2r.json \
         bench/results/comm_minilm_2r.json --out docs/img/time_to_accuracy.png

One panel per (workload, ranks, link rate); one line per method: test accuracy against the training
seconds spent so far (evaluation excluded), as measured by rank 0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LABELS = {"ddp": "DDP (exact)", "powersgd": "PowerSGD(rank=4)", "topk": "TopK(0.01)", "int8": "Int8",
          "onebit": "OneBit", "fp16": "FP16", "bf16": "BF16", "torch_powersgd": "torch powerSGD_hook"}


def _rate_bits(rate: str) -> float:
    scale = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    return next(float(rate[: -len(unit)]) * f for unit, f in scale.items() if rate.endswith(unit))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="JSON files written by comm_bench.py --json")
    parser.add_argument("--out", default="docs/img/time_to_accuracy.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, int, str, str], list[dict]] = {}
    for name in args.files:
        for row in json.loads(Path(name).read_text()):
            if "curve" in row:
                key = (row["model"], row["ranks"], row["rate"], row.get("lr_schedule", "constant"))
                panels.setdefault(key, []).append(row)
    if not panels:
        raise SystemExit("no rows with a curve (run comm_bench.py with --eval-every N)")
    cols = min(3, len(panels))
    rows_of_panels = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_of_panels, cols, figsize=(5.2 * cols, 4.2 * rows_of_panels), squeeze=False)
    flat_axes = [ax for row in axes for ax in row]
    for ax in flat_axes[len(panels):]:
        ax.set_visible(False)
    ordered = sorted(panels.items(),
                     key=lambda item: (item[0][0] != "mlp", item[0][1], item[0][3], _rate_bits(item[0][2])))
    for ax, ((model, ranks, rate, schedule), rows) in zip(flat_axes, ordered, strict=False):
        for row in rows:
            curve = row["curve"]
            ax.plot([0] + [p["train_s"] for p in curve], [None] + [100 * p["test_acc"] for p in curve],
                    marker="o", markersize=3, label=LABELS.get(row["method"], row["method"]),
                    color=f"C{list(LABELS).index(row['method']) if row['method'] in LABELS else len(LABELS)}")
        workload = "MNIST MLP" if model == "mlp" else "MiniLM, BBC News"
        if schedule != "constant":
            workload += f", {schedule} LR"
        ax.set_title(f"{workload}: {ranks} ranks, {rate.replace('mbit', ' Mbit/s').replace('gbit', ' Gbit/s')}")
        if model == "mlp":
            ax.set_ylim(85, 98)  # the first evaluation of the slowest methods is below; the end matters
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
