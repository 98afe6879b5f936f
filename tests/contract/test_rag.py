"""The RAG contract against a real server with the packaged model, through the SDK and ragllm.client."""

from __future__ import annotations

import os

import openai
import pytest

from ragllm.client import AsyncRagClient, Document, RagClient
from ragllm.rag.citations import parse_citations
from ragllm.rag.contract import RagDocument, RagOptions
from tests.support.servers import MODEL, ServerProcess

DOCUMENTS = [
    {
        "id": "bridge",
        "title": "Verdant Bridge",
        "text": "The Verdant Bridge in Oslund was completed in 1987.",
        "score": 0.9,
    },
    {
        "id": "ferry",
        "title": "Ferry",
        "text": "Before the bridge, a ferry crossed the river. " * 20,
        "score": 0.5,
    },
    {
        "id": "weather",
        "title": "Weather",
        "text": "Oslund has mild summers and wet winters. " * 20,
        "score": 0.1,
    },
]
QUESTION = [{"role": "user", "content": "When was the Verdant Bridge completed?"}]
NO_CACHE = {"Cache-Control": "no-cache, no-store"}


def _ask(client, **extra):
    body = {"documents": DOCUMENTS, **extra.pop("body", {})}
    arguments = {"temperature": 0, "max_tokens": 30, **extra}
    return client.chat.completions.create(
        model=MODEL, messages=QUESTION, extra_body=body, extra_headers=NO_CACHE, **arguments
    )


def test_answer_carries_the_rag_report(client):
    completion = _ask(client)
    report = completion.model_extra["rag"]
    assert report["template"] == "default@1"
    assert report["used_documents"] == ["bridge", "ferry", "weather"]
    assert report["dropped_documents"] == []
    assert report["context_tokens"] > 0
    answer = completion.choices[0].message.content
    assert "1987" in answer
    citations, unknown = parse_citations(answer, {d["id"]: RagDocument(**d) for d in DOCUMENTS})
    assert report["citations"] == [c.model_dump() for c in citations]
    assert report["unknown_citations"] == unknown and report["cited"] is bool(citations)


def test_packing_drops_the_lowest_ranked_documents_first(client):
    everything = _ask(client).model_extra["rag"]["context_tokens"]
    capped = _ask(client, body={"rag": {"max_context_tokens": everything - 20}}).model_extra["rag"]
    assert capped["used_documents"] == ["bridge", "ferry"] and capped["dropped_documents"] == [
        "weather"
    ]
    assert capped["context_tokens"] <= everything - 20
    tight = _ask(client, body={"rag": {"max_context_tokens": 40}}).model_extra["rag"]
    assert tight["used_documents"] == ["bridge"] and tight["dropped_documents"] == [
        "ferry",
        "weather",
    ]


def test_packing_keeps_room_for_max_tokens(client):
    # 8192-token window: with 8000 tokens kept for the answer only the small top document fits.
    report = _ask(client, max_tokens=7950).model_extra["rag"]
    assert report["used_documents"] == ["bridge"]


def test_a_question_that_cannot_fit_is_400_never_truncated(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "why " * 9000}],
            extra_body={"documents": DOCUMENTS},
            max_tokens=10,
        )
    assert caught.value.code == "context_length_exceeded"
    assert "question alone" in caught.value.message


def test_streaming_answer_has_the_report_in_its_final_chunk(client):
    chunks = list(_ask(client, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    report = finals[0].model_extra["rag"]
    assert report["used_documents"] == ["bridge", "ferry", "weather"]
    citations, unknown = parse_citations(text, {d["id"]: RagDocument(**d) for d in DOCUMENTS})
    assert (
        report["citations"] == [c.model_dump() for c in citations]
        and report["unknown_citations"] == unknown
    )
    assert all("rag" not in (c.model_extra or {}) for c in chunks if c is not finals[0])
    assert text == _ask(client).choices[0].message.content


@pytest.mark.parametrize(
    "body, param",
    [
        ({"rag": {"template": "fancy@7"}}, "rag.template"),
        ({"documents": [{"id": "has space", "text": "x"}]}, "documents.0.id"),
        ({"documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}, "documents"),
    ],
)
def test_bad_rag_input_is_400(client, body, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=5,
            extra_body={"documents": DOCUMENTS, **body},
        )
    assert caught.value.body["param"] == param


def test_plain_chat_is_untouched(client):
    completion = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5)
    assert "rag" not in (completion.model_extra or {})


def test_typed_client_sync(server):
    client = RagClient(f"{server.url}/v1", model=MODEL, max_retries=0)
    answer = client.answer(
        "When was the Verdant Bridge completed?",
        [Document(**d) for d in DOCUMENTS],
        temperature=0,
        max_tokens=30,
    )
    assert "1987" in answer.text
    assert answer.used_documents == ["bridge", "ferry", "weather"]
    assert answer.prompt_tokens > 0 and answer.finish_reason in ("stop", "length")
    assert answer.cited is bool(answer.citations)
    client.close()


async def test_typed_client_async(server):
    client = AsyncRagClient(f"{server.url}/v1", model=MODEL, max_retries=0)
    answer = await client.answer(
        "When was the Verdant Bridge completed?",
        [Document(**d) for d in DOCUMENTS],
        options=RagOptions(max_context_tokens=40),
        temperature=0,
        max_tokens=30,
    )
    assert answer.used_documents == ["bridge"] and answer.dropped_documents == ["ferry", "weather"]
    await client.close()


THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def thinking_model_dir(tmp_path_factory):
    """The packaged model with a chat template that has Qwen3's thinking switch."""
    from ragllm.config import load_settings
    from ragllm.models import resolve_model

    settings = load_settings().engine
    source = resolve_model(settings.model, settings.model_cache_dir)
    target = tmp_path_factory.mktemp("thinking-model")
    for entry in source.iterdir():
        if entry.name != "chat_template.jinja":
            os.symlink(entry, target / entry.name)
    (target / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    return target


def _prompt_tokens(server: ServerProcess, model: str, **body) -> int:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
    completion = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=2,
        temperature=0,
        extra_body=body,
        extra_headers=NO_CACHE,
    )
    return completion.usage.prompt_tokens


def test_thinking_switch_is_turned_off_unless_reasoning_is_asked(thinking_model_dir, tmp_path):
    server = ServerProcess(
        "--model", str(thinking_model_dir), "--served-model-name", "thinker", log_dir=tmp_path
    )
    try:
        server.wait_ready()
        off = _prompt_tokens(server, "thinker", documents=DOCUMENTS)
        on = _prompt_tokens(server, "thinker", documents=DOCUMENTS, rag={"reasoning": True})
        assert (
            off > on
        )  # the template rendered its empty think block: enable_thinking=false reached it
        plain_off = _prompt_tokens(
            server, "thinker", chat_template_kwargs={"enable_thinking": False}
        )
        plain = _prompt_tokens(server, "thinker")
        assert plain_off - plain == off - on
    finally:
        server.stop()


def test_no_think_suffix_for_models_that_understand_it(tmp_path):
    server = ServerProcess(env={"RAGLLM_ENGINE__NO_THINK_SUFFIX": "true"}, log_dir=tmp_path)
    try:
        server.wait_ready()
        off = _prompt_tokens(server, MODEL, documents=DOCUMENTS)
        on = _prompt_tokens(server, MODEL, documents=DOCUMENTS, rag={"reasoning": True})
        assert off > on  # " /no_think" was appended to the question
    finally:
        server.stop()
