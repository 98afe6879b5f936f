"""What the load test sends: RAG-shaped prompts whose document sets repeat at a chosen rate (so a
server's prefix cache has something to hit), or prompts read from a file."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Workload:
    model: str
    max_tokens: int = 64
    context_words: int = 400  # the shared "retrieved documents" part of each prompt
    doc_sets: int = 4  # distinct document sets
    repeat_rate: float = 0.75  # share of requests that reuse an earlier document set
    prompts: list[str] | None = None  # a prompt file replaces the RAG-shaped prompts
    seed: int = 0

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._sets = [_documents(index, self.context_words) for index in range(self.doc_sets)]
        self._used: set[int] = set()  # document sets sent at least once
        self._fresh = 0

    def next_messages(self) -> list[dict[str, str]]:
        return self.next_request()[0]

    def next_request(self) -> tuple[list[dict[str, str]], bool]:
        """The next request's messages, and whether its documents were sent before (a repeat, which a
        server's prefix cache can serve)."""
        if self.prompts:
            return [{"role": "user", "content": self._random.choice(self.prompts)}], False
        repeated = False
        if self._random.random() < self.repeat_rate:
            index = self._random.randrange(len(self._sets))
            documents, repeated = self._sets[index], index in self._used
            self._used.add(index)
        else:  # a document set never seen before
            self._fresh += 1
            documents = _documents(self.doc_sets + self._fresh, self.context_words)
        question = (
            f"Question {self._random.randint(1, 10_000)}: what do the documents say about item "
            f"{self._random.randint(1, 50)}?"
        )
        return [
            {"role": "system", "content": "Answer from the documents only.\n\n" + documents},
            {"role": "user", "content": question},
        ], repeated


def _documents(index: int, words: int) -> str:
    sentence = f"Document {index} notes that item {{n}} was reviewed and found consistent with the record. "
    text, n = [], 0
    while sum(len(s.split()) for s in text) < words:
        n += 1
        text.append(sentence.format(n=n))
    return "".join(text)


def as_dict(workload: Workload) -> dict[str, Any]:
    """The workload's settings as the report records them (a prompt file's prompts left out)."""
    data = asdict(workload)
    data.pop("prompts", None)
    return data
