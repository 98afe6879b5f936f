"""RAG telemetry against a real server with the packaged model, Redis and an OTLP endpoint: the
ragllm_rag_* series move as RAG answers arrive (documents dropped over budget, citations as the real
model wrote them, cache hits counted as answers served), the request log and the request span carry
the same counts, and client-chosen template names, model names and document ids never become label
values however many distinct ones arrive."""

from __future__ import annotations

import time
import uuid

import httpx
import openai
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from ragllm.rag.prompt import load_template
from ragllm.telemetry.rag_metrics import CONTEXT_TOKEN_BUCKETS
from tests.support.otlp_collector import OtlpCollector
from tests.support.servers import MODEL, ServerProcess

TEMPLATE = "default@1"
DECLINE = load_template(TEMPLATE).decline
LABELS = {"model_name": MODEL, "template": TEMPLATE}
DOCUMENTS = [
    {
        "id": "bridge",
        "title": "Verdant Bridge",
        "text": "The Verdant Bridge was completed in 1987.",
    },
    {"id": "ferry", "title": "Ferry", "text": "Before the bridge, a ferry crossed. " * 20},
    {"id": "weather", "title": "Weather", "text": "Oslund has mild summers. " * 20},
]
QUESTION = [{"role": "user", "content": "When was the Verdant Bridge completed?"}]
NO_CACHE = {"Cache-Control": "no-cache, no-store"}
SERIES = (
    "ragllm_rag_answers_total",
    "ragllm_rag_documents_received_total",
    "ragllm_rag_documents_used_total",
    "ragllm_rag_documents_dropped_total",
    "ragllm_rag_context_tokens_count",
    "ragllm_rag_context_tokens_sum",
    "ragllm_rag_citations_valid_total",
    "ragllm_rag_citations_unknown_total",
    "ragllm_rag_citations_missing_total",
    "ragllm_rag_answers_declined_total",
)


@pytest.fixture(scope="module")
def collector():
    endpoint = OtlpCollector()
    yield endpoint
    endpoint.close()


@pytest.fixture(scope="module")
def rag_server(tmp_path_factory, shared_redis_url, collector):
    prefix = f"rag-telemetry-{uuid.uuid4().hex[:12]}"
    server = ServerProcess(
        log_dir=tmp_path_factory.mktemp("rag-telemetry"),
        env={
            "REDIS_URL": shared_redis_url,
            "RAGLLM_REDIS__PREFIX": prefix,
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    try:
        server.wait_ready().prefix = prefix
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(rag_server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{rag_server.url}/v1", api_key="not-needed", max_retries=0, timeout=120
    )


def _ask(client: openai.OpenAI, cached: bool = False, **extra):
    """A RAG answer: (its response headers, the rag report, the answer's text); streamed when asked,
    kept out of the response cache unless ``cached``."""
    body = {"documents": DOCUMENTS, **extra.pop("body", {})}
    arguments = {"temperature": 0, "max_tokens": 20, **extra}
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=QUESTION,
        extra_body=body,
        extra_headers=None if cached else NO_CACHE,
        **arguments,
    )
    if not arguments.get("stream"):
        completion = raw.parse()
        return raw.headers, completion.model_extra["rag"], completion.choices[0].message.content
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    [final] = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    return raw.headers, final.model_extra["rag"], text


def _expected(report: dict, answer: str) -> dict[str, float]:
    """What one answer adds to each series, from its report and text (the classification itself is
    unit-tested on real strings in tests/rag/test_outcome.py)."""
    declined = answer.strip() == DECLINE
    used, dropped = len(report["used_documents"]), len(report["dropped_documents"])
    valid, unknown = len(report["citations"]), len(report["unknown_citations"])
    missing = report["citation_mode"] != "off" and not declined and not (valid or unknown)
    return dict(
        zip(
            SERIES,
            (1, used + dropped, used, dropped, 1, report["context_tokens"])
            + (valid, unknown, int(missing), int(declined)),
        )
    )


def _rag_samples(server: ServerProcess) -> list:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("ragllm_rag_") and not sample.name.endswith("_created")
    ]


def _values(server: ServerProcess) -> dict[str, float]:
    values = dict.fromkeys(SERIES, 0.0)
    for sample in _rag_samples(server):
        if sample.name in values and sample.labels == LABELS:
            values[sample.name] = sample.value
    return values


def _moved_by(server: ServerProcess, before: dict[str, float], answers: int) -> dict[str, float]:
    """How far each series moved, once ``answers`` answers are counted (a response reaches the client
    a moment before its request is recorded)."""
    deadline = time.monotonic() + 10
    while True:
        now = _values(server)
        moved = {name: now[name] - before[name] for name in SERIES}
        if moved["ragllm_rag_answers_total"] >= answers or time.monotonic() > deadline:
            return moved
        time.sleep(0.05)


def _sum(expectations: list[dict[str, float]]) -> dict[str, float]:
    return {name: sum(e[name] for e in expectations) for name in SERIES}


