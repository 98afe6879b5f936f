"""Bad input gets OpenAI's error envelope, raised by the SDK as its matching exception class."""

from __future__ import annotations

import httpx
import openai
import pytest

HELLO = [{"role": "user", "content": "Hello"}]


def _assert_envelope(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-nonexistent", messages=HELLO)
    assert caught.value.code == "model_not_found"
    assert caught.value.body["param"] == "model"


def test_context_length_exceeded(client, model):
    long_text = "word " * 9000
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": long_text}]
        )
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=HELLO, max_tokens=8190)
    assert caught.value.code == "context_length_exceeded"
    assert "8192" in caught.value.message


@pytest.mark.parametrize(
    "overrides, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"content": "hi"}]}, "messages.0.role"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"n": 9}, "n"),
        ({"stop": 7}, "stop"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
                ]
            },
            "tools[0].function.parameters",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "messages[0].content",
        ),
    ],
)
def test_invalid_chat_requests_are_400(client, model, overrides, param):
    payload = {"model": model, "messages": HELLO, **overrides}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**payload)
    assert caught.value.body["param"] == param
    assert caught.value.body["type"] == "invalid_request_error"


def test_missing_model_field(server):
    error = _assert_envelope(
        httpx.post(f"{server.url}/v1/chat/completions", json={"messages": HELLO}), 400
    )
    assert error["param"] == "model"


def test_malformed_json_is_400(server):
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert _assert_envelope(response, 400)["code"] == "invalid_json"


def test_invalid_utf8_is_400(server, model):
    body = (
        b'{"model": "'
        + model.encode()
        + b'", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    )
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
    )
    _assert_envelope(response, 400)


def test_non_object_body_is_400(server):
    response = httpx.post(f"{server.url}/v1/chat/completions", json=[1, 2, 3])
    _assert_envelope(response, 400)


def test_unknown_route_is_404_envelope(server):
    _assert_envelope(httpx.get(f"{server.url}/v1/nothing-here"), 404)


def test_completion_errors(client, model):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model, prompt=["one", "two"])
    assert caught.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model, prompt=[10**9])
    assert caught.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")


def test_oversized_body_is_413_without_reading_it(server, model):
    body = (
        b'{"model": "'
        + model.encode()
        + b'", "messages": [{"role": "user", "content": "'
        + b"a" * (33 << 20)
        + b'"}]}'
    )
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert _assert_envelope(response, 413)["code"] == "request_too_large"
