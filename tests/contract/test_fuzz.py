"""Fuzzing the HTTP API from its own OpenAPI schema (Schemathesis): valid and invalid bodies for every
operation, against a real server. No 5xx, and every response matches the schema it documents.

A 64-token context keeps each generated answer short; most fuzzed requests name the served model
(otherwise nearly all would stop at 404 and the engine would never be reached).
"""

from __future__ import annotations

import zlib
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.support.servers import MODEL, ServerProcess

EXAMPLES_PER_OPERATION = 60
# Sent in every positive run besides what the generator draws: the valid bodies it draws mostly ask for
# more than the 64-token context holds (400), and a run that drew no answerable one never reached the
# engine (seen: 0 answers in 60 for each generation endpoint).
ANSWERABLE = {
    "POST /v1/chat/completions": {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
    },
    "POST /v1/completions": {"model": MODEL, "prompt": "Hi", "max_tokens": 4},
}


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory):
    server = ServerProcess(
        "--max-model-len",
        "64",
        log_dir=tmp_path_factory.mktemp("fuzzed"),
        env={"RAGLLM_ENGINE__MAX_WAITING": "64", "RAGLLM_AUTH__ADMIN_KEYS": "ops:fuzz-admin"},
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    return schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")


def _operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_and_responses_match_the_schema(api_schema, mode):
    operations = _operations(api_schema)
    assert {op.label for op in operations} >= {
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "POST /tokenize",
        "POST /detokenize",
        "GET /v1/models",
        "GET /health",
        "POST /admin/cache/invalidate",
    }
    statuses: Counter[tuple[str, int]] = Counter()
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # a GET without parameters has no invalid form
        _fuzz(operation, mode, statuses)
    print(
        f"\nfuzzed ({mode.value}): "
        + ", ".join(
            f"{label} {status}: {count}" for (label, status), count in sorted(statuses.items())
        )
    )
    assert all(status < 500 for _, status in statuses)
    if (
        mode is GenerationMode.POSITIVE
    ):  # the engine was reached, not only the validation in front of it
        assert (
            statuses[("POST /v1/chat/completions", 200)] + statuses[("POST /v1/completions", 200)]
            >= 2
        )


def _fuzz(operation, mode: GenerationMode, statuses: Counter) -> None:
    answerable = ANSWERABLE.get(operation.label) if mode is GenerationMode.POSITIVE else None

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def one_request(case):
        if (
            isinstance(case.body, dict)
            and isinstance(case.body.get("model"), str)
            and zlib.crc32(repr(case.body).encode()) % 5
        ):
            case.body["model"] = MODEL
        headers = {"Cache-Control": "no-store"}
        if operation.path.startswith("/admin/"):  # past the admin key, to the body's validation
            headers["Authorization"] = "Bearer fuzz-admin"
        response = case.call_and_validate(
            checks=[not_a_server_error, response_schema_conformance], headers=headers, timeout=60
        )
        statuses[(operation.label, response.status_code)] += 1

    if answerable is not None:
        one_request = example(
            case=operation.Case(body=dict(answerable), media_type="application/json")
        )(one_request)
    one_request()
