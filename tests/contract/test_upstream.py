"""The upstream engine and its router, against real upstream processes on loopback.

Two `ragllm serve` processes with the packaged model are the upstreams; a third, `--engine upstream`,
is the gateway in front of them.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import re
import socket
import time

import httpx
import openai
import pytest

from tests.support.servers import MODEL, ServerProcess, free_port, metric_value, send_chat_raw

NO_CACHE = {"Cache-Control": "no-cache, no-store"}
LONG_DOCUMENTS = [
    {"id": "bridge", "text": "The Verdant Bridge in Oslund was completed in 1987. " * 8},
    {"id": "ferry", "text": "Before the bridge, a ferry crossed the river every hour. " * 8},
]


class Cluster:
    def __init__(self, tmp_path_factory) -> None:
        self.log_dir = tmp_path_factory.mktemp("cluster")
        self.ports = [free_port(), free_port()]
        self.upstreams = [self._upstream(port) for port in self.ports]
        urls = ",".join(f"http://127.0.0.1:{port}" for port in self.ports)
        self.gateway = ServerProcess(
            "--engine",
            "upstream",
            log_dir=self.log_dir,
            env={
                "RAGLLM_UPSTREAM__URLS": urls,
                "RAGLLM_UPSTREAM__PROBE_INTERVAL_S": "0.3",
                "RAGLLM_UPSTREAM__EJECT_FOR_S": "1",
                "RAGLLM_UPSTREAM__AFFINITY_SLACK": "1",
                "RAGLLM_ENGINE__MAX_WAITING": "64",
            },
        )

    def _upstream(self, port: int) -> ServerProcess:
        # Short chunked-prefill steps: a replica drops a cancelled request between steps, so a long
        # prompt's prefill can be cut short (the cancellation tests below rely on it).
        return ServerProcess(
            port=port,
            log_dir=self.log_dir,
            env={
                "RAGLLM_ENGINE__MAX_WAITING": "64",
                "RAGLLM_ENGINE__CHUNKED_PREFILL": "true",
                "RAGLLM_ENGINE__MAX_NUM_BATCHED_TOKENS": "128",
            },
        )

    def ready(self) -> Cluster:
        for server in self.upstreams:
            server.wait_ready()
        self.wait_all_upstreams_up()
        return self

    def wait_all_upstreams_up(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            health = httpx.get(f"{self.gateway.url}/health").json()
            if health["status"] == "ok" and not health["detail"]:
                return
            time.sleep(0.1)
        raise TimeoutError(f"gateway never saw every upstream up: {health}")

    def served(self) -> list[float]:
        """Chat requests each upstream has answered so far."""
        counts = []
        for server in self.upstreams:
            text = httpx.get(f"{server.url}/metrics").text
            try:
                counts.append(
                    metric_value(
                        text, 'ragllm_requests_total{endpoint="/v1/chat/completions",status="200"}'
                    )
                )
            except KeyError:
                counts.append(0.0)
        return counts

    def stop(self) -> None:
        for server in (self.gateway, *self.upstreams):
            server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory)
    try:
        yield cluster.ready()
    finally:
        cluster.stop()


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


def _chat(server: ServerProcess, content: str, **extra):
    return _client(server).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        temperature=extra.pop("temperature", 0),
        max_tokens=extra.pop("max_tokens", 8),
        extra_headers=NO_CACHE,
        **extra,
    )


def _counts(usage) -> tuple[int, int, int]:
    """The token counts of a usage. Its prefix-cache hit is left out: it is the replica's own state (a
    request sent earlier left the prompt cached there, or the router picked the other replica)."""
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def test_gateway_answers_as_the_upstream_does(cluster):
    direct = _chat(cluster.upstreams[0], "What is the capital of France?")
    through = _chat(cluster.gateway, "What is the capital of France?")
    assert through.choices[0].message.content == direct.choices[0].message.content
    # The same counts; the prefix-cache hit is the replica's own (the direct call left the prompt cached
    # there), relayed as the replica reported it.
    assert _counts(through.usage) == _counts(direct.usage)
    chunks = list(
        _client(cluster.gateway).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=NO_CACHE,
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == direct.choices[0].message.content
    )
    assert _counts(chunks[-1].usage) == _counts(direct.usage)
    assert [m.id for m in _client(cluster.gateway).models.list().data] == [MODEL]
    with pytest.raises(openai.NotFoundError):
        _client(cluster.gateway).chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )


def test_rag_requests_are_budgeted_through_the_upstreams_tokenizer(cluster):
    completion = _chat(
        cluster.gateway,
        "When was the bridge completed?",
        max_tokens=16,
        extra_body={"documents": LONG_DOCUMENTS, "rag": {"max_context_tokens": 150}},
    )
    report = completion.model_extra["rag"]
    assert report["used_documents"] == ["bridge"] and report["dropped_documents"] == ["ferry"]


def test_load_spreads_over_both_replicas(cluster):
    before = cluster.served()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda i: _chat(cluster.gateway, f"Say the number {i}."), range(6)))
    after = cluster.served()
    shares = [a - b for a, b in zip(after, before)]
    assert sum(shares) == 6 and min(shares) >= 2


def test_affinity_keeps_a_document_set_on_one_replica_within_the_bound(cluster):
    def ask(i: int):
        return _chat(
            cluster.gateway,
            f"Question {i} about the bridge?",
            extra_body={"documents": LONG_DOCUMENTS},
        )

    cluster.wait_all_upstreams_up()
    before = cluster.served()
    for i in range(4):  # one at a time: the preferred replica is never busier than the other
        ask(i)
    after = cluster.served()
    assert sorted(a - b for a, b in zip(after, before)) == [0, 4]
    before = after
    with concurrent.futures.ThreadPoolExecutor(
        8
    ) as pool:  # at once: slack 1 spills to the other replica
        list(pool.map(ask, range(8)))
    shares = sorted(a - b for a, b in zip(cluster.served(), before))
    assert sum(shares) == 8 and shares[0] >= 1, shares


def test_a_document_set_keeps_its_replica_whatever_its_scores_and_order(cluster):
    """Each question retrieves the same documents with other scores, so under rag.order "relevance"
    each renders another first message; the router keys on the set, so one replica answers them all
    (keyed on the first message, eight different ones would all meet on one of two replicas with a
    chance of 1 in 128)."""
    documents = [
        {"id": f"part-{i}", "text": f"Part {i} of the Verdant Bridge was cast in {1980 + i}. " * 6}
        for i in range(4)
    ]
    layouts = []
    cluster.wait_all_upstreams_up()
    before = cluster.served()
    for i in range(8):  # one at a time: the preferred replica is never busier than the other
        scores = list(itertools.permutations([0.9, 0.7, 0.5, 0.3]))[i * 3]  # 8 of the 24 rankings
        rescored = [{**d, "score": s} for d, s in zip(documents, scores)]
        completion = _chat(
            cluster.gateway,
            f"Question {i}: when was part {i % 4} cast?",
            extra_body={"documents": rescored[i % 4 :] + rescored[: i % 4]},
        )
        layouts.append(tuple(completion.model_extra["rag"]["used_documents"]))
    shares = sorted(a - b for a, b in zip(cluster.served(), before))
    assert len(set(layouts)) == 8  # eight different renderings of one set
    assert shares == [0, 8], shares


def test_killing_an_upstream_loses_no_request_and_the_pool_recovers(cluster):
    statuses: list[int] = []

    def request(i: int) -> int:
        response = httpx.post(
            f"{cluster.gateway.url}/v1/chat/completions",
            timeout=120,
            headers=NO_CACHE,
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Count to {i}."}],
                "max_tokens": 12,
                "temperature": 0,
            },
        )
        return response.status_code

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(request, i) for i in range(12)]
        while sum(f.done() for f in futures) < 3:
            time.sleep(0.05)
        cluster.upstreams[1].kill()  # a crash, mid-load; some requests are on it
        statuses = [f.result() for f in futures]
    assert statuses == [200] * 12
    cluster.upstreams[1] = cluster._upstream(cluster.ports[1])
    cluster.upstreams[1].wait_ready()
    cluster.wait_all_upstreams_up()
    before = cluster.served()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: _chat(cluster.gateway, f"Say {i}."), range(4)))
    assert all(a - b >= 1 for a, b in zip(cluster.served(), before))


def test_a_stream_cut_mid_way_ends_with_an_error_event(cluster):
    payload = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long essay about rivers."}],
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    lines: list[str] = []
    with httpx.stream(
        "POST",
        f"{cluster.gateway.url}/v1/chat/completions",
        json=payload,
        headers=NO_CACHE,
        timeout=120,
    ) as response:
        iterator = response.iter_lines()
        for line in iterator:
            if line.startswith("data:"):
                lines.append(line)
            if len(lines) == 4:
                break
        serving = next(
            i
            for i, server in enumerate(cluster.upstreams)
            if metric_value(httpx.get(f"{server.url}/metrics").text, "vllm:num_requests_running")
            == 1
        )
        cluster.upstreams[serving].kill()
        lines += [line for line in iterator if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    assert '"error"' in lines[-2] and "broke off" in lines[-2]
    assert not any('"finish_reason":"length"' in line for line in lines)
    cluster.upstreams[serving] = cluster._upstream(cluster.ports[serving])
    cluster.upstreams[serving].wait_ready()
    cluster.wait_all_upstreams_up()


def _running(cluster) -> list[int]:
    return [httpx.get(f"{server.url}/health").json()["running"] for server in cluster.upstreams]


def _wait_idle(cluster, within_s: float) -> float:
    """Seconds until no replica runs anything; fails past ``within_s``."""
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        if sum(_running(cluster)) == 0:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(
        f"replicas still running {_running(cluster)} {within_s} s after the clients left"
    )


def _wait_busy(cluster, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(_running(cluster)) == 0:
        assert time.monotonic() < deadline, "no replica started the request"
        time.sleep(0.02)


LONG = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Write a very long essay about rivers."}],
    "max_tokens": 400,
    "temperature": 0,
    "ignore_eos": True,
}


def _read_until(connection: socket.socket, marker: bytes) -> None:
    received = b""
    while marker not in received:
        chunk = connection.recv(65536)
        assert chunk, "the connection closed first"
        received += chunk


def _left_then_idle_s(cluster, body: dict, first_token: bool) -> float:
    cluster.wait_all_upstreams_up()
    _wait_idle(cluster, 30)
    connection = send_chat_raw(cluster.gateway.url, body)
    _wait_busy(cluster)
    if first_token:
        _read_until(connection, b'"content":"')
    else:
        time.sleep(0.5)  # mid-answer (or mid-prefill) with nothing sent back yet
        assert sum(_running(cluster)) == 1
    connection.close()
    return _wait_idle(cluster, 1.0)


def test_a_client_that_leaves_a_stream_cancels_the_upstream_request(cluster):
    assert _left_then_idle_s(cluster, {**LONG, "stream": True}, first_token=True) <= 1.0


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole answer"])
def test_an_answer_left_through_the_gateway_is_charged_the_prompt_the_replica_computed(
    cluster, stream
):
    """The gateway streams from its replicas, whole answers too, with the usage on every chunk, so an
    answer its client leaves part-way is charged the prompt and the tokens reported so far (before:
    a stream its chunks only, a whole answer nothing)."""

    def counted() -> tuple[float, float, float, float]:
        gateway = httpx.get(f"{cluster.gateway.url}/metrics").text
        replicas = [httpx.get(f"{server.url}/metrics").text for server in cluster.upstreams]
        return (
            metric_value(gateway, "vllm:prompt_tokens_total"),
            metric_value(gateway, "vllm:generation_tokens_total"),
            sum(metric_value(text, "ragllm_engine_prompt_tokens_total") for text in replicas),
            sum(metric_value(text, "ragllm_engine_generation_tokens_total") for text in replicas),
        )

    cluster.wait_all_upstreams_up()
    _wait_idle(cluster, 30)
    before = counted()
    connection = send_chat_raw(cluster.gateway.url, {**LONG, "stream": stream})
    _wait_busy(cluster)
    if stream:
        _read_until(connection, b'"content":"')
    else:
        time.sleep(1.5)  # some tokens made, nothing sent back yet
    connection.close()
    _wait_idle(cluster, 1.0)
    deadline = (
        time.monotonic() + 5
    )  # the gateway records the request once it notices the client left
    while counted()[0] == before[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    gateway_prompt, gateway_generated, replica_prompt, replica_generated = (
        after - earlier for after, earlier in zip(counted(), before)
    )
    assert gateway_prompt == replica_prompt > 0
    assert 1 <= gateway_generated <= replica_generated


def test_a_client_that_leaves_before_a_whole_answer_cancels_the_upstream_request(cluster):
    assert _left_then_idle_s(cluster, {**LONG, "stream": False}, first_token=False) <= 1.0


def test_a_client_that_leaves_before_the_first_token_cancels_the_upstream_request(cluster):
    # ~3,300 tokens: several seconds of prefill in 128-token steps before the first token.
    long_prompt = " ".join(f"Sentence {i} about the weather in town {i}." for i in range(300))
    body = {**LONG, "messages": [{"role": "user", "content": long_prompt}], "stream": True}
    assert _left_then_idle_s(cluster, body, first_token=False) <= 1.0


def test_logprobs_are_relayed_as_the_upstream_computed_them(cluster):
    def logprobs(server, stream: bool) -> list[tuple]:
        kwargs = dict(
            model=MODEL,
            messages=[{"role": "user", "content": "Name a fruit."}],
            temperature=0,
            max_tokens=5,
            logprobs=True,
            top_logprobs=2,
            extra_headers=NO_CACHE,
        )
        if not stream:
            content = _client(server).chat.completions.create(**kwargs).choices[0].logprobs.content
        else:
            chunks = _client(server).chat.completions.create(stream=True, **kwargs)
            content = [
                e
                for c in chunks
                if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content
            ]
        return [
            (e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in content
        ]

    def assert_same(relayed: list[tuple], computed: list[tuple]) -> None:
        """The same tokens and top alternatives, the same values to float32 rounding: a replica whose
        prefix cache holds the prompt computes its last position over cached keys, in another order."""
        assert [(t, [a for a, _ in top]) for t, _, top in relayed] == [
            (t, [a for a, _ in top]) for t, _, top in computed
        ]
        for (_, value, top), (_, expected, expected_top) in zip(relayed, computed):
            assert abs(value - expected) < 1e-4
            assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(top, expected_top))

    direct = logprobs(cluster.upstreams[0], stream=False)
    assert len(direct) == 5
    assert_same(logprobs(cluster.gateway, stream=False), direct)
    assert_same(logprobs(cluster.gateway, stream=True), direct)
    legacy = _client(cluster.gateway).completions.create(
        model=MODEL,
        prompt="Once upon a",
        max_tokens=3,
        temperature=0,
        logprobs=2,
        extra_headers=NO_CACHE,
    )
    assert (
        len(legacy.choices[0].logprobs.tokens) == 3
        and len(legacy.choices[0].logprobs.top_logprobs[0]) == 2
    )


def test_structured_outputs_reach_the_upstream_as_sent(cluster):
    """The gateway enforces nothing itself: the upstream gets response_format and vLLM's fields as
    the client sent them, and its answers come back unchanged."""
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "country": {"type": "string", "maxLength": 30},
        },
        "required": ["city", "country"],
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
    direct = _chat(
        cluster.upstreams[0], "Where is Paris?", max_tokens=60, response_format=response_format
    )
    through = _chat(
        cluster.gateway, "Where is Paris?", max_tokens=60, response_format=response_format
    )
    assert through.choices[0].message.content == direct.choices[0].message.content
    assert set(json.loads(through.choices[0].message.content)) == {"city", "country"}
    for extra in ({"guided_choice": ["yes", "no"]}, {"structured_outputs": {"regex": "(yes|no)!"}}):
        answer = (
            _chat(cluster.gateway, "Is Paris in France?", max_tokens=10, extra_body=extra)
            .choices[0]
            .message.content
        )
        assert answer in ("yes", "no", "yes!", "no!")
    refused = httpx.post(
        f"{cluster.gateway.url}/v1/chat/completions",
        timeout=30,
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "guided_regex": "(unclosed",
        },
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "guided_regex"


def test_constrained_citations_go_to_the_upstream_as_a_regular_expression(cluster):
    from ragllm.rag.citations import citation_pattern

    body = httpx.post(
        f"{cluster.gateway.url}/v1/chat/completions",
        timeout=120,
        headers=NO_CACHE,
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "When was the bridge completed?"}],
            "documents": LONG_DOCUMENTS,
            "rag": {"citations": "constrained"},
            "temperature": 0,
            "max_tokens": 80,
        },
    ).json()
    answer = body["choices"][0]["message"]["content"]
    assert body["rag"]["citation_mode"] == "constrained"
    assert re.fullmatch(
        citation_pattern(["bridge", "ferry"], "The documents do not contain the answer."), answer
    ), answer


def test_tool_calls_are_relayed_as_the_upstream_made_them(cluster):
    """tools, tool_choice and parallel_tool_calls reach the upstream as sent; its calls come back as
    calls (whole, and as streamed entries), and a tool turn goes back to it."""
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 40}},
                "required": ["city"],
            },
        },
    }
    extra = dict(max_tokens=60, tools=[weather], tool_choice="required", parallel_tool_calls=False)
    direct = _chat(cluster.upstreams[0], "What is the weather in Oslo?", **extra).choices[0]
    through = _chat(cluster.gateway, "What is the weather in Oslo?", **extra).choices[0]
    assert through.finish_reason == direct.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in through.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in direct.message.tool_calls
    ]
    chunks = list(
        _client(cluster.gateway).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
            temperature=0,
            stream=True,
            extra_headers=NO_CACHE,
            **extra,
        )
    )
    entries = [
        e
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
        for e in c.choices[0].delta.tool_calls
    ]
    assert [(e.index, e.function.name, e.function.arguments) for e in entries] == [
        (0, c.function.name, c.function.arguments) for c in direct.message.tool_calls
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    call = through.message.tool_calls[0]
    second = _client(cluster.gateway).chat.completions.create(
        model=MODEL,
        temperature=0,
        max_tokens=20,
        extra_headers=NO_CACHE,
        tools=[weather],
        messages=[
            {"role": "user", "content": "What is the weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "Snow, -3 degrees."},
        ],
    )
    assert second.choices[0].message.content


def test_sampling_fields_left_out_are_left_to_the_upstreams_model():
    """A field the client leaves out is not sent, so the replica's own defaults (the packaged model's
    top_p 0.9) apply as they do when it is called directly; one the client sets is sent."""
    from ragllm.config import EngineSettings, UpstreamSettings
    from ragllm.engines.upstream.engine import UpstreamEngine
    from ragllm.generation import GenerationRequest, SamplingParams

    engine = UpstreamEngine(
        EngineSettings(), UpstreamSettings(urls=["http://127.0.0.1:9"])
    )  # never started
    _, left_out = engine._payload(GenerationRequest("a", SamplingParams(seed=4), messages=[]))
    _, chosen = engine._payload(
        GenerationRequest(
            "b",
            SamplingParams(top_p=1.0, temperature=0.5, seed=4),
            messages=[],
            sampling_set=frozenset({"top_p", "temperature"}),
        )
    )
    assert "top_p" not in left_out and "temperature" not in left_out and left_out["seed"] == 4
    assert chosen["top_p"] == 1.0 and chosen["temperature"] == 0.5


def test_several_choices_are_relayed_as_the_upstream_sampled_them(cluster):
    """Sampled with a seed and no top_p: the gateway's choices are the replica's own."""
    sampled = dict(n=3, seed=11, temperature=1.0, max_tokens=10)
    direct = _chat(cluster.upstreams[0], "Name a fruit.", **sampled)
    through = _chat(cluster.gateway, "Name a fruit.", **sampled)
    assert [c.message.content for c in through.choices] == [
        c.message.content for c in direct.choices
    ]
    assert len({c.message.content for c in through.choices}) > 1


def test_several_choices_are_relayed_as_the_upstream_made_them(cluster):
    """Greedy, whole and streamed: indices, texts and usage as the replica gave them."""
    extra = dict(n=3, max_tokens=10)
    direct = _chat(cluster.upstreams[0], "Name a fruit.", **extra)
    through = _chat(cluster.gateway, "Name a fruit.", **extra)
    assert [c.index for c in through.choices] == [0, 1, 2]
    assert [c.message.content for c in through.choices] == [
        c.message.content for c in direct.choices
    ]
    assert _counts(through.usage) == _counts(direct.usage)
    chunks = list(
        _client(cluster.gateway).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Name a fruit."}],
            stream=True,
            temperature=0,
            stream_options={"include_usage": True},
            extra_headers=NO_CACHE,
            **extra,
        )
    )
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert texts == {c.index: c.message.content for c in direct.choices}
    assert _counts(chunks[-1].usage) == _counts(direct.usage)


def test_the_gateways_answers_validate_against_openais_schema(cluster):
    """What the gateway relays (several choices, tool calls, logprobs; whole and streamed) is still
    a valid OpenAI response."""
    from tests.support.openai_schema import WEATHER, sse_events, validate

    bodies = [
        {"n": 2, "seed": 3, "temperature": 1.0},
        {"tools": [WEATHER], "tool_choice": "required"},
        {"logprobs": True, "top_logprobs": 2},
    ]
    for extra in bodies:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Weather in Oslo?"}],
            "max_tokens": 30,
            "temperature": 0,
            **extra,
        }
        whole = httpx.post(
            f"{cluster.gateway.url}/v1/chat/completions", json=body, headers=NO_CACHE, timeout=120
        )
        assert whole.status_code == 200, whole.text
        validate(whole.json(), "CreateChatCompletionResponse")
        streamed = httpx.post(
            f"{cluster.gateway.url}/v1/chat/completions",
            headers=NO_CACHE,
            timeout=120,
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
        )
        for event in sse_events(streamed.text):
            validate(event, "CreateChatCompletionStreamResponse")
