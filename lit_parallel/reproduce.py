"""``lit-parallel-reproduce <recipe>``: rerun a recipe and check it against its row of the results table.

The table is ``recipes/results.json`` (``recipes/README.md`` shows the same rows for people): for each
recipe the command, the hardware and wall time it was measured with, one headline metric with its value
and the tolerance within which a rerun must land (absolute), and ``also``: further metrics of the same
run, each ``{"value": ..., "tolerance": ...}``. Every metric of the row is judged: the rerun passes only
when each one is in the run's summary, is a finite number and lies within its tolerance; a missing or
NaN metric fails with its name. The recipe runs as a subprocess of the ``lit-parallel`` console script
(so multi-process strategies launch as they do for users); the metrics are read from the run's
``summary.json`` (which carries ``comm/*`` totals when a
:class:`~lit_parallel.callbacks.CommunicationMonitor` ran).

Usage::

    lit-parallel-reproduce bert_bbc              # runs it, prints one line per metric, PASS or FAIL, exits 0 or 1
    lit-parallel-reproduce --list                # the recipes in the table
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_parallel.cli import conf_dir
from lit_parallel.errors import ConfigurationError

__all__ = ["MetricCheck", "judge", "load_table", "main", "run_recipe"]

_FIELDS = ("recipe", "command", "hardware", "wall_seconds", "metric", "value", "tolerance")


@dataclass(frozen=True)
class MetricCheck:
    """One metric of a table row against a run's summary.

    Args:
        metric: the summary key.
        expected: the table's value.
        tolerance: the largest absolute difference that passes.
        value: the run's value; ``None`` when the summary lacks the metric or it is not a number.
    """

    metric: str
    expected: float
    tolerance: float
    value: float | None

    @property
    def passed(self) -> bool:
        return self.value is not None and math.isfinite(self.value) and abs(self.value - self.expected) <= self.tolerance

    def line(self) -> str:
        """``ok``/``FAIL``, the metric, the run's and the table's values, and why a failure failed."""
        table = f"table {self.expected:.4f} ± {self.tolerance:g}"
        if self.value is None:
            return f"FAIL {self.metric}: missing from the run's summary ({table})"
        if not math.isfinite(self.value):
            return f"FAIL {self.metric} = {self.value} is not finite ({table})"
        verdict = "ok  " if self.passed else "FAIL"
        return f"{verdict} {self.metric} = {self.value:.4f}, {table} (off by {abs(self.value - self.expected):.4g})"


def default_table() -> Path:
    """``results.json`` next to the recipe files."""
    return conf_dir() / "recipe" / "results.json"


def _check_row(path: Path, row: dict[str, Any]) -> None:
    name = row.get("recipe")
    missing = [f for f in _FIELDS if f not in row]
    if missing:
        raise ConfigurationError(f"results table {path}: row {name!r} lacks {missing}.")
    also = row.get("also", {})
    if not isinstance(also, dict):
        raise ConfigurationError(f"results table {path}: row {name!r} has also={also!r}; valid: a mapping "
                                 "{metric: {'value': number, 'tolerance': number}}.")
    for metric, entry in also.items():
        if not (isinstance(entry, dict) and {"value", "tolerance"} <= set(entry)):
            raise ConfigurationError(f"results table {path}: row {name!r}, also[{metric!r}]={entry!r}; "
                                     "valid: {'value': number, 'tolerance': number}.")
    for metric, tolerance in [(row["metric"], row["tolerance"]), *((m, e["tolerance"]) for m, e in also.items())]:
        if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
            raise ConfigurationError(f"results table {path}: row {name!r}, {metric} has tolerance={tolerance!r}; "
                                     "valid: a number >= 0.")


def load_table(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The results table as ``{recipe: row}``.

    Raises:
        ConfigurationError: the file is missing, a row lacks one of the required fields, or one of its
            ``also`` metrics has no value or tolerance.
    """
    path = Path(path) if path else default_table()
    if not path.is_file():
        raise ConfigurationError(f"results table {path} does not exist.")
    rows = json.loads(path.read_text())["results"]
    table = {}
    for row in rows:
        _check_row(path, row)
        table[row["recipe"]] = row
    return table


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def judge(row: dict[str, Any], summary: dict[str, Any]) -> list[MetricCheck]:
    """Every metric of a table row (the headline first, then ``also``) against a run's summary.

    The run reproduces the row when every returned check ``passed``.

    Example::

        checks = judge(load_table()["mnist_powersgd"], json.loads(Path("summary.json").read_text()))
        all(c.passed for c in checks)
    """
    expected = {row["metric"]: (row["value"], row["tolerance"])}
    expected |= {m: (e["value"], e["tolerance"]) for m, e in row.get("also", {}).items()}
    return [MetricCheck(metric, float(value), float(tolerance), _number(summary.get(metric)))
            for metric, (value, tolerance) in expected.items()]


