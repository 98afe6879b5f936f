"""Grammars over the model's own tokenizer, through llguidance.

llguidance was chosen by measurement (BENCHMARKS.md, "Grammar libraries"): it builds a grammar in
milliseconds with no per-vocabulary precomputation, so a request bringing a schema never seen before
pays almost nothing; its token masks take about 0.1 ms a row on the CPU; it covers JSON Schema,
regular expressions and Lark/GBNF grammars; and it needs no runtime beyond its own wheel. Every step's
work is bounded by its parser limits (``parser_limits``) and each mask by a wall-time budget
(``engines/inprocess/sample/masks``), so no grammar can stall the engine.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from ragllm.errors import ConstraintUnfollowable, InvalidRequest
from ragllm.structured.grammar_cache import GrammarCache
from ragllm.structured.parser_limits import parser_limits
from ragllm.structured.schema_check import SCHEMA_LISTS, SCHEMA_MAPS, SCHEMA_VALUES
from ragllm.structured.spec import StructuredOutput
from ragllm.structured.thinking_first import ThinkingGrammar, after_thinking

# Compact JSON with one space after separators, as models write it; no free whitespace, so a model
# cannot run away in blanks between tokens.
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class GrammarViolation(RuntimeError):
    """A token the grammar did not allow was chosen, or the grammar hit one of its limits."""


class MaskOverBudget(GrammarViolation):
    """Computing one row's token mask took longer than a step may spend on it: the row ends alone
    rather than slow every request in its batch."""


class Grammar:
    """One request's position in its grammar: masks come from ``matcher``; ``accept`` moves it on.
    ``spec`` is the constraint it follows, to name in an error."""

    __slots__ = ("matcher", "spec")

    def __init__(self, matcher: Any, spec: StructuredOutput) -> None:
        self.matcher = matcher
        self.spec = spec

    def accept(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            raise GrammarViolation(
                f"structured output: {self.matcher.get_error() or f'token {token_id} refused'}"
            )

    @property
    def finished(self) -> bool:
        """Nothing can follow but the end of the answer."""
        return self.matcher.is_stopped()

    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None

    def unfollowable(self, violation: GrammarViolation) -> ConstraintUnfollowable:
        """What the client is told when its answer could not go on within the constraint: the
        constraint asked for what this model cannot write (a 400 naming the field), not a fault of
        the service."""
        return ConstraintUnfollowable(
            f"the answer could not follow the {_DESCRIPTIONS[self.spec.kind]} in "
            f"{self.spec.param}: {_first_line(str(violation))}",
            param=self.spec.param,
        )


class GrammarCompiler:
    """Turns structured-output requests into grammars for one tokenizer; compiled grammars are kept
    by constraint, least recently used first out. Thread-safe; call it off the
    event loop (building the tokenizer's index takes about half a second, once)."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: frozenset[int],
        cache_bytes: int = 64 * 1024 * 1024,
        mask_budget_s: float | None = None,
    ) -> None:
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self.vocab_size = vocab_size  # the ids a grammar may choose among
        self._stop_token_ids = sorted(stop_token_ids)
        self._mask_budget_s = mask_budget_s  # a first mask slower than this refuses the grammar
        self.cache = GrammarCache(cache_bytes)  # constraint → checked grammar
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._limits: Any = None
        self._missing_bytes: frozenset[int] = frozenset()
        self.num_compiled = 0  # cache misses, for tests and metrics

    def grammar(self, spec: StructuredOutput, thinking: ThinkingGrammar | None = None) -> Grammar:
        """A fresh position at the start of ``spec``'s grammar (held after the model's thinking when
        ``thinking`` is given, see ``thinking_first``); 400 if it cannot be compiled.

        The cache keeps each constraint's grammar, checked; every request gets a matcher of its own
        made from it (1-3 ms, off the event loop). Copies of one matcher would cost less to make but
        share its lexer behind a lock, so a batch's masks could only be computed one row at a time:
        measured on 16 cores, 32 copies filled in 2.0-2.7 ms a step on 1-16 threads, 32 matchers of
        their own in 0.86 ms on 16 (``bench/mask_fill.py``)."""
        key = spec if thinking is None else (spec, thinking)
        compiled = self.cache.get(key)
        if compiled is not None:
            return Grammar(self._matcher(compiled), spec)
        compiled, matcher = self._compile(spec)
        if thinking is not None:
            # The constraint was checked alone, its first mask included: held after the thinking,
            # that mask would come too late for a 400 before the answer starts.
            compiled = after_thinking(compiled, thinking)
            matcher = self._checked(spec, compiled)
        with self._lock:
            self.num_compiled += 1
        self.cache.put(key, compiled)
        return Grammar(
            matcher, spec
        )  # the matcher that checked the grammar serves the first request

    def _matcher(self, compiled: str) -> Any:
        import llguidance

        return llguidance.LLMatcher(
            self.tokenizer_index(), compiled, log_level=0, limits=self._parser_limits()
        )

    def _parser_limits(self) -> Any:
        if self._limits is None:
            self._limits = parser_limits()
        return self._limits

    def _compile(self, spec: StructuredOutput) -> tuple[str, Any]:
        """``spec`` as llguidance's grammar, checked against this tokenizer, and the matcher that
        checked it (at the grammar's start); 400 where it cannot be."""
        schema = (
            bounded_schema(spec.schema()) if spec.kind in ("json_schema", "json_object") else None
        )
        try:
            compiled = _llguidance_grammar(spec, schema)
        except Exception as exc:  # noqa: BLE001 - only the library runs here: the request's content made it fail
            raise _refusal(spec, str(exc) or type(exc).__name__) from None
        self.tokenizer_index()  # loads the vocabulary's missing bytes the next check reads
        unwritable = self._unwritable_character(spec.source)
        if unwritable is not None:
            raise _refusal(
                spec,
                f"it needs the character U+{ord(unwritable):04X}, which this model's "
                "vocabulary cannot write",
            )
        return compiled, self._checked(spec, compiled)

    def _checked(self, spec: StructuredOutput, compiled: str) -> Any:
        """A matcher at the start of ``compiled``, which it checks; 400 where it fails."""
        # Building the matcher checks the grammar (within INITIAL_LEXER_FUEL); llguidance's own
        # validate_grammar would build it a second time for the same verdict.
        matcher = self._matcher(compiled)
        if matcher.is_error():
            raise _refusal(spec, matcher.get_error())
        self._check_first_mask(spec, matcher)
        return matcher

    def _check_first_mask(self, spec: StructuredOutput, matcher: Any) -> None:
        """Computes the grammar's first mask: some grammars fail only there (the parser's item
        limits), and a mask slower than a step's budget would end the request at its first token
        anyway; either is a 400 now, before the request takes a slot in a batch."""
        # This thread's CPU time, not the wall clock: the verdict is about the grammar, and a
        # busy machine (other requests compiling beside it) must not turn a cheap mask into a 400.
        started = time.thread_time()
        matcher.compute_bitmask()  # drops the GIL, runs on this thread; leaves the matcher as it was
        elapsed = time.thread_time() - started
        if matcher.is_error():
            raise _refusal(spec, matcher.get_error())
        if self._mask_budget_s is not None and elapsed > self._mask_budget_s:
            raise _refusal(
                spec,
                f"its first token mask took {elapsed * 1000:.0f} ms, over the "
                f"{self._mask_budget_s * 1000:g} ms a step may spend on one",
            )

    def tokenizer_index(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer,
                    n_vocab=self._vocab_size,
                    eos_token=self._stop_token_ids or None,
                )
                self._missing_bytes = _bytes_no_token_writes(tokenizer, self._vocab_size)
                self._tokenizer = tokenizer
            return self._tokenizer

    def _unwritable_character(self, source: str) -> str | None:
        """A character written literally in ``source`` that no sequence of tokens can
        produce, or None. Byte-level vocabularies can lack bytes that real text never holds
        (SmolLM2's has no 0xF1, the lead byte of planes 4-11); a grammar that demands one would
        dead-end mid-answer, so it is refused before it starts."""
        for character in set(source) if self._missing_bytes else ():
            if self._missing_bytes.intersection(character.encode("utf-8", "surrogatepass")):
                return character
        return None


