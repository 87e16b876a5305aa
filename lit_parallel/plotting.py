"""A picture of a run: training and validation curves, and communication bytes when they were measured.

:func:`plot_curves` reads the ``metrics.csv`` that Lightning's ``CSVLogger`` writes and draws one panel
per quantity against the optimizer step: the losses (``train/loss``, ``val/loss``), every other
training/validation metric that both or either logged (``acc``, ``ppl``, ``f1_macro`` ...), the
bytes a :class:`~lit_parallel.callbacks.CommunicationMonitor` counted per step, and the pruning
sparsity. ``lit-parallel`` calls it at the end of every run (``csv/curves.png``).

matplotlib is optional (the ``dev`` extra): without it no picture is drawn.

Example::

    from lit_parallel.plotting import plot_curves

    plot_curves("outputs/mnist/2026-11-24_10-00-00/csv/metrics.csv")   # writes curves.png next to it
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

__all__ = ["plot_curves", "read_curves"]

_COMM = {"comm/bytes_sent": "sent", "comm/bytes_uncompressed": "uncompressed (exact all-reduce)"}


def read_curves(metrics_csv: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every numeric column of a ``CSVLogger`` file as ``{name: (steps, values)}``, empty cells skipped."""
    curves: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    with open(metrics_csv, newline="") as file:
        for row in csv.DictReader(file):
            step = row.get("step")
            if not step:
                continue
            for name, cell in row.items():
                if name in ("step", "epoch") or not cell:
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue
                if math.isfinite(value):
                    curves[name][0].append(int(float(step)))
                    curves[name][1].append(value)
    return dict(curves)


def _panels(curves: dict[str, tuple[list[int], list[float]]]) -> list[tuple[str, list[str]]]:
    """``(title, curve names)`` per panel: losses, then each train/val metric, then communication."""
    by_metric: dict[str, list[str]] = defaultdict(list)
    for name in sorted(curves):
        stage, _, metric = name.partition("/")
        if stage in ("train", "val") and metric:
            by_metric[metric.removesuffix("_step").removesuffix("_epoch")].append(name)
    panels = [("loss", by_metric.pop("loss"))] if "loss" in by_metric else []
    panels += sorted(by_metric.items())
    comm = [name for name in _COMM if name in curves]
    if comm:
        panels.append(("gradient bytes per step (rank 0)", comm))
    if "pruning/sparsity" in curves:
        panels.append(("sparsity", ["pruning/sparsity"]))
    return panels


def plot_curves(metrics_csv: str | Path, output: str | Path | None = None, title: str | None = None) -> Path | None:
    """Draw the run's curves into a PNG; returns its path, or ``None`` when there is nothing to draw.

    Args:
        metrics_csv: a ``CSVLogger``'s ``metrics.csv``.
        output: the PNG (default: ``curves.png`` next to ``metrics_csv``).
        title: the figure's title (default: the run directory's name).

    Raises:
        ModuleNotFoundError: matplotlib is not installed (``pip install matplotlib``).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    metrics_csv = Path(metrics_csv)
    curves = read_curves(metrics_csv)
    panels = _panels(curves)
    if not panels:
        return None
    output = Path(output) if output else metrics_csv.with_name("curves.png")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            steps, values = curves[key]
            label = _COMM.get(key, key)
            if key.startswith("val/") or len(steps) < 3:
                ax.plot(steps, values, marker="o", markersize=3, label=label)
            else:
                ax.plot(steps, values, linewidth=1, label=label)
        if name == "ppl" or name.startswith("gradient bytes"):
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or metrics_csv.parent.parent.name, fontsize=10)
    fig.tight_layout()
    fig.savefig(output, dpi=80)
    plt.close(fig)
    return output
