"""What an answer did with its documents, counted from real answers' text: valid, unknown and
missing citations, declines, and the packing counts; and that the counts carry no client string."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragllm.rag.contract import RagDocument
from ragllm.rag.packing import RagContext
from ragllm.rag.prompt import load_template
from ragllm.telemetry.request_log import RAG_FIELDS

DECLINE = load_template("default@1").decline
DOCUMENTS = {
    "bridge": RagDocument(id="bridge", title="Verdant Bridge", text="Completed in 1987."),
    "ferry": RagDocument(id="ferry", text="A ferry crossed the river."),
    "weather": RagDocument(id="weather", text="Mild summers."),
}


def _context(citations: bool | str = True, dropped: int = 1) -> RagContext:
    ids = list(DOCUMENTS)
    return RagContext(
        template="default@1",
        documents=DOCUMENTS,
        used=ids[: len(ids) - dropped],
        dropped=ids[len(ids) - dropped :],
        context_tokens=42,
        citations=citations,
        decline=DECLINE,
    )


@pytest.mark.parametrize(
    "answer, valid, unknown, missing, declined",
    [
        ("It was completed in 1987. [bridge]", 1, 0, False, False),
        (
            "In 1987 [bridge]. A ferry ran before [ferry, bridge]. Again [bridge].",
            2,
            0,
            False,
            False,
        ),
        ("It was completed in 1987. [doc-7] [bridge]", 1, 1, False, False),
        ("It was completed in 1987. [doc-7, doc-8] [doc-7]", 0, 2, False, False),
        ("It was completed in 1987.", 0, 0, True, False),
        ("It was completed [in the late eighties].", 0, 0, True, False),  # bracketed prose
        (DECLINE, 0, 0, False, True),
        (f"\n {DECLINE}\n", 0, 0, False, True),
        (f"{DECLINE} But it was 1987.", 0, 0, True, False),  # more than the sentence
        (DECLINE.lower(), 0, 0, True, False),  # not the template's words
        ("", 0, 0, True, False),
    ],
)
def test_an_answer_is_counted_as_its_citations_and_decline_say(
    answer, valid, unknown, missing, declined
):
    report, outcome = _context().answered(answer)
    assert (
        outcome.citations_valid,
        outcome.citations_unknown,
        outcome.citations_missing,
        outcome.declined,
    ) == (valid, unknown, missing, declined)
    assert report == _context().report(answer)  # the report is what it was before counting
    assert outcome.citations_valid == len(report["citations"])
    assert outcome.citations_unknown == len(report["unknown_citations"])


def test_packing_counts_come_from_the_context():
    _, outcome = _context(dropped=2).answered("Anything. [bridge]")
    assert (
        outcome.template,
        outcome.documents_received,
        outcome.documents_used,
        outcome.documents_dropped,
        outcome.context_tokens,
    ) == ("default@1", 3, 1, 2, 42)


def test_with_citations_off_nothing_is_missing_and_declines_still_count():
    _, uncited = _context(citations=False).answered("It was completed in 1987.")
    _, cited = _context(citations=False).answered("It was completed in 1987. [doc-7]")
    _, declined = _context(citations=False).answered(DECLINE)
    assert uncited.citation_mode == "off" and not uncited.citations_missing
    assert (cited.citations_valid, cited.citations_unknown) == (0, 0)  # never read
    assert declined.declined


def test_constrained_answers_are_counted_like_parsed_ones():
    _, outcome = _context(citations="constrained").answered("In 1987. [bridge]")
    assert outcome.citation_mode == "constrained" and outcome.citations_valid == 1


def test_the_log_fields_are_the_documented_ones():
    _, outcome = _context().answered("In 1987. [bridge]")
    assert tuple(outcome.fields()) == RAG_FIELDS
    assert set(outcome.span_attributes()) == {f"ragllm.rag.{f[len('rag_') :]}" for f in RAG_FIELDS}


hostile_ids = st.text(
    st.characters(blacklist_characters="[],", blacklist_categories=("Zs", "Cc", "Cs")),
    min_size=1,
    max_size=128,
).filter(lambda text: not any(c.isspace() for c in text))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ids=st.lists(hostile_ids, min_size=1, max_size=20, unique=True),
    cited=st.lists(hostile_ids, max_size=30),
    prose=st.text(max_size=2000),
    dropped=st.integers(0, 20),
)
def test_counts_of_hostile_answers_stay_within_what_was_supplied_and_name_nothing(
    ids, cited, prose, dropped
):
    documents = {i: RagDocument(id=i, text="x") for i in ids}
    used = ids[: max(len(ids) - dropped, 0)]
    context = RagContext("default@1", documents, used, ids[len(used) :], 7, True, DECLINE)
    answer = prose + "".join(f" [{i}]" for i in cited)
    _, outcome = context.answered(answer)
    assert outcome.documents_used + outcome.documents_dropped == outcome.documents_received
    assert outcome.citations_valid <= len(set(cited) & set(ids))
    assert outcome.citations_unknown <= len(set(cited) - set(ids)) + answer.count("[")
    assert outcome.citations_missing is (
        not outcome.declined and outcome.citations_valid + outcome.citations_unknown == 0
    )
    # Nothing the client chose travels with the counts: only numbers, flags and server names.
    strings = {v for v in outcome.fields().values() if isinstance(v, str)}
    assert strings == {"default@1", "parsed"}
