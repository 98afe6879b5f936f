"""The grammar libraries on PyPI for structured outputs, side by side on the packaged model's
tokenizer: what each costs to index the tokenizer, to compile a JSON Schema the first time and
again, and to compute a token mask (median over a valid answer's tokens, every mask checked to allow
the answer's own token). The engine uses llguidance; this is the measurement behind that choice.

    pip install xgrammar outlines-core        # the two others, not dependencies of the service
    python bench/grammar_libraries.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import write_report  # noqa: E402
from ragllm.config import load_settings  # noqa: E402
from ragllm.models import resolve_model  # noqa: E402

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age", "tags", "address", "note"],
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}},
        "address": {"$ref": "#/$defs/Address"},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "$defs": {
        "Address": {
            "type": "object",
            "additionalProperties": False,
            "required": ["street", "zip"],
            "properties": {
                "street": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
        }
    },
}
ANSWER = json.dumps(
    {
        "name": "Ada Lovelace",
        "age": 36,
        "tags": ["a", "c"],
        "address": {"street": "12 St James's Square", "zip": "12345"},
        "note": None,
    }
)


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def measure_llguidance(tokenizer, vocab: int, answer: list[int]) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    index, index_s = timed(lambda: llguidance.hf.from_tokenizer(tokenizer, vocab))
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def compile_schema():
        return llguidance.LLMatcher(
            index, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=options)
        )

    template, first_s = timed(compile_schema)
    _, again_s = timed(template.deep_copy)
    matcher, bitmask = template.deep_copy(), llguidance.torch.allocate_token_bitmask(1, vocab)

    def mask(token: int) -> bool:
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        allowed = bool((bitmask[0, token // 32] >> (token % 32)) & 1)
        matcher.consume_token(token)
        return allowed

    return {
        "index_s": index_s,
        "compile_first_s": first_s,
        "compile_again_s": again_s,
        "mask": mask,
    }


def measure_xgrammar(tokenizer, vocab: int, answer: list[int]) -> dict:
    import xgrammar

    index, index_s = timed(
        lambda: xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    )
    compiler = xgrammar.GrammarCompiler(index, max_threads=2)

    def compile_schema():
        return compiler.compile_json_schema(
            json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": ")
        )

    compiled, first_s = timed(compile_schema)
    _, again_s = timed(compile_schema)  # xgrammar's own cache
    matcher, bitmask = xgrammar.GrammarMatcher(compiled), xgrammar.allocate_token_bitmask(1, vocab)

    def mask(token: int) -> bool:
        matcher.fill_next_token_bitmask(bitmask, 0)
        allowed = bool((bitmask[0, token // 32] >> (token % 32)) & 1)
        matcher.accept_token(token)
        return allowed

    return {
        "index_s": index_s,
        "compile_first_s": first_s,
        "compile_again_s": again_s,
        "mask": mask,
    }


def measure_outlines_core(tokenizer, vocab: int, answer: list[int]) -> dict:
    from outlines_core import Guide, Index, Vocabulary, json_schema
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    def build_vocabulary():
        byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        tokens: dict[str, list[int]] = {}
        for text, token_id in tokenizer.get_vocab().items():
            if token_id == tokenizer.eos_token_id or any(char not in byte_of for char in text):
                continue
            tokens.setdefault(bytes(byte_of[c] for c in text).decode("latin-1"), []).append(
                token_id
            )
        return Vocabulary(tokenizer.eos_token_id, tokens)

    vocabulary, index_s = timed(build_vocabulary)
    regex = json_schema.build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?")
    built, first_s = timed(lambda: Index(regex, vocabulary))
    _, again_s = timed(lambda: Guide(built))
    guide = Guide(built)

    def mask(token: int) -> bool:
        allowed_ids = torch.tensor(guide.get_tokens())
        bitmask = torch.zeros(vocab, dtype=torch.bool)
        bitmask[allowed_ids] = True
        allowed = bool(bitmask[token])
        guide.advance(token)
        return allowed

    return {
        "index_s": index_s,
        "compile_first_s": first_s,
        "compile_again_s": again_s,
        "mask": mask,
    }


LIBRARIES = {
    "llguidance": measure_llguidance,
    "xgrammar": measure_xgrammar,
    "outlines-core": measure_outlines_core,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("bench/results/grammar_libraries.json"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    engine = load_settings().engine
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(engine.model, engine.model_cache_dir))
    vocab = len(tokenizer)
    answer = tokenizer.encode(ANSWER, add_special_tokens=False)
    rows = []
    for name, measure in LIBRARIES.items():
        try:
            result = measure(tokenizer, vocab, answer)
        except ImportError:
            print(f"{name}: not installed, skipped")
            continue
        times, all_allowed = [], True
        for token in answer:
            start = time.perf_counter()
            all_allowed &= result["mask"](token)
            times.append(time.perf_counter() - start)
        rows.append(
            {
                "library": name,
                "tokenizer_index_ms": round(result["index_s"] * 1e3, 1),
                "compile_first_ms": round(result["compile_first_s"] * 1e3, 2),
                "compile_again_ms": round(result["compile_again_s"] * 1e3, 3),
                "mask_median_us": round(statistics.median(times[1:]) * 1e6, 1),
                "mask_first_ms": round(times[0] * 1e3, 2),
                "answer_allowed": all_allowed,
            }
        )
    report = {
        "benchmark": "grammar_libraries",
        "vocab": vocab,
        "answer_tokens": len(answer),
        "rows": rows,
    }
    print(
        f"\ngrammar_libraries  tokenizer=packaged ({vocab} tokens)  answer={len(answer)} tokens  CPU"
    )
    header = f"{'library':<14} {'index ms':>9} {'compile ms':>11} {'again ms':>9} {'mask us':>8} {'1st mask ms':>12} {'valid':>6}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['library']:<14} {row['tokenizer_index_ms']:>9} {row['compile_first_ms']:>11} "
            f"{row['compile_again_ms']:>9} {row['mask_median_us']:>8} {row['mask_first_ms']:>12} "
            f"{row['answer_allowed']!s:>6}"
        )
    write_report(args.json, report)


if __name__ == "__main__":
    main()
