"""The W4A16 (AWQ int4) matrix products against bf16 cuBLAS on the same shapes, side by side in one
run on a GPU: Qwen2.5-1.5B's four projections (q/k/v fused, o, gate/up fused, down) at decode row
counts (1, 8, 32, 64) and a 2,048-token prefill, over a sweep of the kernels' tuning. Reports each
product's time (median of CUDA-event timings, replayed from a CUDA graph as decode replays them) and
the weight bytes read per second, and the tuning that is fastest over the whole layer.

    python bench/w4a16_kernels.py [--json bench/results/w4a16_kernels.json]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import write_report  # noqa: E402
from ragllm.engines.inprocess.layers import w4a16  # noqa: E402
from ragllm.engines.inprocess.quantized.awq_format import AwqWeights, quantise  # noqa: E402

# (name, inputs K, outputs N) of one Qwen2.5-1.5B layer
SHAPES = (("qkv", 1536, 2048), ("o", 1536, 1536), ("gate_up", 1536, 17920), ("down", 8960, 1536))
DECODE_ROWS = (1, 8, 32, 64)
PREFILL_ROWS = 2048
GROUP = 128
# Copies of each layer's weights cycled through, so that (as in a 28-layer model) a product reads its
# weights from memory, not from the 50-60 MB L2 cache that holds one layer's int4 weights whole.
COPIES = 8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("bench/results/w4a16_kernels.json"))
    parser.add_argument(
        "--decode-rows",
        default=",".join(map(str, DECODE_ROWS)),
        help="comma-separated decode row counts to sweep",
    )
    parser.add_argument("--skip-prefill", action="store_true")
    return parser.parse_args()


def graph_time_us(work, replays: int = 5, repeats: int = 7) -> float:
    """Median over ``repeats`` of the time of one product: ``work`` runs it over every copy of the
    weights, ``replays`` times in one captured graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            work()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(replays):
            work()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (replays * COPIES))
    return statistics.median(samples)


def layer_weights(k: int, n: int) -> tuple[list[AwqWeights], list[torch.Tensor]]:
    dense = torch.randn(n, k, device="cuda") * 0.02
    packed = quantise(dense, GROUP)
    dense = dense.to(torch.bfloat16)
    return (
        [
            AwqWeights(
                packed.qweight.clone(), packed.qzeros.clone(), packed.scales.clone(), None, GROUP
            )
            for _ in range(COPIES)
        ],
        [dense.clone() for _ in range(COPIES)],
    )


