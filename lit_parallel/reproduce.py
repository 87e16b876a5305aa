"""``lit-parallel-reproduce <recipe>``: rerun a recipe and check it against its row of the results table.

The table is ``recipes/results.json`` (``recipes/README.md`` shows the same rows for people): for each
recipe the command, the hardware and wall time it was measured with, one metric, its value and the
tolerance within which a rerun must land (absolute), and optionally ``also``: further metrics of the
same run, printed next to the rerun's values but not judged. The recipe runs as a subprocess of the ``lit-parallel``
console script (so multi-process strategies launch as they do for users); the metric is read from the
run's ``summary.json``.

Usage::

    lit-parallel-reproduce bert_bbc              # runs it, prints PASS or FAIL, exits 0 or 1
    lit-parallel-reproduce --list                # the recipes in the table
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lit_parallel.cli import conf_dir
from lit_parallel.errors import ConfigurationError

__all__ = ["judge", "load_table", "main", "run_recipe"]

_FIELDS = ("recipe", "command", "hardware", "wall_seconds", "metric", "value", "tolerance")


def default_table() -> Path:
    """``results.json`` next to the recipe files."""
    return conf_dir() / "recipe" / "results.json"


def load_table(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The results table as ``{recipe: row}``.

    Raises:
        ConfigurationError: the file is missing, or a row lacks one of the required fields.
    """
    path = Path(path) if path else default_table()
    if not path.is_file():
        raise ConfigurationError(f"results table {path} does not exist.")
    rows = json.loads(path.read_text())["results"]
    table = {}
    for row in rows:
        missing = [f for f in _FIELDS if f not in row]
        if missing:
            raise ConfigurationError(f"results table {path}: row {row.get('recipe')!r} lacks {missing}.")
        table[row["recipe"]] = row
    return table


def judge(row: dict[str, Any], summary: dict[str, Any]) -> tuple[bool, str]:
    """Whether a run's summary reproduces a table row; returns ``(passed, one-line explanation)``."""
    metric = row["metric"]
    if metric not in summary:
        return False, f"{metric} is not in the run's summary (keys: {sorted(summary)})"
    value, expected, tolerance = float(summary[metric]), float(row["value"]), float(row["tolerance"])
    passed = abs(value - expected) <= tolerance
    return passed, f"{metric} = {value:.4f}, table {expected:.4f} ± {tolerance:g}"


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
            print(f"{name:<24} {row['metric']} = {row['value']} ± {row['tolerance']}   ({row['hardware']})")
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
    passed, detail = judge(row, summary)
    for key, value in row.get("also", {}).items():  # context the table records, not judged
        print(f"  {key} = {summary.get(key, float('nan')):.4f} (table {value:.4f})")
    print(f"{'PASS' if passed else 'FAIL'} {args.recipe}: {detail}; wall time {seconds:.0f} s "
          f"(table {row['wall_seconds']:.0f} s on {row['hardware']})", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
