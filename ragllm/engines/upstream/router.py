"""Choosing a replica: least outstanding requests, with affinity that never becomes a hotspot.

Requests carrying the same document set (or conversation prefix) prefer the same replica, chosen by
rendezvous hashing (stable when replicas come and go), so that replica's prefix cache is reused. The
preference yields to the least-loaded replica once the preferred one carries more than ``slack``
requests beyond it: affinity never piles load onto one replica. Failing replicas are ejected for a
while (passive), and probes (active) take them out and bring them back.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field


@dataclass(eq=False)
class Replica:
    url: str
    outstanding: int = 0
    picks: int = 0  # spreads ties evenly
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    probe_ok: bool | None = None  # None: not probed yet
    models: list[dict] = field(default_factory=list)

    def available(self, now: float) -> bool:
        return self.probe_ok is not False and now >= self.ejected_until


class ReplicaPool:
    def __init__(self, urls: list[str], slack: int, eject_after: int, eject_for_s: float) -> None:
        self.replicas = [Replica(url) for url in urls]
        self._slack = slack
        self._eject_after = eject_after
        self._eject_for_s = eject_for_s

    def pick(self, affinity: str | None, exclude: set[Replica] = frozenset()) -> Replica | None:
        now = time.monotonic()
        candidates = [r for r in self.replicas if r.available(now) and r not in exclude]
        if not candidates:
            return None
        chosen = min(candidates, key=lambda r: (r.outstanding, r.picks))
        if affinity is not None:
            preferred = max(candidates, key=lambda r: _weight(affinity, r.url))
            if preferred.outstanding <= chosen.outstanding + self._slack:
                chosen = preferred
        chosen.picks += 1
        return chosen

    def succeeded(self, replica: Replica) -> None:
        replica.consecutive_failures = 0

    def failed(self, replica: Replica) -> None:
        replica.consecutive_failures += 1
        if replica.consecutive_failures >= self._eject_after:
            replica.ejected_until = time.monotonic() + self._eject_for_s

    def probed(self, replica: Replica, ok: bool) -> None:
        replica.probe_ok = ok
        if ok and replica.consecutive_failures >= self._eject_after:
            replica.consecutive_failures = 0
            replica.ejected_until = 0.0  # the probe saw it healthy again: no need to wait out the ejection

    def any_available(self) -> bool:
        now = time.monotonic()
        return any(r.available(now) for r in self.replicas)


def _weight(affinity: str, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{affinity}|{url}".encode(), digest_size=8).digest(), "big")


def affinity_key(messages: list[dict] | None, prompt: str | None, minimum_chars: int = 256) -> str | None:
    """The shared prefix worth keeping on one replica: the first message (the RAG system message
    with its documents) or the start of a prompt; short prefixes are not worth an affinity."""
    if messages:
        head = str(messages[0].get("content") or "")
    else:
        head = (prompt or "")[:4096]
    if len(head) < minimum_chars:
        return None
    return hashlib.blake2b(head.encode(), digest_size=16).hexdigest()