def packed_bytes(weights: AwqWeights) -> int:
    return sum(
        t.numel() * t.element_size() for t in (weights.qweight, weights.qzeros, weights.scales)
    )


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    layers = {name: layer_weights(k, n) for name, k, n in SHAPES}
    counters = {name: w4a16.counters_for(n, torch.device("cuda")) for name, _, n in SHAPES}
    report: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "decode": {},
        "prefill": {},
    }
    base = w4a16.W4A16Tuning()

    def run_awq(name: str, x: torch.Tensor):
        return lambda: [w4a16.awq_matmul(x, weights, counters[name]) for weights in layers[name][0]]

    def run_dense(name: str, x: torch.Tensor):
        return lambda: [F.linear(x, weight) for weight in layers[name][1]]

    def measure(tuning: w4a16.W4A16Tuning, entry: dict, inputs: dict) -> None:
        w4a16.TUNING = tuning
        times = {name: graph_time_us(run_awq(name, inputs[name])) for name, _, _ in SHAPES}
        entry["awq"].append(
            {"tuning": asdict(tuning), "us": times, "layer_us": sum(times.values())}
        )

    # -- decode: bf16 cuBLAS, then each tuning ------------------------------------------------------------
    gemv_tunings = [
        replace(
            base,
            gemv_words=words,
            gemv_programs_per_sm=per_sm,
            gemv_stages=stages,
            gemv_unrolled=unrolled,
            gemv_wide_words=wide,
        )
        for words, per_sm, stages, unrolled, wide in itertools.product(
            (8, 16), (8, 16), (2, 3), (False, True), (0, 32, 64)
        )
        if not (unrolled and stages == 3)
    ]  # an unrolled program is not pipelined
    gemv_tunings.append(replace(base, gemv_words=0))  # 0: one row through the tiled kernel
    # Tensor-core tilings for 2-64 rows: tile widths, orientation, warps and programs a multiprocessor at
    # three stages, then the other stages for the four fastest of those at the first multi-row count.
    # Later row counts try only that count's four fastest (each tiling compiles anew per shape).
    tiled_tunings = [
        replace(
            base,
            rows_block_n=block_n,
            rows_swapped=swapped,
            rows_warps=warps,
            rows_programs_per_sm=per_sm,
            rows_stages=3,
        )
        for block_n, swapped, warps, per_sm in itertools.product(
            (32, 64), (False, True), (4, 8), (2, 4, 8)
        )
        # The tensor cores' long side is 64; wider tiles (128, 256) lost on an H100 (BENCHMARKS.md).
        if not (swapped and block_n < 64) and not (block_n < 64 and warps > 4)
    ]
    tiled_swept = False  # the full tiled sweep runs at the first multi-row count only
    for rows in (int(count) for count in args.decode_rows.split(",") if count):
        inputs = {
            name: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for name, k, _ in SHAPES
        }
        entry: dict = {"bf16_us": {}, "awq": []}
        for name, _, _ in SHAPES:
            entry["bf16_us"][name] = graph_time_us(run_dense(name, inputs[name]))
        for tuning in gemv_tunings if rows == 1 else tiled_tunings:
            measure(tuning, entry, inputs)
        entry["awq"].sort(key=lambda row: row["layer_us"])
        if rows > 1 and not tiled_swept:
            for row in entry["awq"][:4]:
                for stages in (2, 4):
                    measure(
                        replace(base, **{**row["tuning"], "rows_stages": stages}), entry, inputs
                    )
            entry["awq"].sort(key=lambda row: row["layer_us"])
            tiled_swept = True
        if rows > 1:
            tiled_tunings = [replace(base, **row["tuning"]) for row in entry["awq"][:4]]
        entry["bf16_layer_us"] = sum(entry["bf16_us"].values())
        report["decode"][rows] = entry
        best = entry["awq"][0]
        gbps = {
            name: packed_bytes(layers[name][0][0]) / (best["us"][name] * 1e-6) / 1e9
            for name, _, _ in SHAPES
        }
        best["weight_gb_s"] = gbps
        print(
            f"decode {rows:>3} rows: bf16 layer {entry['bf16_layer_us']:.1f} µs, AWQ best {best['layer_us']:.1f} µs "
            f"with {best['tuning']}; per product µs { {k: round(v, 1) for k, v in best['us'].items()} }; GB/s "
            f"{ {k: round(v) for k, v in gbps.items()} }",
            flush=True,
        )
        write_report(
            args.json, report
        )  # after every row count, so a run cut short keeps what it measured
        if rows == 1:  # the best with and without wide rows, side by side
            for wide in (0, 32, 64):
                row = next(
                    r
                    for r in entry["awq"]
                    if r["tuning"]["gemv_wide_words"] == wide and r["tuning"]["gemv_words"]
                )
                print(
                    f"  wide rows {wide or 'never'}: layer {row['layer_us']:.1f} µs, per product µs "
                    f"{ {k: round(v, 1) for k, v in row['us'].items()} }",
                    flush=True,
                )
    if args.skip_prefill:
        write_report(args.json, report)
        return
    # -- prefill --------------------------------------------------------------------------------------------
    inputs = {
        name: torch.randn(PREFILL_ROWS, k, device="cuda", dtype=torch.bfloat16)
        for name, k, _ in SHAPES
    }
    prefill: dict = {
        "bf16_us": {name: graph_time_us(run_dense(name, inputs[name]), 1) for name, _, _ in SHAPES},
        "awq": [],
    }
    prefill_tunings = [
        replace(base, prefill_mode="dequantise", dequantise_warps=warps) for warps in (4, 8)
    ] + [
        replace(
            base,
            prefill_mode="tiled",
            prefill_block_m=bm,
            prefill_block_n=bn,
            prefill_warps=warps,
            prefill_stages=stages,
        )
        for bm, bn, warps, stages in (
            (128, 128, 8, 3),
            (64, 128, 4, 3),
            (128, 64, 4, 3),
            (128, 128, 4, 2),
        )
    ]
    for tuning in prefill_tunings:
        w4a16.TUNING = tuning
        try:
            times = {name: graph_time_us(run_awq(name, inputs[name]), 1) for name, _, _ in SHAPES}
        except Exception as exc:  # a tile that does not fit in shared memory: reported, not fatal
            prefill["awq"].append(
                {"tuning": asdict(tuning), "error": f"{type(exc).__name__}: {exc}"[:200]}
            )
            continue
        prefill["awq"].append(
            {"tuning": asdict(tuning), "us": times, "layer_us": sum(times.values())}
        )
    prefill["awq"].sort(key=lambda row: row.get("layer_us", float("inf")))
    prefill["bf16_layer_us"] = sum(prefill["bf16_us"].values())
    report["prefill"][PREFILL_ROWS] = prefill
    best = prefill["awq"][0]
    print(
        f"prefill {PREFILL_ROWS} rows: bf16 layer {prefill['bf16_layer_us']:.0f} µs, AWQ best {best['layer_us']:.0f} µs "
        f"with {best['tuning']}",
        flush=True,
    )
    for row in prefill["awq"]:
        if row["tuning"]["prefill_mode"] == "dequantise":
            print(
                f"prefill by dequantise-then-matmul, {row['tuning']['dequantise_warps']} warps a dequantising "
                f"program: {row.get('layer_us', float('nan')):.0f} µs; per product µs "
                f"{ {k: round(v, 1) for k, v in row.get('us', {}).items()} }",
                flush=True,
            )
    write_report(args.json, report)


if __name__ == "__main__":
    main()
