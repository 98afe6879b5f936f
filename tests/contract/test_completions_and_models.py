"""The official OpenAI SDK against a real server: text completions, models, health, metrics."""

from __future__ import annotations

import httpx

from tests.support.servers import metric_value


def test_completion_from_text(client, model):
    completion = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    choice = completion.choices[0]
    assert choice.text
    assert choice.finish_reason in ("stop", "length")
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert (
        completion.usage.total_tokens
        == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_completion_from_token_ids_matches_text(client, model):
    by_text = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    # Token ids for the same text, from the server's own count: re-send them and expect the same output.
    from transformers import AutoTokenizer

    from ragllm.config import load_settings
    from ragllm.models import resolve_model

    settings = load_settings()
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model(settings.engine.model, settings.engine.model_cache_dir)
    )
    ids = tokenizer("The capital of France is").input_ids
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids) == by_text.usage.prompt_tokens


def test_streaming_completion(client, model):
    chunks = list(
        client.completions.create(
            model=model,
            prompt="Once upon a time",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = client.completions.create(
        model=model,
        prompt="Once upon a time",
        max_tokens=12,
        temperature=0,
        extra_headers={"Cache-Control": "no-cache"},
    )
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12


def test_models_list(client, model):
    models = client.models.list()
    assert [m.id for m in models.data] == [model]
    assert models.data[0].object == "model"


def test_health_reports_model_engine_and_uptime(server, model):
    response = httpx.get(f"{server.url}/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["model"] == model
    assert body["engine"] == "transformers"
    assert body["uptime_s"] > 0


def test_metrics_use_vllm_names(server, client, model):
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "vllm:time_to_first_token_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:request_queue_time_seconds_count",
        "ragllm_requests_total",
        "ragllm_requests_in_flight",
    ):
        metric_value(text, name)
    assert metric_value(text, "vllm:generation_tokens_total") >= 3
    assert 'ragllm_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


def test_openapi_documents_extension_fields(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]
    chat = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for field in ("top_k", "min_p", "repetition_penalty", "thinking_token_budget"):
        assert "Extension" in chat[field]["description"]


def test_non_streaming_responses_carry_timing_headers(client, model):
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        extra_headers={"Cache-Control": "no-cache"},
    )
    completion = raw.parse()
    headers = raw.headers
    assert int(headers["x-ragllm-prompt-tokens"]) == completion.usage.prompt_tokens
    assert int(headers["x-ragllm-completion-tokens"]) == completion.usage.completion_tokens
    queue, ttft, total = (
        float(headers[f"x-ragllm-{name}-ms"]) for name in ("queue", "ttft", "total")
    )
    assert 0 <= queue <= ttft <= total
