"""Schema conformance: for each of the JSON Schemas in tests/data/json_schemas.json (what Pydantic and
LangChain emit: nested objects, arrays, enums, optional fields, anyOf, $defs/$ref, string formats,
numeric bounds), the packaged model's greedy answer parses, validates and ends with "stop".

The requests are what a client of a 135M-parameter model sends: greedy, with a repetition penalty
(such a small model otherwise repeats itself inside strings and lists, constrained or not). They
run together, on a server of their own with room for all of them in one batch.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.support.servers import MODEL, ServerProcess

SCHEMAS = json.loads((Path(__file__).parents[1] / "data" / "json_schemas.json").read_text())
MAX_TOKENS = 256


@pytest.fixture(scope="module")
def wide_server(tmp_path_factory):
    server = ServerProcess(
        log_dir=tmp_path_factory.mktemp("conformance"),
        env={
            "RAGLLM_ENGINE__MAX_NUM_SEQS": "40",
            "RAGLLM_ENGINE__MAX_BATCH_SIZE": "40",
            "RAGLLM_ENGINE__MAX_WAITING": "256",
            "RAGLLM_ENGINE__MAX_QUEUE_WAIT_S": "600",
            # What is measured here is conformance, not the mask budget (tests/structured has
            # that): a shared CI machine must not refuse a schema for a slow first mask.
            "RAGLLM_ENGINE__GRAMMAR_MASK_BUDGET_MS": "200",
        },
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


async def _answer(client: openai.AsyncOpenAI, item: dict) -> tuple[str, str, str]:
    response = await client.chat.completions.create(
        model=MODEL,
        temperature=0,
        max_tokens=MAX_TOKENS,
        extra_body={"repetition_penalty": 1.3},
        messages=[
            {"role": "system", "content": "Reply with one JSON object."},
            {
                "role": "user",
                "content": f"Give an example {item['name']} ({item['schema'].get('description', '')}).",
            },
        ],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": item["name"], "schema": item["schema"]},
        },
        extra_headers={"Cache-Control": "no-cache, no-store"},
    )
    choice = response.choices[0]
    return item["name"], choice.finish_reason, choice.message.content


def test_the_schema_set_covers_what_clients_emit():
    assert len(SCHEMAS) >= 100
    text = json.dumps([item["schema"] for item in SCHEMAS])
    for feature in (
        '"$defs"',
        '"$ref"',
        '"anyOf"',
        '"enum"',
        '"format": "date-time"',
        '"format": "email"',
        '"format": "uuid"',
        '"maximum"',
        '"minLength"',
        '"pattern"',
        '"items"',
        '"maxItems"',
        '"additionalProperties"',
        '"null"',
    ):
        assert feature in text, feature
    assert {item["emitted_by"] for item in SCHEMAS} == {"pydantic", "langchain"}


async def test_every_greedy_answer_validates_and_stops(wide_server):
    client = openai.AsyncOpenAI(
        base_url=f"{wide_server.url}/v1", api_key="not-needed", max_retries=0, timeout=600
    )
    answers = await asyncio.gather(*[_answer(client, item) for item in SCHEMAS])
    failures = []
    for item, (name, finish_reason, content) in zip(SCHEMAS, answers):
        try:
            jsonschema.validate(
                json.loads(content),
                item["schema"],
                format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
            )
            assert finish_reason == "stop", f"finish_reason {finish_reason}"
        except (ValueError, AssertionError, jsonschema.ValidationError) as exc:
            failures.append(f"{name}: {str(exc)[:120]} | {content[:120]!r}")
    assert not failures, "\n".join(failures)
