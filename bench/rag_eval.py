"""RAG evaluation: the project's 44 cases (fictional facts, unanswerable questions, contradicting
documents) asked through ragllm.client; per model, how often answers hold the expected fact, cite
validly, decline when they should, notice contradictions, and how many tokens they take.

    python bench/rag_eval.py                         # starts a server with the packaged model
    python bench/rag_eval.py --url http://host:8081 --model NAME [--model OTHER]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ragllm.client import Document, RagClient  # noqa: E402
from tests.servers import MODEL, ServerProcess  # noqa: E402

CASES = Path(__file__).with_name("rag_eval_cases.json")
DECLINE_PHRASES = ("not contain", "does not", "do not", "don't", "doesn't", "no information", "not mention",
                   "not provided", "not specified", "not say", "cannot", "can't", "unable", "unknown",
                   "not available", "no mention")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="server base URL; default: start one with the packaged model")
    parser.add_argument("--model", action="append", help="served model name (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=Path("bench/results/rag_eval.json"))
    return parser.parse_args()


def declined(text: str) -> bool:
    lowered = text.lower()
    return any(phrase in lowered for phrase in DECLINE_PHRASES)


def evaluate(client: RagClient, cases: list[dict], max_tokens: int) -> dict:
    rows = []
    for case in cases:
        answer = client.answer(case["question"], [Document(**d) for d in case["documents"]], temperature=0,
                               max_tokens=max_tokens, extra_headers={"Cache-Control": "no-cache, no-store"})
        found = [value for value in case["expected"] if value.lower() in answer.text.lower()]
        rows.append({"id": case["id"], "kind": case["kind"], "answer": answer.text, "found": found,
                     "cited": answer.cited, "unknown_citations": answer.unknown_citations,
                     "declined": declined(answer.text), "tokens": answer.prompt_tokens + answer.completion_tokens})
    return {"summary": summarize(rows), "answers": rows}


def _share(rows: list[dict], test) -> float:
    return round(sum(1 for r in rows if test(r)) / len(rows), 3) if rows else 0.0


def summarize(rows: list[dict]) -> dict:
    answerable = [r for r in rows if r["kind"] == "answerable"]
    unanswerable = [r for r in rows if r["kind"] == "unanswerable"]
    contradictions = [r for r in rows if r["kind"] == "contradiction"]
    return {
        "cases": len(rows),
        "expected_fact": _share(answerable + contradictions, lambda r: r["found"]),
        "valid_citations": _share(answerable + contradictions, lambda r: r["cited"] and not r["unknown_citations"]),
        "any_unknown_citation": _share(rows, lambda r: r["unknown_citations"]),
        "unanswerable_declined": _share(unanswerable, lambda r: r["declined"]),
        "contradiction_both_values": _share(contradictions, lambda r: len(r["found"]) == 2),
        "mean_tokens": round(statistics.mean(r["tokens"] for r in rows), 1),
    }


def main() -> None:
    args = parse_args()
    cases = json.loads(CASES.read_text())["cases"]
    server = None
    url = args.url
    if url is None:
        server = ServerProcess()
        url = server.wait_ready().url
    report = {"benchmark": "rag_eval", "cases_file": str(CASES), "max_tokens": args.max_tokens, "models": {}}
    try:
        for model in args.model or [MODEL]:
            client = RagClient(f"{url}/v1", model=model, max_retries=0, timeout=300)
            report["models"][model] = evaluate(client, cases, args.max_tokens)
            client.close()
    finally:
        if server is not None:
            server.stop()
    print(f"\nrag_eval  {len(cases)} cases  max_tokens={args.max_tokens}")
    header = f"{'model':<40} {'fact':>6} {'cites':>6} {'unknown':>8} {'declined':>9} {'both':>6} {'tokens':>7}"
    print(header)
    print("-" * len(header))
    for model, result in report["models"].items():
        s = result["summary"]
        print(f"{model:<40} {s['expected_fact']:>6.0%} {s['valid_citations']:>6.0%} {s['any_unknown_citation']:>8.0%} "
              f"{s['unanswerable_declined']:>9.0%} {s['contradiction_both_values']:>6.0%} {s['mean_tokens']:>7}")
    print("\nfact: answer holds the expected fact (answerable and contradiction cases); cites: cites a supplied "
          "document and no unknown id; declined: unanswerable questions declined; both: contradiction cases "
          "whose answer gives both values")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
