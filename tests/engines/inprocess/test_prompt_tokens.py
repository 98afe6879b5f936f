"""Prompt tokenization piece by piece: the same ids as whole-text tokenization, reused pieces, and
tokenizers that cannot be split used whole."""

from __future__ import annotations

from ragllm.engines.inprocess.prompt_tokens import MIN_CACHED_CHARS, PromptTokenizer
from ragllm.loadtest.workload import Workload
from tests.support.sentencepiece_tokenizer import sentencepiece_style_tokenizer


def _whole(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_rag_prompts_get_the_whole_texts_ids_and_repeated_documents_are_reused(tokenizer):
    prompts = PromptTokenizer(tokenizer)
    assert (
        prompts.segmented
    )  # the packaged tokenizer (byte-level BPE) tokenizes pieces independently
    workload = Workload(
        model="m", max_tokens=1, context_words=600, doc_sets=3, repeat_rate=0.7, seed=3
    )
    repeats = 0
    for _ in range(12):
        messages, repeated = workload.next_request()
        repeats += repeated
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert prompts.encode(text) == _whole(tokenizer, text)
    assert repeats and prompts.hits == repeats


def test_text_around_and_between_special_tokens_matches(tokenizer):
    prompts = PromptTokenizer(tokenizer)
    long_piece = " documents with ünïcödé 東京 and 3.14\n\n" * (MIN_CACHED_CHARS // 20)
    texts = [
        "<|im_start|><|im_end|>",
        "<|im_start|>system\n"
        + long_piece
        + "<|im_end|>\n<|im_start|>user\n  two  spaces<|im_end|>",
        long_piece + "<|im_end|>" + long_piece,  # the same piece twice in one prompt
        "<|im_start|" + long_piece + "|im_end|>",  # near-misses of special tokens are plain text
        "",
    ]
    for text in texts:
        assert prompts.encode(text) == _whole(tokenizer, text)
        assert prompts.encode(text) == _whole(tokenizer, text)  # and again, from the cache


def test_the_cache_stays_within_its_character_budget(tokenizer):
    prompts = PromptTokenizer(tokenizer, max_cached_chars=3 * MIN_CACHED_CHARS)
    pieces = [f"document {i}: " + "x y z " * MIN_CACHED_CHARS for i in range(3)]
    for piece in pieces:
        prompts.encode("<|im_start|>" + piece[: MIN_CACHED_CHARS + 10])
    assert prompts._cached_chars <= 3 * MIN_CACHED_CHARS
    assert len(prompts._cached) == 2  # the oldest went to make room for the third


def test_pieces_are_reused_only_within_the_scope_that_sent_them(tokenizer):
    """A piece one tenant sent is not reused for another: a faster prompt would tell the second tenant
    that the first had sent that document."""
    prompts = PromptTokenizer(tokenizer)
    text = "<|im_start|>system\n" + "a confidential document " * MIN_CACHED_CHARS + "<|im_end|>"
    first = prompts.encode(text, scope=b"tenant-a")
    assert prompts.encode(text, scope=b"tenant-b") == first and prompts.hits == 0
    assert prompts.encode(text, scope=b"tenant-a") == first and prompts.hits == 1
    assert (
        prompts.encode(text) == first and prompts.hits == 1
    )  # the unscoped requests are a scope too


def test_a_tokenizer_whose_pieces_depend_on_their_place_is_used_whole():
    tokenizer = sentencepiece_style_tokenizer()
    text = "hello world</s><s>hello " + "world " * MIN_CACHED_CHARS
    prompts = PromptTokenizer(tokenizer)
    assert not prompts.segmented
    assert prompts.encode(text) == _whole(tokenizer, text)


def test_a_special_token_that_swallows_spaces_disables_splitting(tokenizer):
    from tokenizers import AddedToken

    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken("<doc>", rstrip=True)]})
    prompts = PromptTokenizer(tokenizer)
    text = "<doc>   " + "spaced words " * 100
    assert not prompts.segmented
    assert prompts.encode(text) == _whole(tokenizer, text)


def test_many_small_documents_cannot_hold_more_entries_than_their_overhead_allows(tokenizer):
    """Each entry is charged its text and a fixed overhead: small documents (a tenant varying its
    cache_salt could send millions) fill the bound by count as well as by characters."""
    from ragllm.engines.inprocess.prompt_tokens import ENTRY_OVERHEAD_CHARS

    bound = 64 * (ENTRY_OVERHEAD_CHARS + 8)
    prompts = PromptTokenizer(tokenizer, max_cached_chars=bound)
    for i in range(1000):
        prompts.encode(f"doc {i:04d}", scope=f"salt-{i}".encode(), recurring=True)
    assert len(prompts._cached) <= 64
    assert prompts._cached_chars <= bound