def _executable() -> str:
    found = shutil.which("lit-parallel")
    return found or str(Path(sys.executable).with_name("lit-parallel"))


def run_recipe(recipe: str, run_dir: Path, overrides: list[str] | None = None) -> tuple[dict[str, Any], float]:
    """Run ``lit-parallel recipe=<recipe>`` offline in a subprocess; return its summary and wall seconds.

    Raises:
        RuntimeError: the command failed or wrote no summary.
    """
    # Leftover rendezvous variables of an in-process Trainer would make the child join a dead group.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    command = [_executable(), f"recipe={recipe}", f"hydra.run.dir={run_dir}", *(overrides or [])]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, check=False)
    seconds = time.perf_counter() - start
    summary_path = run_dir / "summary.json"
    if proc.returncode != 0 or not summary_path.is_file():
        raise RuntimeError(f"`{' '.join(command)}` exited {proc.returncode} without a summary in {run_dir}.")
    return json.loads(summary_path.read_text()), seconds


def main(argv: list[str] | None = None) -> int:
    """Console entry point of ``lit-parallel-reproduce``; returns the exit status (0: PASS)."""
    parser = argparse.ArgumentParser(prog="lit-parallel-reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", help="a recipe of the results table")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (the result may then differ)")
    parser.add_argument("--list", action="store_true", help="print the table's recipes and exit")
    parser.add_argument("--table", help="results table (default: recipes/results.json)")
    parser.add_argument("--output-dir", help="run directory (default: a temporary one, removed afterwards)")
    args = parser.parse_args(argv)
    try:
        table = load_table(args.table)
    except ConfigurationError as err:
        print(f"lit-parallel-reproduce: error: {err}", file=sys.stderr)
        return 2
    if args.list or not args.recipe:
        for name, row in sorted(table.items()):
            also = "".join(f", {m} = {e['value']} ± {e['tolerance']}" for m, e in row.get("also", {}).items())
            print(f"{name:<24} {row['metric']} = {row['value']} ± {row['tolerance']}{also}   ({row['hardware']})")
        return 0 if args.list else 2
    if args.recipe not in table:
        print(f"lit-parallel-reproduce: error: recipe {args.recipe!r} has no row in the results table; "
              f"valid: {sorted(table)}.", file=sys.stderr)
        return 2
    row = table[args.recipe]
    print(f"reproducing {args.recipe}: {row['command']}  (table: {row['hardware']}, {row['wall_seconds']:.0f} s)",
          flush=True)
    keep = args.output_dir is not None
    run_dir = Path(args.output_dir) if keep else Path(tempfile.mkdtemp(prefix=f"reproduce-{args.recipe}-"))
    try:
        summary, seconds = run_recipe(args.recipe, run_dir, args.overrides)
    except RuntimeError as err:
        print(f"FAIL {args.recipe}: {err}", flush=True)
        return 1
    finally:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    checks = judge(row, summary)
    for check in checks:
        print(f"  {check.line()}")
    failed = [c.metric for c in checks if not c.passed]
    verdict = f"FAIL {args.recipe}: {failed}" if failed else f"PASS {args.recipe}: {len(checks)} metrics"
    print(f"{verdict}; wall time {seconds:.0f} s (table {row['wall_seconds']:.0f} s on {row['hardware']})",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
