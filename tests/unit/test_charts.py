"""The benchmarks' chart: a real PNG with both panels, from the figures a run produced."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_the_concurrency_chart_is_a_png_of_every_series(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("charts", BENCHMARKS / "charts.py")
    assert spec is not None and spec.loader is not None
    charts = importlib.util.module_from_spec(spec)
    sys.modules["charts"] = charts
    spec.loader.exec_module(charts)
    series = [
        charts.Series("Sluice mesh", [1, 4, 16], [100.0, 300.0, 700.0], [0.05, 0.08, 0.2]),
        charts.Series("transformers serve", [1, 4, 16], [120.0, 280.0, 650.0], [0.04, 0.09, 0.25]),
        charts.Series("Sluice engine in-process", [16], [900.0], []),
    ]
    path = charts.concurrency_chart(tmp_path / "out" / "chart.png", "test", series)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    assert (width, height) == (1210, 462)  # 11 x 4.2 inches at 110 dpi
