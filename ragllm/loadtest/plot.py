"""The load test's PNG: latency percentiles and throughput against the load level."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_report(levels: list[dict[str, Any]], path: Path, title: str = "ragllm loadtest") -> Path:
    """Two panels: TTFT and end-to-end latency (p50, p99), then output tokens/s and requests/s."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    open_loop = "rate" in levels[0]
    xs = [level["rate"] if open_loop else level["concurrency"] for level in levels]
    xlabel = "request rate (req/s)" if open_loop else "concurrent clients"
    figure, (latency_axis, throughput_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for metric, label in (("ttft_ms", "TTFT"), ("latency_ms", "latency")):
        for percentile, style in (("p50", "-o"), ("p99", "--o")):
            values = [level[metric][percentile] for level in levels]
            latency_axis.plot(xs, values, style, label=f"{label} {percentile}")
    latency_axis.set(xlabel=xlabel, ylabel="milliseconds", title="latency")
    latency_axis.legend()
    throughput_axis.plot(
        xs, [level["output_tokens_per_s"] for level in levels], "-o", label="output tokens/s"
    )
    requests_axis = throughput_axis.twinx()
    requests_axis.plot(
        xs,
        [level["requests_per_s"] for level in levels],
        "--s",
        color="tab:orange",
        label="requests/s",
    )
    throughput_axis.set(xlabel=xlabel, ylabel="output tokens/s", title="throughput")
    requests_axis.set_ylabel("requests/s")
    throughput_axis.legend(loc="upper left")
    requests_axis.legend(loc="lower right")
    for axis in (latency_axis, throughput_axis):
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
