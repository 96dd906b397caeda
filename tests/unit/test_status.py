"""`sluice status` without a network: what each probe says becomes the right rows, totals and
JSON; the rolling tokens-per-second figure."""

from __future__ import annotations

import json

from rich.console import Console

from services.inference.metrics import RollingRate
from services.status import Located, Probes, gather, parse_samples, render

NOW = 1_000_000.0
LOCATED = [
    Located("cache", "cache", "127.0.0.1:5003", "127.0.0.1:9003", "running", 0),
    Located("edge", "edge", "127.0.0.1:8000", "127.0.0.1:8000", "running", 0),
    Located("inference", "inference", "127.0.0.1:5002", "127.0.0.1:9002", "running", 0),
    Located("inference-2", "inference", "127.0.0.1:5012", "127.0.0.1:9012", "restarting", 1),
    Located("preprocess", "preprocess", "127.0.0.1:5001", "127.0.0.1:9001", "running", 0),
]
METRICS = {
    "127.0.0.1:9002": parse_samples(
        "process_start_time_seconds 999400\n"
        "sluice_inference_queue_depth 3\n"
        "sluice_inference_running_sequences 5\n"
        'sluice_inference_kv_blocks{state="used"} 30\n'
        'sluice_inference_kv_blocks{state="free"} 70\n'
        "sluice_inference_tokens_per_second 41.5\n"
    ),
    "127.0.0.1:8000": parse_samples(
        'sluice_edge_cache_total{result="hit"} 3\nsluice_edge_cache_total{result="miss"} 9\n'
        "process_start_time_seconds 990000\n"
    ),
}


def _probes() -> Probes:
    return Probes(
        grpc_serving=lambda where: where.name != "inference-2",
        edge_serving=lambda base_url: base_url == "http://127.0.0.1:8000/v1",
        metrics=lambda address: METRICS.get(address, {}),
        model=lambda where: "sluice-tiny@1",
        clock=lambda: NOW,
    )


def test_rows_totals_and_the_cache_ratio() -> None:
    status = gather("http://127.0.0.1:8000/v1", LOCATED, _probes())
    rows = {i.name: i for i in status.instances}
    assert [i.name for i in status.instances if not i.healthy] == ["inference-2"]
    assert rows["inference-2"].state == "restarting" and rows["inference-2"].restarts == 1
    assert rows["inference"].uptime_s == 600 and rows["edge"].uptime_s == 10_000
    assert rows["cache"].uptime_s is None  # its metrics did not answer
    assert (rows["inference"].waiting, rows["inference"].running, rows["inference"].kv_total) == (3, 5, 100)
    (model,) = status.models
    assert (model.model, model.instances, model.serving) == ("sluice-tiny@1", 2, 1)
    assert (model.waiting, model.running, model.kv_used_share, model.tokens_per_s) == (3, 5, 0.3, 41.5)
    assert status.cache_hit_ratio == 0.25
    parsed = json.loads(status.to_json())
    assert parsed["models"][0]["serving"] == 1 and len(parsed["instances"]) == 5


def test_the_table_shows_every_instance_and_model() -> None:
    console = Console(record=True, width=140)
    for part in render(gather("http://127.0.0.1:8000/v1", LOCATED, _probes())):
        console.print(part)
    text = console.export_text()
    assert text.count("SERVING") == 4 and text.count("DOWN") == 1
    assert "inference-2" in text and "restarting" in text and "10m" in text and "2h46m" in text
    assert "sluice-tiny@1" in text and "1/2" in text and "30.0%" in text and "41.5" in text
    assert "completion cache hit ratio: 25%" in text


def test_rolling_rate_counts_the_last_minute_only() -> None:
    now = [100.0]
    rate = RollingRate(window_s=60, clock=lambda: now[0])
    for second in range(100, 130):
        now[0] = second + 0.5
        rate.add(2)
    assert rate.per_second() == 60 / 60
    now[0] = 174.2  # seconds 100 to 114 have left the window
    assert rate.per_second() == 30 / 60
    now[0] = 500
    assert rate.per_second() == 0
