"""Routing policies to compare with the project's own (``ragllm.engines.upstream.router.ReplicaPool``),
each choosing among the same ``Replica`` objects (their ``outstanding`` counts kept by the caller).

- round robin: in turn, blind to load and documents;
- least outstanding: the replica with the fewest requests in flight (ties spread by picks);
- power of two choices: the less loaded of two chosen at random;
- consistent hashing: the replica a document set hashes to (rendezvous), blind to load;
- affinity by outstanding: the document set's rendezvous replica unless it carries more than
  ``slack`` requests beyond the least-loaded one, which then takes the request (our rule before
  ``bench/routing.py`` showed its tail);
- ours: the project's router, which also yields when more prompts await their first token on the
  preferred replica than on the one with the fewest.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Protocol

from ragllm.engines.upstream.router import Replica, ReplicaPool, rendezvous_weight


class Policy(Protocol):
    replicas: list[Replica]

    def pick(self, affinity: str | None) -> Replica: ...


class RoundRobin:
    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self._next = 0

    def pick(self, affinity: str | None) -> Replica:
        replica = self.replicas[self._next % len(self.replicas)]
        self._next += 1
        return replica


class LeastOutstanding:
    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas

    def pick(self, affinity: str | None) -> Replica:
        chosen = min(self.replicas, key=lambda r: (r.outstanding, r.picks))
        chosen.picks += 1
        return chosen


class PowerOfTwo:
    def __init__(self, replicas: list[Replica], seed: int = 0) -> None:
        self.replicas = replicas
        self._random = random.Random(seed)

    def pick(self, affinity: str | None) -> Replica:
        first, second = self._random.sample(self.replicas, 2)
        return first if first.outstanding <= second.outstanding else second


class ConsistentHash:
    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas

    def pick(self, affinity: str | None) -> Replica:
        if affinity is None:
            return self.replicas[0]
        return max(self.replicas, key=lambda r: rendezvous_weight(affinity, r.url))


class AffinityByOutstanding:
    def __init__(self, replicas: list[Replica], slack: int) -> None:
        self.replicas = replicas
        self._slack = slack

    def pick(self, affinity: str | None) -> Replica:
        chosen = min(self.replicas, key=lambda r: (r.outstanding, r.picks))
        if affinity is not None:
            preferred = max(self.replicas, key=lambda r: rendezvous_weight(affinity, r.url))
            if preferred.outstanding <= chosen.outstanding + self._slack:
                chosen = preferred
        chosen.picks += 1
        return chosen


class Ours:
    """The project's router itself, on the simulation's clock."""

    def __init__(
        self, urls: list[str], slack: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._pool = ReplicaPool(urls, slack=slack, eject_after=2, eject_for_s=5.0, clock=clock)
        self.replicas = self._pool.replicas

    def pick(self, affinity: str | None) -> Replica:
        replica = self._pool.pick(affinity)
        assert replica is not None  # the simulation never ejects replicas
        return replica


def make_policy(
    name: str, urls: list[str], slack: int, clock: Callable[[], float], seed: int = 0
) -> Policy:
    if name == "ours":
        return Ours(urls, slack, clock)
    replicas = [Replica(url) for url in urls]
    if name == "affinity_by_outstanding":
        return AffinityByOutstanding(replicas, slack)
    return {
        "round_robin": RoundRobin,
        "least_outstanding": LeastOutstanding,
        "consistent_hash": ConsistentHash,
    }.get(name, lambda r: PowerOfTwo(r, seed))(replicas)


POLICIES = (
    "round_robin",
    "least_outstanding",
    "power_of_two",
    "consistent_hash",
    "affinity_by_outstanding",
    "ours",
)