def _llguidance_grammar(spec: StructuredOutput, schema: dict[str, Any] | None) -> str:
    import llguidance

    matcher = llguidance.LLMatcher
    if schema is not None:
        return matcher.grammar_from_json_schema(
            schema, defaults=JSON_OPTIONS, overrides={"whitespace_flexible": False}
        )
    if spec.kind == "regex":
        return matcher.grammar_from_regex(spec.source)
    if spec.kind == "choice":
        return matcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in spec.choices())
        )
    return llguidance.grammar_from("grammar", spec.source)  # Lark, or GBNF as llama.cpp writes it


def bounded_schema(schema: Any) -> Any:
    """``schema`` as the engine enforces it: the same answers, less what no client could use and a
    model could run away in. Where a subschema says nothing of these:

    - an object that lists its properties takes no others (``additionalProperties: false``): JSON
      Schema would allow any extra key, and a model given that freedom invents keys instead of
      filling the ones asked for. vLLM (xgrammar's strict mode) and OpenAI's strict structured
      outputs read schemas the same way;
    - an integer lies within ±(2^53 - 1), the range JSON numbers keep exactly across
      implementations (RFC 8259, section 6), and a number below 10^15 in magnitude with at most 10
      decimal places, so neither can be an endless run of digits;
    - an email address is at most 254 characters (RFC 5321's limit) and a URI at most 2,083;
    - a key the model names itself, in a map typed only by its values (``dict[str, int]``), is at
      most 128 characters.
    """
    if not isinstance(schema, dict):
        return schema
    bounded = dict(schema)
    for key, value in schema.items():
        if key in SCHEMA_MAPS and isinstance(value, dict):
            bounded[key] = {name: bounded_schema(sub) for name, sub in value.items()}
        elif key in SCHEMA_LISTS and isinstance(value, list):
            bounded[key] = [bounded_schema(sub) for sub in value]
        elif key in SCHEMA_VALUES:
            bounded[key] = bounded_schema(value)
    if (
        isinstance(schema.get("properties"), dict)
        and "additionalProperties" not in schema
        and "patternProperties" not in schema
    ):
        bounded["additionalProperties"] = False
    if (
        isinstance(schema.get("additionalProperties"), dict)
        and not schema.get("properties")
        and "patternProperties" not in schema
    ):
        bounded["patternProperties"] = {
            f"^.{{0,{MAX_MAP_KEY_LENGTH}}}$": bounded["additionalProperties"]
        }
        bounded["additionalProperties"] = False
    kind = schema.get("type")
    if kind in ("integer", "number"):
        limit = MAX_SAFE_INTEGER if kind == "integer" else MAX_NUMBER
        if "minimum" not in schema and "exclusiveMinimum" not in schema:
            bounded["minimum"] = -limit
        if "maximum" not in schema and "exclusiveMaximum" not in schema:
            bounded["maximum"] = limit
        if kind == "number" and "multipleOf" not in schema:
            bounded["multipleOf"] = NUMBER_STEP
    if (
        kind == "string"
        and "maxLength" not in schema
        and isinstance(schema.get("format"), str)
        and schema["format"] in FORMAT_MAX_LENGTH
    ):
        bounded["maxLength"] = FORMAT_MAX_LENGTH[schema["format"]]
    return bounded


