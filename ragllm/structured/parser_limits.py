"""What one grammar may cost the engine: the limits llguidance's parser runs under, and the request
bounds that refuse up front what those limits would only stop after doing the work.

Measured on 2 CPU cores with the packaged tokenizer (RELIABILITY.md, "Grammar work"):

- ``initial_lexer_fuel`` bounds building a grammar's lexer, the bulk of a compile: about 3,800 units
  a millisecond here, so 1,000,000 ends a compile by ~0.26 s (a schema with 300 optional properties
  needs ~130 ms; one with 1,000 runs out). Every matcher a request gets pays it again.
- ``max_items_in_row`` bounds one Earley row: an alternative of more than 2,000 branches (a choice
  list, a Lark rule, an enum) fails at its first token mask, so choice lists are refused above it.
- ``step_lexer_fuel`` and ``step_max_items`` bound the parser's work in one mask, but not the walk of
  the token trie that follows it: a schema of 600 optional properties takes 7-10 ms a mask under any
  of them. That walk is what ``engine.grammar_mask_budget_ms`` bounds, by wall time (``masks``).
"""

from __future__ import annotations

from typing import Any

MAX_ITEMS_IN_ROW = 2_000
INITIAL_LEXER_FUEL = 1_000_000
STEP_LEXER_FUEL = 200_000  # ~14 units a microsecond by llguidance's figures
STEP_MAX_ITEMS = 50_000  # ~20 items a microsecond
MAX_LEXER_STATES = 250_000  # 1-2 kB each: a lexer's memory stays under ~500 MB
MAX_GRAMMAR_SIZE = 500_000  # symbols in all productions

# A choice list compiles to one rule with an alternative per choice, whose row holds one item more
# than its choices (2,000 choices: "Current row has 2001 items"): past the row bound it could only
# fail at its first mask (and 100,000 choices took 78 s to get there).
MAX_CHOICES = MAX_ITEMS_IN_ROW - 1
# Every property name is a lexeme of the lexer built under INITIAL_LEXER_FUEL, which runs out between
# 600 and 1,000 short names: a schema naming more is refused before any work, not after ~0.26 s.
MAX_SCHEMA_PROPERTIES = 1_000


def parser_limits() -> Any:
    """llguidance's ``LLParserLimits`` with the values above (llguidance is imported here, lazily)."""
    import llguidance

    return llguidance.LLParserLimits(
        max_items_in_row=MAX_ITEMS_IN_ROW,
        initial_lexer_fuel=INITIAL_LEXER_FUEL,
        step_lexer_fuel=STEP_LEXER_FUEL,
        step_max_items=STEP_MAX_ITEMS,
        max_lexer_states=MAX_LEXER_STATES,
        max_grammar_size=MAX_GRAMMAR_SIZE,
        verbose_errors=False,
    )  # verbose errors print parser state: the schema's text, into a client's answer
