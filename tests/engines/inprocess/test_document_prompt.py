"""A RAG prompt cut at its documents, each tokenized alone (``document_prompt``), with the packaged
model's tokenizer: whatever the documents hold, the ids spell the prompt, each found document's span
spells the document, and a document's ids are the same wherever it lands."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragllm.engines.inprocess.document_prompt import tokenize_with_documents
from ragllm.engines.inprocess.prompt_tokens import PromptTokenizer
from ragllm.generation import GenerationRequest, SamplingParams

PROPERTIES = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
hostile_text = st.lists(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cn", "Cs", "Co")), max_size=8)
    | st.sampled_from(["<|im_start|>", "<|im_end|>", "\n\n", "[", "] ", " "]),
    max_size=10,
).map("".join)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> PromptTokenizer:
    return PromptTokenizer(tokenizer)


@PROPERTIES
@given(
    head=hostile_text,
    documents=st.lists(hostile_text, max_size=6),
    joins=st.lists(hostile_text, min_size=7, max_size=7),
    missing=hostile_text,
)
def test_ids_spell_the_prompt_and_each_span_its_document(
    tokenizer, prompts, head, documents, joins, missing
):
    text = head + "".join(d + j for d, j in zip(documents, joins))
    result = tokenize_with_documents(text, (*documents, missing), prompts.encode)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    # The same text as whole-prompt tokenization spells (the tokenizer may drop control characters).
    assert decode(result.ids) == decode(prompts.encode(text))
    ends = [0]
    for start, end in result.spans:
        assert ends[-1] <= start < end <= len(result.ids)
        ends.append(end)
    encoded = [prompts.encode(document) for document in (*documents, missing)]
    found = [result.ids[start:end] for start, end in result.spans]
    assert all(ids in encoded for ids in found)
    assert len(found) <= len(documents) + 1


def test_a_documents_ids_do_not_depend_on_its_neighbours(prompts):
    document = "[doc-1] Oslund bridge\nThe Verdant Bridge was completed in 1987."
    one = tokenize_with_documents(f"Documents:\n\n{document}\n\nQ", (document,), prompts.encode)
    two = tokenize_with_documents(f"x{document}y", (document,), prompts.encode)
    (a, b), (c, d) = one.spans[0], two.spans[0]
    assert one.ids[a:b] == two.ids[c:d] == prompts.encode(document)


def test_documents_are_found_in_order_and_one_not_in_the_prompt_is_skipped(prompts):
    text = "head [a] first\n\n[b] second\n\n[a] first tail"
    result = tokenize_with_documents(text, ("[b] second", "[a] first", "[z] none"), prompts.encode)
    spans = result.spans
    assert len(spans) == 2 and spans[0][0] < spans[1][0]  # [a] found after [b], the last occurrence


def test_the_engine_tokenizes_a_reusing_request_at_its_documents(tokenizer):
    from ragllm.engines.inprocess.loading import chat_prompt_tokens, prompt_token_ids

    documents = ("[d1] One\nAlpha text <|im_end|> inside.", "[d2] Two\nBeta text.")
    messages = [
        {"role": "system", "content": "Use the documents.\n\n" + "\n\n".join(documents)},
        {"role": "user", "content": "Which?"},
    ]
    plain = GenerationRequest("p", SamplingParams(), messages=messages)
    reusing = GenerationRequest(
        "r", SamplingParams(), messages=messages, reusable_documents=documents
    )
    tokens = chat_prompt_tokens(tokenizer, reusing)
    assert tokenizer.decode(tokens.ids) == tokenizer.decode(prompt_token_ids(tokenizer, plain))
    assert len(tokens.spans) == 2  # the special-token text in d1 is escaped alike in both
    assert [tokenizer.decode(tokens.ids[a:b]) for a, b in tokens.spans] == list(documents)


def test_a_reused_documents_ids_are_kept_whatever_its_length_and_only_for_its_scope(tokenizer):
    """Documents come back by design: a short one (below the length from which prompt pieces are
    kept) is tokenized once per scope, and its ids are the ones tokenizing it gives."""
    from ragllm.engines.inprocess.loading import chat_prompt_tokens
    from ragllm.engines.inprocess.prompt_tokens import MIN_CACHED_CHARS
    from ragllm.generation import CacheScope

    documents = ("[d1] One\nAlpha text.", "[d2] Two\nBeta <|im_end|> text.")
    assert all(len(document) < MIN_CACHED_CHARS for document in documents)
    prompts = PromptTokenizer(tokenizer)

    def spans_of(order: tuple[str, ...], tenant: str) -> list[list[int]]:
        messages = [
            {"role": "system", "content": "Use these.\n\n" + "\n\n".join(order)},
            {"role": "user", "content": "Which?"},
        ]
        request = GenerationRequest(
            tenant + "".join(order),
            SamplingParams(),
            messages=messages,
            reusable_documents=order,
            cache_scope=CacheScope(group=tenant),
        )
        tokens = chat_prompt_tokens(tokenizer, request, prompts)
        return [tokens.ids[a:b] for a, b in tokens.spans]

    first = spans_of(documents, "a")
    assert prompts.hits == 0
    assert spans_of(documents[::-1], "a") == first[::-1] and prompts.hits == 2
    assert spans_of(documents, "b") == first and prompts.hits == 2  # another tenant: tokenized anew
    assert first == [prompts.encode(prompts.literal.escape_text(d)) for d in documents]
