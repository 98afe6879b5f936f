"""Routing policies over many modelled replicas, on virtual time: RAG-shaped arrivals (document sets
Zipf-popular) driven through a policy (``routing_policies``) onto ``replica_model.ReplicaModel``
replicas, summarised as throughput, time to first token, prefix-cache hit rate and load balance.

Scenarios: ``zipf`` (equal replicas), ``heterogeneous`` (half the replicas take twice as long per
step: an older GPU class), ``slowed`` (replica 0 turns 4x slower for the middle third of the run,
and its share of traffic is followed before, during and after). ``bench/routing.py`` runs them all.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
import statistics
from dataclasses import dataclass

from ragllm.testing.replica_model import ReplicaModel, ReplicaProfile, SimRequest
from ragllm.testing.routing_policies import make_policy

SCENARIOS = ("zipf", "heterogeneous", "slowed")
SLOW_FACTOR = 4.0


@dataclass(frozen=True)
class Load:
    rate_per_replica: float = (
        20.0  # requests/s; about half a replica's capacity when nothing is cached
    )
    doc_sets_per_replica: int = 64
    zipf_s: float = 1.0
    doc_tokens: int = 3000
    question_tokens: int = 50
    output_tokens: int = 200


def arrivals(replicas: int, duration: float, load: Load, seed: int) -> list[SimRequest]:
    """Poisson arrivals at ``rate_per_replica * replicas``; each picks a document set by Zipf popularity."""
    rng = random.Random(seed)
    doc_sets = load.doc_sets_per_replica * replicas
    cumulative = list(
        itertools.accumulate(1.0 / (rank + 1) ** load.zipf_s for rank in range(doc_sets))
    )
    requests, now = [], 0.0
    rate = load.rate_per_replica * replicas
    while True:
        now += rng.expovariate(rate)
        if now >= duration:
            return requests
        doc_set = bisect.bisect_left(cumulative, rng.random() * cumulative[-1])
        requests.append(
            SimRequest(
                index=len(requests),
                doc_set=doc_set,
                doc_tokens=load.doc_tokens,
                prompt_tokens=load.doc_tokens + load.question_tokens,
                output_tokens=load.output_tokens,
                arrival=now,
            )
        )


def slowdown_at(scenario: str, replica: int, replicas: int, now: float, duration: float) -> float:
    if scenario == "heterogeneous":
        return 2.0 if replica >= replicas // 2 else 1.0
    if scenario == "slowed" and replica == 0 and duration / 3 <= now < 2 * duration / 3:
        return SLOW_FACTOR
    return 1.0


def simulate(
    policy_name: str,
    replicas: int,
    scenario: str,
    duration: float,
    load: Load,
    slack: int,
    seed: int,
    profile: ReplicaProfile = ReplicaProfile(),
) -> dict:
    clock = [0.0]
    urls = [f"http://replica-{i}:8000" for i in range(replicas)]
    policy = make_policy(policy_name, urls, slack, lambda: clock[0], seed)
    index_of = {id(replica): i for i, replica in enumerate(policy.replicas)}
    models = [ReplicaModel(profile) for _ in range(replicas)]
    requests = arrivals(replicas, duration, load, seed)
    events: list = [(request.arrival, 0, request.index, request) for request in requests]
    heapq.heapify(events)
    sequence = itertools.count(len(requests))
    area = [0.0] * replicas  # integral of outstanding requests over time, per replica
    changed = [0.0] * replicas
    waiting_area = [0.0] * replicas  # integral of requests queued (not yet admitted), per replica
    waiting_changed = [0.0] * replicas

    def account_waiting(replica: int, now: float) -> None:
        waiting_area[replica] += len(models[replica].waiting) * (now - waiting_changed[replica])
        waiting_changed[replica] = now

    def account(replica: int, now: float, delta: int) -> None:
        outstanding = policy.replicas[replica]
        area[replica] += outstanding.outstanding * (now - changed[replica])
        changed[replica] = now
        outstanding.outstanding += delta

    def start_step(replica: int, now: float) -> None:
        model = models[replica]
        account_waiting(replica, now)
        model.slowdown = slowdown_at(scenario, replica, replicas, now, duration)
        heapq.heappush(events, (now + model.start_step(), 1, next(sequence), replica))

    while events:
        now, kind, _, payload = heapq.heappop(events)
        clock[0] = now
        if kind == 0:  # an arrival
            request = payload
            replica = index_of[id(policy.pick(str(request.doc_set)))]
            request.replica = replica
            policy.replicas[replica].awaiting_first_token += 1
            account(replica, now, +1)
            account_waiting(replica, now)
            models[replica].submit(request)
            if not models[replica].busy:
                start_step(replica, now)
        else:  # a replica's step ended
            replica = payload
            first, finished = models[replica].finish_step(now)
            policy.replicas[replica].awaiting_first_token -= len(first)
            for _ in finished:
                account(replica, now, -1)
            if models[replica].has_work():
                start_step(replica, now)
    end = max(request.finished_at for request in requests)
    for replica in range(replicas):
        account(replica, end, 0)
        account_waiting(replica, end)
    result = summarise(requests, models, area, end, replicas, scenario, duration)
    result["mean_waiting_per_replica"] = statistics.fmean(waiting_area) / end
    return result


def summarise(
    requests: list[SimRequest],
    models: list[ReplicaModel],
    area: list[float],
    end: float,
    replicas: int,
    scenario: str,
    duration: float,
) -> dict:
    ttfts = sorted(request.ttft for request in requests)
    averages = [a / end for a in area]
    mean_load = statistics.fmean(averages)
    result = {
        "requests": len(requests),
        "throughput_tok_s": sum(r.output_tokens for r in requests) / end,
        "ttft_p50_ms": _percentile(ttfts, 0.5) * 1e3,
        "ttft_p95_ms": _percentile(ttfts, 0.95) * 1e3,
        "ttft_p99_ms": _percentile(ttfts, 0.99) * 1e3,
        "hit_rate": sum(m.hits for m in models) / max(1, sum(m.lookups for m in models)),
        "max_over_mean_load": max(averages) / mean_load if mean_load else 0.0,
        "mean_outstanding_per_replica": mean_load,
        "drain_s": end - duration,
    }
    if scenario == "slowed":
        result["replica_0_share"] = share_over_time(requests, duration)
    return result


SHARE_WINDOWS = 30  # the run is cut into this many windows to follow replica 0's share


def share_over_time(requests: list[SimRequest], duration: float) -> dict:
    """Replica 0's share of arrivals per window (a thirtieth of the run); before/during/after the slow
    third, and the seconds it took to fall below half its earlier share and to come back to 80% of it."""
    width = duration / SHARE_WINDOWS
    counts = [[0, 0] for _ in range(SHARE_WINDOWS)]
    for request in requests:
        window = min(int(request.arrival / width), SHARE_WINDOWS - 1)
        counts[window][0] += request.replica == 0
        counts[window][1] += 1
    shares = [zero / total if total else 0.0 for zero, total in counts]
    slow_from, slow_to = SHARE_WINDOWS // 3, 2 * SHARE_WINDOWS // 3
    before = statistics.fmean(shares[1:slow_from])
    during = statistics.fmean(shares[slow_from:slow_to])
    after = statistics.fmean(shares[slow_to:])
    lost = next(
        ((w - slow_from + 1) * width for w in range(slow_from, slow_to) if shares[w] <= before / 2),
        None,
    )
    regained = next(
        (
            (w - slow_to + 1) * width
            for w in range(slow_to, SHARE_WINDOWS)
            if shares[w] >= 0.8 * before
        ),
        None,
    )
    return {
        "before": before,
        "during": during,
        "after": after,
        "seconds_to_lose": lost,
        "seconds_to_regain": regained,
        "window_s": width,
        "per_window": [round(s, 4) for s in shares],
    }


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