def test_the_series_move_as_rag_answers_arrive(rag_server, client):
    before = _values(rag_server)
    _, tight, tight_answer = _ask(client, body={"rag": {"max_context_tokens": 40}})
    _, streamed, streamed_answer = _ask(client, stream=True)
    _, constrained, constrained_answer = _ask(
        client, max_tokens=80, body={"rag": {"citations": "constrained"}}
    )
    _, off, off_answer = _ask(client, body={"rag": {"citations": False}})
    client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3)  # not RAG
    moved = _moved_by(rag_server, before, answers=4)
    assert tight["dropped_documents"] == ["ferry", "weather"]  # over budget: dropped, and counted
    assert moved == _sum(
        [
            _expected(tight, tight_answer),
            _expected(streamed, streamed_answer),
            _expected(constrained, constrained_answer),
            _expected(off, off_answer),
        ]
    )
    assert moved["ragllm_rag_documents_dropped_total"] >= 2
    # Constrained decoding: the answer cites supplied documents or declines, so it never misses.
    assert _expected(constrained, constrained_answer)["ragllm_rag_citations_missing_total"] == 0
    assert constrained["citations"] or constrained_answer == DECLINE


def test_a_cached_answer_counts_as_an_answer_served(rag_server, client):
    before = _values(rag_server)
    question = {"body": {"rag": {"max_context_tokens": 40}}, "max_tokens": 8}
    first_headers, report, answer = _ask(client, cached=True, **question)
    again_headers, again, _ = _ask(client, cached=True, **question)
    assert (first_headers["x-ragllm-cache"], again_headers["x-ragllm-cache"]) == ("miss", "hit")
    assert again == report
    assert _moved_by(rag_server, before, answers=2) == _sum([_expected(report, answer)] * 2)


def _log_entry(server: ServerProcess, request_id: str) -> dict[str, str]:
    stream = redis.Redis.from_url("redis://127.0.0.1:6379/0", decode_responses=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for _, fields in stream.xrange(f"{server.prefix}:requests"):
            if fields["request_id"] == request_id:
                return fields
        time.sleep(0.1)
    raise AssertionError(f"no request-log entry for {request_id}")


def _span_attributes(collector: OtlpCollector, request_id: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for span in list(collector.spans):
            attributes = {a.key: a.value for a in span.attributes}
            named = attributes.get("ragllm.request_id")
            if named is not None and named.string_value == request_id:
                return attributes
        time.sleep(0.05)
    raise AssertionError(f"no span for {request_id}")


def test_the_request_log_and_the_span_carry_the_same_counts(rag_server, client, collector):
    headers, report, answer = _ask(client, body={"rag": {"max_context_tokens": 40}})
    expected = _expected(report, answer)
    entry = _log_entry(rag_server, headers["x-request-id"])
    counts = {
        "rag_template": TEMPLATE,
        "rag_citation_mode": "parsed",
        "rag_documents_received": "3",
        "rag_documents_used": "1",
        "rag_documents_dropped": "2",
        "rag_context_tokens": str(report["context_tokens"]),
        "rag_citations_valid": str(len(report["citations"])),
        "rag_citations_unknown": str(len(report["unknown_citations"])),
        "rag_citations_missing": str(int(expected["ragllm_rag_citations_missing_total"])),
        "rag_declined": str(int(expected["ragllm_rag_answers_declined_total"])),
    }
    assert {key: value for key, value in entry.items() if key.startswith("rag_")} == counts
    span = _span_attributes(collector, headers["x-request-id"])
    assert span["ragllm.rag.template"].string_value == TEMPLATE
    assert span["ragllm.rag.documents_dropped"].int_value == 2
    assert span["ragllm.rag.context_tokens"].int_value == report["context_tokens"]
    assert span["ragllm.rag.citations_valid"].int_value == len(report["citations"])
    assert span["ragllm.rag.declined"].bool_value is bool(
        expected["ragllm_rag_answers_declined_total"]
    )
    plain = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=QUESTION, max_tokens=3, extra_headers=NO_CACHE
    )
    plain_entry = _log_entry(rag_server, plain.headers["x-request-id"])
    assert plain_entry["status"] == "200" and not any(k.startswith("rag_") for k in plain_entry)


# Names a client may choose: never a label value, whatever they are.
hostile_names = st.text(min_size=1, max_size=200) | st.sampled_from(
    [f"{TEMPLATE} ", "DEFAULT@1", "default@01", "default@2", "../default@1", MODEL + "x", ""]
)
hostile_ids = st.text(
    st.characters(blacklist_characters="[],", blacklist_categories=("Zs", "Zl", "Zp", "Cc", "Cs")),
    min_size=1,
    max_size=128,
).filter(lambda text: not any(c.isspace() for c in text))
seen_ids: set[str] = set()  # every document id sent so far


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    template=hostile_names,
    model=hostile_names,
    ids=st.lists(hostile_ids, min_size=1, max_size=8, unique=True),
)
def test_hostile_names_and_ids_never_become_label_values(rag_server, client, template, model, ids):
    if template != TEMPLATE:
        with pytest.raises(openai.BadRequestError):
            _ask(client, max_tokens=1, body={"rag": {"template": template}})
    if model != MODEL:
        with pytest.raises((openai.NotFoundError, openai.BadRequestError)):
            client.chat.completions.create(
                model=model, messages=QUESTION, max_tokens=1, extra_body={"documents": DOCUMENTS}
            )
    # Served: the documents' ids are the client's, and are counted, never named.
    client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=1,
        extra_headers=NO_CACHE,
        extra_body={"documents": [{"id": i, "text": "Short."} for i in ids]},
    )
    seen_ids.update(ids)
    samples = _rag_samples(rag_server)
    assert {tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")) for s in samples} == {
        tuple(sorted(LABELS.items()))
    }
    # One label set, so a fixed number of series: 8 counters, the histogram's buckets, sum and count.
    assert len(samples) == 8 + len(CONTEXT_TOKEN_BUCKETS) + 1 + 2
    values = {value for s in samples for value in s.labels.values()}
    assert not values & seen_ids - {MODEL, TEMPLATE}
