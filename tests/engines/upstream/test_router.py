"""The replica choice: least outstanding, affinity within its slack, ejection and recovery."""

from __future__ import annotations

import asyncio

from ragllm.engines.upstream.router import ReplicaPool, affinity_key
from ragllm.generation import ModelCard
from ragllm.rag.contract import RagDocument, RagOptions
from ragllm.rag.packing import PackRequest, pack
from ragllm.rag.prompt import load_template, rank
from tests.support.word_counting import WordCountingEngine


def _pool(slack: int = 1) -> ReplicaPool:
    pool = ReplicaPool(
        ["http://a", "http://b", "http://c"], slack=slack, eject_after=2, eject_for_s=60
    )
    for replica in pool.replicas:
        pool.probed(replica, True)
    return pool


def test_least_outstanding_wins_and_ties_rotate():
    pool = _pool()
    picked = [pool.pick(None).url for _ in range(6)]
    assert sorted(picked) == [
        "http://a",
        "http://a",
        "http://b",
        "http://b",
        "http://c",
        "http://c",
    ]
    pool.replicas[0].outstanding, pool.replicas[1].outstanding = 3, 1
    assert pool.pick(None).url == "http://c"


def test_affinity_is_stable_and_yields_past_the_slack():
    pool = _pool(slack=1)
    key = affinity_key([{"role": "system", "content": "documents " * 100}], None)
    preferred = pool.pick(key)
    assert all(
        pool.pick(key) is preferred for _ in range(5)
    )  # nothing outstanding: always the same
    preferred.outstanding = 1  # one beyond the least loaded: still within the slack
    assert pool.pick(key) is preferred
    preferred.outstanding = 2  # two beyond: the least-loaded replica takes it
    assert pool.pick(key) is not preferred


def test_short_prefixes_carry_no_affinity():
    assert affinity_key([{"role": "user", "content": "hi"}], None) is None
    assert affinity_key(None, "x" * 300) is not None


def test_a_document_set_keeps_its_replica_whatever_the_question_scores_or_order():
    """Requests that carry the same documents render different first messages (another question,
    other scores, so another order); their affinity follows the set, so they meet its cache."""

    def request(question: str, scores: list[float]) -> tuple[str, str | None]:
        documents = [
            RagDocument(id=f"doc{i}", text=f"Archive {i} lists {100 + i} records. " * 20, score=s)
            for i, s in enumerate(scores)
        ]
        packing = PackRequest(
            model=ModelCard("m", 8192),
            template=load_template("default@1"),
            ranked=rank(documents),
            messages=[{"role": "user", "content": question}],
            template_kwargs=None,
            max_tokens=16,
            options=RagOptions(),
            no_think=False,
        )
        messages, context = asyncio.run(pack(WordCountingEngine(), packing))
        return (
            affinity_key(messages, None),
            affinity_key(messages, None, document_set=context.document_set),
        )

    asked = [
        request("Which archive is largest?", [0.9, 0.5, 0.1, 0.3]),
        request("How many records in archive 2?", [0.2, 0.4, 0.8, 0.6]),
        request("Summarise archive 3.", [0.1, 0.2, 0.3, 0.9]),
    ]
    by_head = {head for head, _ in asked}
    assert len(by_head) == 3  # the rendered heads differ: keyed on them, the set would scatter
    (by_set,) = {key for _, key in asked}
    assert by_set is not None
    pool = _pool(slack=1)
    preferred = pool.pick(by_set)
    assert all(pool.pick(key) is preferred for _, key in asked)
    other = request("Which archive is largest?", [0.9, 0.5, 0.1])[1]  # one document fewer
    assert other != by_set


def test_failures_eject_and_a_good_probe_brings_back():
    pool = _pool()
    a = pool.replicas[0]
    pool.failed(a)
    assert any(pool.pick(None) is a for _ in range(6))  # one failure does not eject
    pool.failed(a)
    assert all(pool.pick(None) is not a for _ in range(6))
    pool.probed(a, True)
    assert any(pool.pick(None) is a for _ in range(6))
    pool.probed(a, False)
    assert all(pool.pick(None) is not a for _ in range(6))
    for replica in pool.replicas:
        pool.probed(replica, False)
    assert pool.pick(None) is None and not pool.any_available()


def test_affinity_yields_to_a_replica_with_fewer_prompts_awaiting_their_first_token():
    pool = _pool(slack=2)
    key = affinity_key([{"role": "system", "content": "documents " * 100}], None)
    preferred = pool.pick(key)
    others = [r for r in pool.replicas if r is not preferred]
    preferred.awaiting_first_token = preferred.outstanding = 1  # a prompt still prefilling there
    chosen = pool.pick(key)
    assert chosen is not preferred  # within the outstanding slack, but queued behind a prefill
    others[0].awaiting_first_token = others[1].awaiting_first_token = 1
    others[0].outstanding = others[1].outstanding = 1
    assert pool.pick(key) is preferred  # every replica is prefilling one: the cache decides


def test_a_prefill_slack_lets_affinity_wait_behind_prefills():
    pool = ReplicaPool(
        ["http://a", "http://b"], slack=4, eject_after=2, eject_for_s=60, prefill_slack=2
    )
    key = affinity_key([{"role": "system", "content": "documents " * 100}], None)
    preferred = pool.pick(key)
    preferred.awaiting_first_token = preferred.outstanding = 2
    assert pool.pick(key) is preferred
    preferred.awaiting_first_token = preferred.outstanding = 3
    assert pool.pick(key) is not preferred


def test_a_virtual_clock_drives_ejection():
    now = [100.0]
    pool = ReplicaPool(
        ["http://a", "http://b"], slack=1, eject_after=1, eject_for_s=5, clock=lambda: now[0]
    )
    a = pool.replicas[0]
    pool.failed(a)
    assert all(pool.pick(None) is not a for _ in range(4))
    now[0] += 5
    assert any(pool.pick(None) is a for _ in range(4))


def test_names_become_one_url_per_address():
    import pytest

    from ragllm.engines.upstream.discovery import DiscoveredName, ReplicaDiscovery

    name = DiscoveredName.parse("dns+http://vllm-headless.ns.svc:8000/base/")
    assert (name.host, name.port, name.path) == ("vllm-headless.ns.svc", 8000, "/base")
    assert name.url_for("10.0.0.7") == "http://10.0.0.7:8000/base"
    assert name.url_for("fd00::7") == "http://[fd00::7]:8000/base"
    assert DiscoveredName.parse("dns+https://vllm").port == 443
    with pytest.raises(ValueError, match="dns\\+http"):
        DiscoveredName.parse("dns+ftp://vllm:21")
    discovery = ReplicaDiscovery(["http://static:1", "dns+http://a:2"])
    assert discovery.static == ["http://static:1"] and discovery.dynamic


def test_replicas_that_stay_keep_their_state_when_the_list_changes():
    pool = _pool()
    b = pool.replicas[1]
    b.outstanding = 3
    pool.update(["http://b", "http://d"])
    assert [r.url for r in pool.replicas] == ["http://b", "http://d"]
    assert pool.replicas[0] is b and b.outstanding == 3
