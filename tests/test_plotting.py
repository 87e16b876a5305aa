"""plot_curves: the panels a run's metrics.csv gives, and a PNG."""

from __future__ import annotations

import pytest

from lit_parallel.plotting import _panels, plot_curves, read_curves

CSV = """comm/bytes_sent,comm/bytes_uncompressed,epoch,lr-AdamW/pg1,step,test/acc,train/loss,val/acc,val/loss
,,,0.001,0,,,,
1000.0,4000.0,0,,0,,2.5,,
250.0,4000.0,0,,1,,nan,,
,,0,,1,,,0.5,2.0
,,0,,2,0.6,,,
"""


def test_read_curves_skips_empty_and_nan_cells(tmp_path):
    (tmp_path / "metrics.csv").write_text(CSV)
    curves = read_curves(tmp_path / "metrics.csv")
    assert curves["train/loss"] == ([0], [2.5])
    assert curves["comm/bytes_sent"] == ([0, 1], [1000.0, 250.0])
    assert curves["val/acc"] == ([1], [0.5])
    assert "epoch" not in curves and "step" not in curves
    assert _panels(curves) == [("loss", ["train/loss", "val/loss"]), ("acc", ["val/acc"]),
                               ("gradient bytes per step (rank 0)", ["comm/bytes_sent", "comm/bytes_uncompressed"])]


def test_plot_curves_writes_a_png_next_to_the_csv(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.csv").write_text(CSV)
    png = plot_curves(tmp_path / "metrics.csv", title="test")
    assert png == tmp_path / "curves.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_nothing_to_draw(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.csv").write_text("epoch,lr-AdamW/pg1,step\n0,0.001,0\n")
    assert plot_curves(tmp_path / "metrics.csv") is None
