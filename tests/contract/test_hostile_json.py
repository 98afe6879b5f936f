"""Hostile JSON in every JSON-typed request field, against a real server with keys, Redis and the
response cache on: deep, wide, wrongly typed and oversized values, with and without cacheable
sampling. Every answer is a success or a 4xx in OpenAI's envelope, never a 5xx, and /health answers
throughout.

Bodies are written as text (a value 5,000 levels deep is past what any JSON encoder writes), the
hostile value spliced into an otherwise valid request.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections import Counter

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.servers import MODEL, ServerProcess

KEY = "tenant:s3cret"
AUTH = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
EXAMPLES = 220
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory, shared_redis_url):
    server = ServerProcess(
        "--max-model-len",
        "256",
        log_dir=tmp_path_factory.mktemp("hostile"),
        env={
            "RAGLLM_AUTH__KEYS": KEY,
            "REDIS_URL": shared_redis_url,
            "RAGLLM_REDIS__PREFIX": f"hostile-{os.getpid()}",
            "RAGLLM_ENGINE__MAX_WAITING": "64",
        },
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


# -- hostile values, as JSON text -----------------------------------------------------------------
def _deep(kind: str, depth: int) -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    if kind == "object":
        return '{"a": ' * depth + "1" + "}" * depth
    return (
        '{"type": "object", "properties": {"a": ' * depth + '{"type": "string"}' + "}}" * depth
    )  # a schema


def _wide(kind: str, width: int) -> str:
    if kind == "list":
        return "[" + ",".join(["0"] * width) + "]"
    if kind == "object":
        return "{" + ",".join(f'"k{i}": {i}' for i in range(width)) + "}"
    return (
        '{"type": "object", "properties": {'
        + ",".join(f'"p{i}": {{"type": "string"}}' for i in range(width))
        + "}}"
    )


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)
KNOWN_BAD = [
    {"format": ["email"]},
    {"type": "string", "format": {}},
    {"$ref": "#"},
    {"anyOf": [{"$ref": "#"}]},
    {"$schema": "http://127.0.0.1:9/x"},
    {"type": "function", "function": "get_weather"},
    {"type": "function", "function": {"name": ["get_weather"]}},
    {"type": ["object", 3]},
    {"type": "object", "properties": {"a": {"$ref": "#/properties/a"}}},
    {"enum": 1},
    {"required": "a"},
]
hostile_values = st.one_of(
    st.builds(
        _deep,
        st.sampled_from(["list", "object", "schema"]),
        st.sampled_from([2, 31, 32, 63, 64, 65, 127, 250, 256, 1023, 1025, 5000])
        | st.integers(1, 6000),
    ),
    st.builds(
        _wide,
        st.sampled_from(["list", "object", "schema"]),
        st.sampled_from([10, 5000, 20_001, 100_000, 260_000]) | st.integers(0, 30_000),
    ),
    st.sampled_from([1 << 10, 1 << 20, 9 << 20]).map(
        lambda size: orjson.dumps("x" * size).decode()
    ),
    st.sampled_from(KNOWN_BAD).map(json.dumps),
    json_values.map(json.dumps),
)


def _as_string(value: str) -> str:
    """The value carried as a JSON string (guided_json, tool-call arguments)."""
    return orjson.dumps(value).decode()


# field → how a hostile value sits in a request (``{}`` marks the spot)
PLACEMENTS = {
    "response_format.json_schema.schema": '"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}',
    "response_format": '"response_format": {}',
    "guided_json": '"guided_json": {}',
    "guided_json (string)": '"guided_json": {s}',
    "structured_outputs.json": '"structured_outputs": {"json": {}}',
    "structured_outputs.json (string)": '"structured_outputs": {"json": {s}}',
    "structured_outputs": '"structured_outputs": {}',
    "guided_regex": '"guided_regex": {}',
    "guided_choice": '"guided_choice": {}',
    "guided_grammar": '"guided_grammar": {}',
    "tools[].function.parameters": '"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]',
    "tools": '"tools": {}',
    "tool_choice": '"tools": ' + json.dumps([WEATHER]) + ', "tool_choice": {}',
    "tool_calls[].function.arguments": None,  # inside messages: see _body
    "documents": '"documents": {}',
    "documents[].text": '"documents": [{"id": "d1", "text": {}}]',
    "documents[].version": '"documents": [{"id": "d1", "text": "t", "version": {}}]',
    "chat_template_kwargs": '"chat_template_kwargs": {}',
    "stop": '"stop": {}',
    "logit_bias": '"logit_bias": {}',
    "stream_options": '"stream": true, "stream_options": {}',
    "cache_salt": '"cache_salt": {}',
}
SAMPLING = [{}, {"temperature": 0}, {"temperature": 0.7, "seed": 7}]  # the last two are cacheable


def _body(field: str, value: str, sampling: dict, route: str) -> str:
    if route == "/tokenize" or field == "tool_calls[].function.arguments":
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": "ARGS"},
        }
        messages = [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]
        arguments = _as_string(value) if field == "tool_calls[].function.arguments" else '"{}"'
        messages_text = json.dumps(messages).replace('"ARGS"', arguments)
        if route == "/tokenize":
            return '{"model": %s, "messages": %s}' % (json.dumps(MODEL), messages_text)
        return '{"model": %s, "max_tokens": 2, "messages": %s%s}' % (
            json.dumps(MODEL),
            messages_text,
            "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in sampling.items()),
        )
    placement = PLACEMENTS[field]
    spliced = (
        placement.replace("{s}", _as_string(value))
        if "{s}" in placement
        else placement.replace("{}", value, 1)
    )
    base = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        **sampling,
    }
    return orjson.dumps(base).decode()[:-1] + ", " + spliced + "}"


class HealthWatch:
    """Polls /health every 50 ms on its own connection while the hostile requests run."""

    def __init__(self, url: str) -> None:
        self.url, self.latencies, self.failures = url, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    status = client.get(f"{self.url}/health").status_code
                except httpx.HTTPError as exc:
                    status = repr(exc)
                self.latencies.append(time.perf_counter() - started)
                if status != 200:
                    self.failures.append(status)
                self._stop.wait(0.05)


def _check_answer(response: httpx.Response, label: str) -> None:
    assert response.status_code < 500, (label, response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, (label, error)
        assert isinstance(error["message"], str) and error["message"], (label, error)
        assert error["code"] is None or isinstance(error["code"], str), (label, error)
    elif "text/event-stream" in response.headers.get("content-type", ""):
        assert response.text.rstrip().endswith("data: [DONE]"), (label, response.text[-300:])
        assert '"error"' not in response.text or '"code":"internal_error"' not in response.text, (
            label
        )


def test_hostile_json_in_every_field_is_a_4xx_never_a_5xx(hostile_server):
    statuses: Counter[tuple[str, int]] = Counter()
    fields = [*PLACEMENTS]

    @given(
        field=st.sampled_from(fields),
        value=hostile_values,
        sampling=st.sampled_from(SAMPLING),
        route=st.sampled_from(["/v1/chat/completions"] * 5 + ["/tokenize"]),
    )
    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def one_request(client, field, value, sampling, route):
        if route == "/tokenize":
            field = "tool_calls[].function.arguments"
        body = _body(field, value, sampling, route)
        label = f"{route} {field} ({len(body)} bytes): {body[:200]}"
        response = client.post(f"{hostile_server.url}{route}", content=body.encode(), headers=AUTH)
        _check_answer(response, label)
        statuses[(field, response.status_code)] += 1

    # The seven bodies that each answered 500 before structure was bounded, always among the examples.
    for field, value, sampling in [
        ("response_format.json_schema.schema", _deep("schema", 125), {"temperature": 0}),
        ("response_format.json_schema.schema", _deep("schema", 500), {"temperature": 0.7}),
        ("guided_json (string)", _deep("list", 5000), {}),
        (
            "response_format.json_schema.schema",
            '{"type": "object", "properties": {"e": {"type": "string", "format": ["email"]}}}',
            {},
        ),
        (
            "response_format.json_schema.schema",
            '{"type": "string", "format": {}}',
            {"temperature": 0},
        ),
        ("tool_choice", '{"type": "function", "function": "get_weather"}', {}),
        ("tool_calls[].function.arguments", '{"a": ' + _deep("list", 5000) + "}", {}),
    ]:
        for route in ("/v1/chat/completions", "/tokenize"):
            one_request = example(field=field, value=value, sampling=sampling, route=route)(
                one_request
            )

    with HealthWatch(hostile_server.url) as health, httpx.Client(timeout=120) as client:
        one_request(client)
    print(
        "\n"
        + ", ".join(
            f"{field} {status}: {count}" for (field, status), count in sorted(statuses.items())
        )
    )
    ordered = sorted(health.latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    print(
        f"/health: {len(ordered)} probes, median {statistics.median(ordered) * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms"
    )
    assert not health.failures, health.failures[:5]
    assert len(ordered) >= 20 and p99 < 0.5
    assert sum(statuses.values()) >= EXAMPLES
    assert any(status == 200 for _, status in statuses)  # the engine was reached, not only refusals
    assert hostile_server.process.poll() is None
    assert "Traceback" not in hostile_server.log_tail_full()
