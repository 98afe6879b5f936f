"""The project's router (``ReplicaPool``) over modelled replicas on virtual time
(``ragllm/testing/routing_simulation.py``): what it must keep at scale, checked on a small, fast run."""

from __future__ import annotations

import pytest

from ragllm.testing.routing_simulation import Load, simulate

LOAD = Load()


@pytest.fixture(scope="module")
def zipf_runs() -> dict:
    return {
        name: simulate(name, 8, "zipf", 6.0, LOAD, slack=2, seed=1)
        for name in ("least_outstanding", "consistent_hash", "ours")
    }


def test_ours_keeps_the_cache_without_a_hotspot_or_a_worse_tail(zipf_runs):
    ours, least, hashing = (
        zipf_runs["ours"],
        zipf_runs["least_outstanding"],
        zipf_runs["consistent_hash"],
    )
    assert ours["max_over_mean_load"] <= 1.25
    assert ours["hit_rate"] >= least["hit_rate"] + 0.10
    assert ours["ttft_p99_ms"] <= least["ttft_p99_ms"]
    assert hashing["max_over_mean_load"] > 1.25  # pure affinity: the popular sets' replicas run hot


def test_a_slowed_replica_loses_its_share_and_gets_it_back():
    run = simulate("ours", 8, "slowed", 12.0, LOAD, slack=2, seed=2)
    share = run["replica_0_share"]
    assert share["during"] <= share["before"] / 2
    assert share["seconds_to_lose"] is not None and share["seconds_to_lose"] <= 3
    assert share["after"] >= 0.8 * share["before"] and share["seconds_to_regain"] <= 3


def test_every_request_finishes_and_the_counts_return_to_zero(monkeypatch):
    from ragllm.testing import routing_simulation as routing

    pools = []
    real_make = routing.make_policy

    def recording(*args, **kwargs):
        pools.append(real_make(*args, **kwargs))
        return pools[-1]

    monkeypatch.setattr(routing, "make_policy", recording)
    run = simulate("ours", 4, "heterogeneous", 4.0, LOAD, slack=2, seed=3)
    assert run["requests"] > 200
    assert all(r.outstanding == 0 and r.awaiting_first_token == 0 for r in pools[0].replicas)
