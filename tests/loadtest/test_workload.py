"""The load test's workload: RAG-shaped prompts whose document sets repeat, each repeat known as one."""

from __future__ import annotations

from ragllm.loadtest.workload import Workload


def test_rag_shaped_prompts_repeat_document_sets():
    workload = Workload(model="m", doc_sets=2, repeat_rate=1.0, context_words=50)
    systems = {workload.next_messages()[0]["content"] for _ in range(20)}
    assert len(systems) == 2
    fresh = Workload(model="m", doc_sets=2, repeat_rate=0.0, context_words=50)
    assert len({fresh.next_messages()[0]["content"] for _ in range(5)}) == 5


def test_a_request_is_a_repeat_only_once_its_document_set_was_sent():
    workload = Workload(model="m", doc_sets=3, repeat_rate=1.0, context_words=20)
    seen, flags = set(), []
    for _ in range(12):
        messages, repeated = workload.next_request()
        documents = messages[0]["content"]
        flags.append(repeated)
        assert repeated == (documents in seen)
        seen.add(documents)
    assert flags.count(False) == len(seen) <= 3
    fresh = Workload(model="m", repeat_rate=0.0, context_words=20)
    assert not any(fresh.next_request()[1] for _ in range(4))