MAX_MAP_KEY_LENGTH = 128
MAX_SAFE_INTEGER = 2**53 - 1
MAX_NUMBER = 1e15
NUMBER_STEP = 1e-10
FORMAT_MAX_LENGTH = {"email": 254, "idn-email": 254, "uri": 2083, "iri": 2083, "hostname": 253}


def _bytes_no_token_writes(tokenizer: Any, vocab_size: int) -> frozenset[int]:
    """Bytes that appear in no token of the vocabulary."""
    written: set[int] = set()
    for token_id in range(vocab_size):
        written.update(tokenizer.decode_bytes([token_id]))
        if len(written) == 256:
            break
    return frozenset(range(256)) - written


_DESCRIPTIONS = {
    "json_schema": "JSON Schema",
    "json_object": "JSON object constraint",
    "regex": "regular expression",
    "choice": "choice list",
    "grammar": "grammar",
}


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    # A panic inside the library is its fault, not a message for the client.
    return "the grammar library could not process it" if "panic" in line.lower() else line


def _refusal(spec: StructuredOutput, reason: str) -> InvalidRequest:
    return InvalidRequest(
        f"the {_DESCRIPTIONS[spec.kind]} in {spec.param} cannot be enforced: {_first_line(reason)}",
        param=spec.param,
    )
