"""RAG evaluation: the project's 44 cases (fictional facts, unanswerable questions, contradicting
documents) asked through ragllm.client, with citations parsed and with citations constrained; per
model and mode, each category on its own: answerable (the expected fact, valid citations),
unanswerable (declined, any citation), contradiction (both values given), and tokens taken.

Facts match strictly: on word boundaries, case aside, numbers with their thousands separators
removed ("1,987" is 1987; "19870" is not).

On a CPU a 1.5B model decodes 2-4 tokens a second, so a run can be bounded: ``--per-kind N`` takes N
cases of each kind, evenly spread over the file (the same ones every run), and ``--max-tokens`` caps
each answer; both are printed and stored in the JSON, with the seconds each run took.

    python bench/rag_eval.py                         # starts a server with the packaged model
    python bench/rag_eval.py --serve default --serve ~/.cache/ragllm/eval/Qwen2.5-Coder-1.5B-Instruct \
        --per-kind 4 --max-tokens 64                 # one server per model (make eval-model), in turn
    python bench/rag_eval.py --url http://host:8081 --model NAME [--model OTHER] [--citations parsed]
    python bench/rag_eval.py --citations parsed --order both   # documents by score, then by id
    python bench/rag_eval.py --citations parsed --kv-reuse both  # full prefill, then reused KV
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import write_report  # noqa: E402
from bench.server import served  # noqa: E402
from ragllm.client import Document, RagClient  # noqa: E402
from ragllm.config import DEFAULT_MODEL  # noqa: E402
from ragllm.rag.contract import RagOptions  # noqa: E402

CASES = Path(__file__).with_name("rag_eval_cases.json")
DECLINE_PHRASES = (
    "not contain",
    "does not",
    "do not",
    "don't",
    "doesn't",
    "no information",
    "not mention",
    "not provided",
    "not specified",
    "not say",
    "cannot",
    "can't",
    "unable",
    "unknown",
    "not available",
    "no mention",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="server base URL; default: start one with the packaged model")
    parser.add_argument("--model", action="append", help="served model name (repeatable)")
    parser.add_argument(
        "--serve",
        action="append",
        help="model to start a server with, as `ragllm serve --model` takes it: 'default', a "
        "checkpoint directory or a .gguf (repeatable; each runs alone, one after the other)",
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--per-kind", type=int, help="cases of each kind, evenly spread (default: all 44)"
    )
    parser.add_argument("--citations", choices=("both", "parsed", "constrained"), default="both")
    parser.add_argument(
        "--order",
        choices=("relevance", "stable", "both"),
        default="relevance",
        help="rag.order: documents laid out by score, by id, or each in turn",
    )
    parser.add_argument(
        "--kv-reuse",
        choices=("off", "on", "both"),
        default="off",
        help="rag.kv_reuse: on sends each case's documents once in reverse order first, so the "
        "scored request reuses their stored KV at new positions; both: off, then on",
    )
    parser.add_argument("--json", type=Path, default=Path("bench/results/rag_eval.json"))
    return parser.parse_args()


def declined(text: str) -> bool:
    lowered = text.lower()
    return any(phrase in lowered for phrase in DECLINE_PHRASES)


def fact_found(value: str, text: str) -> bool:
    """``value`` as a whole word of ``text``, case aside, thousands separators removed from numbers."""

    def normal(s: str) -> str:
        return re.sub(r"(?<=\d)[,\u202f ](?=\d{3}\b)", "", s.lower())

    return re.search(rf"(?<!\w){re.escape(normal(value))}(?!\w)", normal(text)) is not None


def sample(cases: list[dict], per_kind: int | None) -> list[dict]:
    """``per_kind`` cases of each kind, evenly spread over the file's order; all when None."""
    if per_kind is None:
        return cases
    chosen = []
    for kind in dict.fromkeys(case["kind"] for case in cases):
        of_kind = [case for case in cases if case["kind"] == kind]
        count = min(per_kind, len(of_kind))
        chosen += [of_kind[i * len(of_kind) // count] for i in range(count)]
    return chosen


def evaluate(
    client: RagClient,
    cases: list[dict],
    max_tokens: int,
    citations: bool | str,
    order: str,
    kv_reuse: bool = False,
) -> dict:
    rows = []
    started = time.monotonic()
    options = RagOptions(citations=citations, order=order, kv_reuse=kv_reuse)
    no_cache = {"Cache-Control": "no-cache, no-store"}
    for case in cases:
        documents = [Document(**d) for d in case["documents"]]
        if kv_reuse:  # store the documents' KV with another layout: reversed, unscored
            reversed_ = [d.model_copy(update={"score": None}) for d in reversed(documents)]
            stored = RagOptions(citations=False, order="relevance", kv_reuse=True)
            client.answer(
                case["question"], reversed_, max_tokens=1, options=stored, extra_headers=no_cache
            )
        answer = client.answer(
            case["question"],
            documents,
            temperature=0,
            max_tokens=max_tokens,
            options=options,
            extra_headers=no_cache,
        )
        found = [value for value in case["expected"] if fact_found(value, answer.text)]
        rows.append(
            {
                "id": case["id"],
                "kind": case["kind"],
                "answer": answer.text,
                "found": found,
                "cited": answer.cited,
                "unknown_citations": answer.unknown_citations,
                "declined": declined(answer.text),
                "tokens": answer.prompt_tokens + answer.completion_tokens,
                "completion_tokens": answer.completion_tokens,
            }
        )
    seconds = time.monotonic() - started
    return {"summary": summarize(rows) | {"seconds": round(seconds, 1)}, "answers": rows}


def _share(rows: list[dict], test) -> float:
    return round(sum(1 for r in rows if test(r)) / len(rows), 3) if rows else 0.0


def summarize(rows: list[dict]) -> dict:
    answerable = [r for r in rows if r["kind"] == "answerable"]
    unanswerable = [r for r in rows if r["kind"] == "unanswerable"]
    contradictions = [r for r in rows if r["kind"] == "contradiction"]
    valid = lambda r: r["cited"] and not r["unknown_citations"]  # noqa: E731
    return {
        "cases": len(rows),
        "answerable_fact": _share(answerable, lambda r: r["found"]),
        "answerable_valid_citations": _share(answerable, valid),
        "unanswerable_declined": _share(unanswerable, lambda r: r["declined"]),
        "unanswerable_cited": _share(unanswerable, lambda r: r["cited"]),
        "contradiction_both_values": _share(contradictions, lambda r: len(r["found"]) == 2),
        "contradiction_valid_citations": _share(contradictions, valid),
        "any_unknown_citation": _share(rows, lambda r: r["unknown_citations"]),
        "mean_tokens": round(statistics.mean(r["tokens"] for r in rows), 1),
        "mean_completion_tokens": round(statistics.mean(r["completion_tokens"] for r in rows), 1),
    }


def models(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(what ``ragllm serve --model`` takes, the name clients send) for each model to evaluate."""
    if args.url:
        return [("", model) for model in args.model or [DEFAULT_MODEL]]
    specs = args.serve or ["default"]
    return [(spec, DEFAULT_MODEL if spec == "default" else Path(spec).name) for spec in specs]


@contextmanager
def reachable(args: argparse.Namespace, spec: str, name: str) -> Iterator[str]:
    """The base URL serving ``name``: ``--url``, or a server started for this model alone, so two
    models never share the CPU or the memory."""
    if args.url:
        yield args.url
        return
    with served({"LLM_MODEL_ID": spec, "RAGLLM_ENGINE__SERVED_MODEL_NAME": name}) as url:
        yield url


def main() -> None:
    args = parse_args()
    all_cases = json.loads(CASES.read_text())["cases"]
    cases = sample(all_cases, args.per_kind)
    modes = {"both": ("parsed", "constrained")}.get(args.citations, (args.citations,))
    orders = {"both": ("relevance", "stable")}.get(args.order, (args.order,))
    reuses = {"off": (False,), "on": (True,), "both": (False, True)}[args.kv_reuse]
    report = {
        "benchmark": "rag_eval",
        "cases_file": str(CASES),
        "cases": len(cases),
        "cases_in_file": len(all_cases),
        "per_kind": args.per_kind,
        "case_ids": [case["id"] for case in cases],
        "max_tokens": args.max_tokens,
        "runs": {},
    }
    for spec, model in models(args):
        with reachable(args, spec, model) as url:
            client = RagClient(f"{url}/v1", model=model, max_retries=0, timeout=900)
            for mode in modes:
                citations = "constrained" if mode == "constrained" else True
                for order in orders:
                    for reuse in reuses:
                        run = evaluate(client, cases, args.max_tokens, citations, order, reuse)
                        name = f"{model} / {mode} / {order}" + (" / kv_reuse" if reuse else "")
                        report["runs"][name] = run
                        print(f"{name}: {run['summary']['seconds']} s", flush=True)
            client.close()
    print_table(report, per_kind=args.per_kind)
    write_report(args.json, report)


def print_table(report: dict, per_kind: int | None) -> None:
    bound = f"{per_kind} per kind, " if per_kind else ""
    print(
        f"\nrag_eval  {report['cases']} of {report['cases_in_file']} cases ({bound}evenly spread)  "
        f"max_tokens={report['max_tokens']}  greedy"
    )
    width = max([60, *(len(name) for name in report["runs"])])
    header = (
        f"{'model / citations / order':<{width}} {'ans fact':>9} {'ans cites':>10} "
        f"{'unans declined':>15} {'unans cited':>12} {'contra both':>12} {'contra cites':>13} "
        f"{'tokens':>7} {'seconds':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, result in report["runs"].items():
        s = result["summary"]
        print(
            f"{name:<{width}} {s['answerable_fact']:>9.0%} {s['answerable_valid_citations']:>10.0%} "
            f"{s['unanswerable_declined']:>15.0%} {s['unanswerable_cited']:>12.0%} "
            f"{s['contradiction_both_values']:>12.0%} {s['contradiction_valid_citations']:>13.0%} "
            f"{s['mean_tokens']:>7} {s['seconds']:>8}"
        )
    print(
        "\nans fact: the expected fact, strictly matched; cites: cites a supplied document and no "
        "unknown id; unans: unanswerable questions; contra both: contradiction cases whose answer "
        "gives both values; seconds: the whole run of that model, mode and order"
    )


if __name__ == "__main__":
    main()
