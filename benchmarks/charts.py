"""PNG charts beside the benchmarks' tables: throughput and time to first token against
concurrency, one line per contender (matplotlib, drawn off-screen)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Series:
    name: str
    concurrency: list[int]
    tokens_per_s: list[float]
    ttft_s: list[float]  # may be empty: no TTFT for this contender


def concurrency_chart(path: Path, title: str, series: list[Series]) -> Path:
    """Two panels, tokens/s and TTFT p50 against concurrency (log-2 axis), written to `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, (throughput, ttft) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for line in series:
        style = {"marker": "o", "linewidth": 2} if len(line.concurrency) > 1 else {"marker": "D", "markersize": 9}
        throughput.plot(line.concurrency, line.tokens_per_s, label=line.name, **style)
        if line.ttft_s:
            ttft.plot(line.concurrency, [t * 1e3 for t in line.ttft_s], label=line.name, **style)
    for axes, label in ((throughput, "tokens/s (median)"), (ttft, "time to first token p50 (ms)")):
        axes.set_xscale("log", base=2)
        levels = sorted({c for line in series for c in line.concurrency})
        axes.set_xticks(levels, [str(c) for c in levels])
        axes.set_xlabel("concurrent streams")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        axes.set_ylim(bottom=0)
    throughput.legend(loc="upper left", fontsize=9)
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
