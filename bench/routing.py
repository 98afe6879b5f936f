"""Routing policies over many replicas, on virtual time: the project's own router (``ReplicaPool``)
against round robin, least outstanding, power of two choices, consistent hashing and its own earlier
rule (affinity by outstanding requests alone), driving
``ragllm.testing.replica_model.ReplicaModel`` replicas under RAG-shaped load (document sets Zipf-popular).

Scenarios: ``zipf`` (equal replicas), ``heterogeneous`` (half the replicas take twice as long per
step: an older GPU class), ``slowed`` (replica 0 turns 4x slower for the middle third of the run).
For each scenario, policy and replica count it reports throughput, time to first token p50/p99, the
prefix-cache hit rate, and max/mean of each replica's time-averaged outstanding requests; for
``slowed``, replica 0's share of traffic before, during and after, and how many seconds it took to
lose and regain it.

    python bench/routing.py [--replicas 8,16,64] [--duration 20] [--json bench/results/routing.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ragllm.testing.replica_model import PROFILES, ReplicaProfile  # noqa: E402
from ragllm.testing.routing_policies import POLICIES  # noqa: E402
from ragllm.testing.routing_simulation import SCENARIOS, Load, simulate  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="8,16,64", help="comma-separated replica counts")
    parser.add_argument(
        "--duration", type=float, default=20.0, help="seconds of arrivals (virtual)"
    )
    parser.add_argument("--rate-per-replica", type=float, default=Load.rate_per_replica)
    parser.add_argument(
        "--slack", type=int, default=2, help="our policy's affinity slack (the default setting)"
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=ReplicaProfile.max_num_seqs,
        help="each modelled replica's --max-num-seqs (the cloud profile: 32)",
    )
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        help="a named replica for the sweep (its own max_num_seqs; --max-num-seqs is then ignored)",
    )
    parser.add_argument(
        "--sweep-rates",
        help="instead of the scenarios: our policy at these requests/s per "
        "replica (comma-separated), for sizing and the autoscaler target",
    )
    parser.add_argument("--json", type=Path, default=Path("bench/results/routing.json"))
    return parser.parse_args()


# The policies the test below ranks ours against (the earlier rule is shown, not ranked: it is ours).
COMPARED = ("round_robin", "least_outstanding", "power_of_two", "consistent_hash", "ours")


def verdict(results: dict) -> list[str]:
    """The test: under Zipf popularity, ours has the highest hit rate of the compared policies keeping
    max/mean load at or below 1.25, and a p99 TTFT no worse than least outstanding's."""
    lines = []
    for replicas, by_policy in results.get("zipf", {}).items():
        balanced = {
            name: r
            for name, r in by_policy.items()
            if name in COMPARED and r["max_over_mean_load"] <= 1.25
        }
        best = max(balanced, key=lambda name: balanced[name]["hit_rate"]) if balanced else None
        ours, least = by_policy["ours"], by_policy["least_outstanding"]
        holds = best == "ours" and ours["ttft_p99_ms"] <= least["ttft_p99_ms"] * 1.0001
        lines.append(
            f"{replicas} replicas: best hit rate among balanced policies: {best}; ours p99 TTFT "
            f"{ours['ttft_p99_ms']:.0f} ms vs least outstanding {least['ttft_p99_ms']:.0f} ms: "
            f"{'holds' if holds else 'FAILS'}"
        )
    return lines


def print_tables(results: dict) -> None:
    for scenario, by_replicas in results.items():
        print(f"\n{scenario}")
        header = (
            f"{'replicas':>8} {'policy':<25}{'tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'hit rate':>10}"
            f"{'max/mean':>10}"
            + (
                f"{'share 0: before/during/after':>32}{'lost/regained (s)':>19}"
                if scenario == "slowed"
                else ""
            )
        )
        print(header)
        print("-" * len(header))
        for replicas, by_policy in by_replicas.items():
            for name, r in by_policy.items():
                line = (
                    f"{replicas:>8} {name:<25}{r['throughput_tok_s']:>10.0f}{r['ttft_p50_ms']:>8.0f}ms"
                    f"{r['ttft_p99_ms']:>8.0f}ms{r['hit_rate']:>10.1%}{r['max_over_mean_load']:>10.2f}"
                )
                if scenario == "slowed":
                    share = r["replica_0_share"]
                    lost, regained = (
                        f"{s:.1f}" if s is not None else "-"
                        for s in (share["seconds_to_lose"], share["seconds_to_regain"])
                    )
                    line += f"{share['before']:>14.3f}/{share['during']:.3f}/{share['after']:.3f}{lost:>10}/{regained}"
                print(line)


def sweep(args: argparse.Namespace) -> None:
    """Our policy on equal replicas under Zipf load at rising rates: where time to first token turns,
    and how many requests wait per replica there (what the vLLM autoscaler reads)."""
    rows = []
    profile = (
        PROFILES[args.profile] if args.profile else ReplicaProfile(max_num_seqs=args.max_num_seqs)
    )
    print(
        f"{'replicas':>8}{'req/s each':>11}{'tok/s':>10}{'TTFT p50':>10}{'TTFT p95':>10}{'TTFT p99':>10}"
        f"{'hit rate':>10}{'running':>9}{'waiting':>9}"
    )
    for replicas in (int(n) for n in args.replicas.split(",")):
        for rate in (float(r) for r in args.sweep_rates.split(",")):
            r = simulate(
                "ours",
                replicas,
                "zipf",
                args.duration,
                Load(rate_per_replica=rate),
                args.slack,
                args.seed,
                profile,
            )
            rows.append({"replicas": replicas, "rate_per_replica": rate, **r})
            print(
                f"{replicas:>8}{rate:>11.1f}{r['throughput_tok_s']:>10.0f}{r['ttft_p50_ms']:>8.0f}ms"
                f"{r['ttft_p95_ms']:>8.0f}ms{r['ttft_p99_ms']:>8.0f}ms{r['hit_rate']:>10.1%}"
                f"{r['mean_outstanding_per_replica'] - r['mean_waiting_per_replica']:>9.2f}"
                f"{r['mean_waiting_per_replica']:>9.2f}",
                flush=True,
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "settings": {**vars(args), "json": str(args.json), "profile": vars(profile)},
                "rows": rows,
            },
            indent=1,
            default=str,
        )
    )
    print(f"wrote {args.json}")


def main() -> None:
    args = parse_args()
    if args.sweep_rates:
        sweep(args)
        return
    load = Load(rate_per_replica=args.rate_per_replica)
    results: dict = {}
    started = time.perf_counter()
    for scenario in args.scenarios.split(","):
        results[scenario] = {}
        for replicas in (int(n) for n in args.replicas.split(",")):
            results[scenario][replicas] = {
                name: simulate(name, replicas, scenario, args.duration, load, args.slack, args.seed)
                for name in POLICIES
            }
    print_tables(results)
    lines = verdict(results)
    print("\n" + "\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "settings": {
                    **vars(args),
                    "json": str(args.json),
                    "load": vars(load),
                    "profile": vars(ReplicaProfile()),
                },
                "results": results,
                "verdict": lines,
            },
            indent=1,
            default=str,
        )
    )
    print(f"wrote {args.json} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
