"""Structured outputs against the packaged model, with the clients RAG pipelines use: the official
SDK's ``parse`` and LangChain's ``with_structured_output`` (its default, json_schema), vLLM's
``structured_outputs`` and ``guided_*`` fields, streaming, and the errors for what cannot be enforced."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

NO_CACHE = {"Cache-Control": "no-cache, no-store"}


class Grade(BaseModel):
    """Whether a retrieved document is relevant to the question."""

    relevant: Literal["yes", "no"]
    reason: str = Field(max_length=80)


class City(BaseModel):
    name: str
    country: str
    population_millions: float = Field(ge=0, le=50)


def _ask(client, model, content, max_tokens=120, **kwargs):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=max_tokens,
        extra_headers=NO_CACHE,
        **kwargs,
    )


def test_sdk_parse_returns_a_valid_object(client, model):
    completion = client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "Describe Paris as a city record."}],
        response_format=City,
        temperature=0,
        max_tokens=120,
        extra_headers=NO_CACHE,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    assert 0 <= choice.message.parsed.population_millions <= 50


def test_langchain_with_structured_output_returns_the_model(server, model):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=model,
        base_url=f"{server.url}/v1",
        api_key="not-needed",
        temperature=0,
        max_tokens=120,
        default_headers=NO_CACHE,
        max_retries=0,
    )
    grader = llm.with_structured_output(Grade)  # method="json_schema": response_format
    grade = grader.invoke(
        "Document: Paris is the capital of France. Question: what is France's capital? "
        "Is the document relevant?"
    )
    assert isinstance(grade, Grade)
    assert grade.relevant in ("yes", "no") and len(grade.reason) <= 80


def test_json_schema_answers_validate_and_stop(client, model):
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "maxLength": 60},
            "sources": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
        },
        "required": ["answer", "sources"],
    }
    response = _ask(
        client,
        model,
        "What is the capital of France? Cite sources.",
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "a", "schema": schema, "strict": True},
        },
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    value = json.loads(choice.message.content)
    jsonschema.validate(value, schema)
    assert set(value) == {"answer", "sources"}  # no keys beyond the schema's


def test_json_object_mode_answers_one_object(client, model):
    response = _ask(
        client,
        model,
        "Give me a JSON object about a cat.",
        response_format={"type": "json_object"},
        max_tokens=200,
    )
    if response.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(response.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a prefix of one object
        assert response.choices[0].message.content.startswith("{")


@pytest.mark.parametrize(
    "extra, check",
    [
        (
            {"structured_outputs": {"choice": ["positive", "negative", "neutral"]}},
            lambda text: text in ("positive", "negative", "neutral"),
        ),
        ({"guided_choice": ["yes", "no"]}, lambda text: text in ("yes", "no")),
        (
            {"structured_outputs": {"regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"}},
            lambda text: re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text),
        ),
        (
            {"guided_regex": r"(Yes|No), because [a-z ]{1,40}\."},
            lambda text: re.fullmatch(r"(Yes|No), because [a-z ]{1,40}\.", text),
        ),
        (
            {
                "structured_outputs": {
                    "grammar": 'start: "The answer is " ANSWER "."\nANSWER: "Paris" | "Lyon"'
                }
            },
            lambda text: text in ("The answer is Paris.", "The answer is Lyon."),
        ),
        ({"guided_grammar": 'root ::= "[" [1-3] "]"'}, lambda text: text in ("[1]", "[2]", "[3]")),
    ],
)
def test_vllm_constraints_shape_the_answer(client, model, extra, check):
    response = _ask(
        client, model, "What is the capital of France? Answer briefly.", extra_body=extra
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert check(choice.message.content), choice.message.content


def test_text_completions_take_constraints_too(client, model):
    response = client.completions.create(
        model=model,
        prompt="The capital of France is",
        max_tokens=20,
        temperature=0,
        extra_headers=NO_CACHE,
        extra_body={"structured_outputs": {"choice": [" Paris", " Rome"]}},
    )
    assert response.choices[0].text in (" Paris", " Rome")
    assert response.choices[0].finish_reason == "stop"


def test_a_streamed_constrained_answer_is_the_same_as_the_whole_one(client, model):
    kwargs = dict(
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "c", "schema": City.model_json_schema()},
        }
    )
    whole = _ask(client, model, "Describe Rome.", **kwargs).choices[0].message.content
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe Rome."}],
        temperature=0,
        max_tokens=120,
        extra_headers=NO_CACHE,
        stream=True,
        **kwargs,
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == whole
    City.model_validate_json(streamed)


@pytest.mark.parametrize(
    "body, param",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {
                            "type": "object",
                            "properties": {"a": {"type": "string", "format": "no-such-format"}},
                        },
                    },
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"guided_grammar": "start: missing_rule"}, "guided_grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
        # U+6815C: its first byte, 0xF1, is in no token of the packaged vocabulary (found by the fuzz test).
        ({"guided_regex": "2\U0006815c"}, "guided_regex"),
        # Past what the grammar parser can hold: refused before compiling.
        ({"guided_choice": [f"c{i}" for i in range(2000)]}, "guided_choice"),
        (
            {
                "structured_outputs": {
                    "json": {
                        "type": "object",
                        "properties": {f"p{i}": {"type": "integer"} for i in range(5000)},
                    }
                }
            },
            "structured_outputs.json",
        ),
    ],
)
def test_what_cannot_be_enforced_is_a_clear_400(server, model, body, param):
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        timeout=60,
        json={
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            **body,
        },
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"]


def test_a_constraint_that_dead_ends_mid_answer_is_a_400_naming_the_field(server, model):
    """The pattern is written in ASCII escapes, so only the answer finds that byte 0x04 is in no
    token: the request ends with a 400 of its own, the next request is served as usual."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    dead_end = httpx.post(
        f"{server.url}/v1/chat/completions",
        timeout=60,
        headers=NO_CACHE,
        json={**body, "structured_outputs": {"regex": "ab\\x04"}},
    )
    assert dead_end.status_code == 400, dead_end.text
    error = dead_end.json()["error"]
    assert (
        error["code"] == "structured_output_failed" and error["param"] == "structured_outputs.regex"
    )
    assert (
        error["message"].startswith("the answer could not follow") and "\n" not in error["message"]
    )
    after = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, headers=NO_CACHE, json=body)
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"]


async def test_constrained_rows_leave_unconstrained_neighbours_exactly_as_alone(server, model):
    """A batch mixing constrained and free rows: the free rows get the tokens they get alone."""
    # A client of this test's own event loop (a shared one keeps connections of a closed loop).
    async_client = openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=300
    )

    async def free(question):
        response = await async_client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=40,
            extra_headers=NO_CACHE,
        )
        return response.choices[0].message.content

    questions = ["Name three colours.", "What is 2 + 2?", "Say hello in French."]
    alone = [await free(q) for q in questions]

    async def constrained(i):
        response = await async_client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Give record {i}"}],
            temperature=0,
            max_tokens=60,
            extra_headers=NO_CACHE,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "c", "schema": City.model_json_schema()},
            },
        )
        return response.choices[0]

    together = await asyncio.gather(
        *[free(q) for q in questions], *[constrained(i) for i in range(5)]
    )
    await async_client.close()
    assert list(together[:3]) == alone
    for choice in together[3:]:
        if choice.finish_reason == "stop":
            City.model_validate_json(choice.message.content)
