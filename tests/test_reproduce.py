"""lit-parallel-reproduce: every metric of a row is judged; a missing, NaN or off-tolerance one fails."""

from __future__ import annotations

import json

import pytest

from lit_parallel import reproduce
from lit_parallel.errors import ConfigurationError

ROW = {"recipe": "mnist_powersgd", "command": "lit-parallel recipe=mnist_powersgd", "hardware": "any",
       "wall_seconds": 30, "metric": "test/acc", "value": 0.97, "tolerance": 0.02,
       "also": {"test/loss": {"value": 0.08, "tolerance": 0.01},
                "comm/compression_ratio": {"value": 9.56, "tolerance": 0.05}}}


def _failed(checks: list[reproduce.MetricCheck]) -> list[str]:
    return [c.metric for c in checks if not c.passed]


def test_judge_compares_every_metric_within_its_own_tolerance():
    summary = {"test/acc": 0.955, "test/loss": 0.089, "comm/compression_ratio": 9.6}
    checks = reproduce.judge(ROW, summary)
    assert [c.metric for c in checks] == ["test/acc", "test/loss", "comm/compression_ratio"]
    assert _failed(checks) == []
    assert _failed(reproduce.judge(ROW, summary | {"test/acc": 0.94})) == ["test/acc"]
    off = reproduce.judge(ROW, summary | {"comm/compression_ratio": 8.5})
    assert _failed(off) == ["comm/compression_ratio"]
    assert off[2].line() == "FAIL comm/compression_ratio = 8.5000, table 9.5600 ± 0.05 (off by 1.06)"


def test_judge_fails_a_missing_or_nan_secondary_metric_by_name():
    missing = reproduce.judge(ROW, {"test/acc": 0.97, "test/loss": 0.08})
    assert _failed(missing) == ["comm/compression_ratio"]
    assert missing[2].line() == "FAIL comm/compression_ratio: missing from the run's summary (table 9.5600 ± 0.05)"
    nan = reproduce.judge(ROW, {"test/acc": 0.97, "test/loss": 0.08, "comm/compression_ratio": float("nan")})
    assert _failed(nan) == ["comm/compression_ratio"]
    assert nan[2].line() == "FAIL comm/compression_ratio = nan is not finite (table 9.5600 ± 0.05)"
    text = reproduce.judge(ROW, {"test/acc": "0.97", "test/loss": 0.08, "comm/compression_ratio": 9.56})
    assert _failed(text) == ["test/acc"]


@pytest.mark.parametrize("also, needle", [
    ({"test/loss": 0.08}, "also['test/loss']=0.08; valid: {'value': number, 'tolerance': number}"),
    ({"test/loss": {"value": 0.08}}, "also['test/loss']"),
    ({"test/loss": {"value": 0.08, "tolerance": -1}}, "test/loss has tolerance=-1; valid: a number >= 0"),
    ([0.08], "has also=[0.08]; valid: a mapping"),
])
def test_table_rows_need_a_tolerance_for_every_metric(tmp_path, also, needle):
    table = tmp_path / "results.json"
    table.write_text(json.dumps({"results": [ROW | {"also": also}]}))
    with pytest.raises(ConfigurationError) as err:
        reproduce.load_table(table)
    assert needle in str(err.value) and "mnist_powersgd" in str(err.value)


def test_shipped_table_gives_every_metric_a_tolerance():
    table = reproduce.load_table()
    assert table["mnist_powersgd"]["also"]["comm/compression_ratio"]["tolerance"] > 0
    assert "pruning/sparsity" in table["mnist_pruned90"]["also"]
    for row in table.values():
        assert all(e["tolerance"] > 0 for e in row.get("also", {}).values()), row["recipe"]


def test_main_fails_naming_each_bad_metric(tmp_path, monkeypatch, capsys):
    table = tmp_path / "results.json"
    table.write_text(json.dumps({"results": [ROW]}))
    summary = {"test/acc": 0.97, "test/loss": 0.2}
    monkeypatch.setattr(reproduce, "run_recipe", lambda recipe, run_dir, overrides: (summary, 1.0))
    assert reproduce.main(["mnist_powersgd", "--table", str(table)]) == 1
    out = capsys.readouterr().out
    assert "  ok   test/acc = 0.9700" in out
    assert "  FAIL test/loss = 0.2000, table 0.0800 ± 0.01" in out
    assert "  FAIL comm/compression_ratio: missing from the run's summary" in out
    assert "FAIL mnist_powersgd: ['test/loss', 'comm/compression_ratio']" in out


def test_reproduce_runs_powersgd_and_compares_the_compression_ratio(tmp_path, capsys):
    """A real 2-rank run of the debug recipe: its summary carries the CommunicationMonitor's totals.

    Known answer: the tiny MLP (784-16-10, 12,730 float32 parameters) sends 50,920 bytes per exact step; PowerSGD rank 2 after 2
    warm-up steps of 5 sends 24,395.2 bytes per step on average, a ratio of 2.0873.
    """
    row = ROW | {"recipe": "mnist_powersgd_debug", "command": "lit-parallel recipe=mnist_powersgd_debug",
                 "metric": "global_step", "value": 5, "tolerance": 0,
                 "also": {"comm/compression_ratio": {"value": 2.0873, "tolerance": 0.001},
                          "comm/bytes_uncompressed_per_step": {"value": 50920, "tolerance": 0},
                          "test/acc": {"value": 0.32, "tolerance": 0.1}}}
    table = tmp_path / "results.json"
    table.write_text(json.dumps({"results": [row]}))
    run_dir = tmp_path / "run"
    assert reproduce.main(["mnist_powersgd_debug", "--table", str(table), "--output-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "ok   comm/compression_ratio = 2.0873" in out
    assert "PASS mnist_powersgd_debug: 4 metrics" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["comm/steps"] == 5
    # The same run against a row whose secondary metrics are off or absent.
    bad = row | {"also": row["also"] | {"comm/compression_ratio": {"value": 9.56, "tolerance": 0.05},
                                        "val/ppl": {"value": 1.0, "tolerance": 1.0}}}
    assert _failed(reproduce.judge(bad, summary)) == ["comm/compression_ratio", "val/ppl"]
    assert reproduce.main(["nope", "--table", str(table)]) == 2
