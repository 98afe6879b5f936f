"""An upstream double with vLLM's tokenizer routes and a tokenizer that makes one token of each word.

It is a test double for the upstream (the gateway's /tokenize and /detokenize are what the tests are
about): /tokenize answers as vLLM's does (``count``, ``max_model_len``, ``tokens``, and
``token_strs`` when asked), /detokenize turns ids back into words, and an id it never gave out is a
400 in vLLM's error shape. ``with_ids=False`` plays an older server: /tokenize gives only the count,
and there is no /detokenize.
"""

from __future__ import annotations

import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.servers import MODEL, free_port

MAX_MODEL_LEN = 4096


class WordVocabulary:
    """Words get ids in the order they are first seen; the prompt of a chat is ``role: content``
    lines, ending with ``assistant:`` (the generation prompt)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text: str) -> list[int]:
        return [self._id(word) for word in text.split()]

    def _id(self, word: str) -> int:
        if word not in self.ids:
            self.ids[word] = len(self.words)
            self.words.append(word)
        return self.ids[word]

    @staticmethod
    def chat_text(messages: list[dict]) -> str:
        lines = [f"{m['role']}: {m.get('content') or ''}" for m in messages]
        return "\n".join([*lines, "assistant:"])


class WordUpstream:
    def __init__(self, with_ids: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.vocabulary = WordVocabulary()
        self.received: list[tuple[str, dict]] = []  # (path, body) of each tokenizer request
        self.with_ids = with_ids
        routes = [
            Route("/health", self._health),
            Route("/v1/models", self._models),
            Route("/tokenize", self._tokenize, methods=["POST"]),
        ]
        if with_ids:
            routes.append(Route("/detokenize", self._detokenize, methods=["POST"]))
        self._server = uvicorn.Server(
            uvicorn.Config(
                Starlette(routes=routes), host="127.0.0.1", port=self.port, log_level="warning"
            )
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _models(self, request: Request) -> Response:
        model = {"id": MODEL, "object": "model", "max_model_len": MAX_MODEL_LEN}
        return JSONResponse({"object": "list", "data": [model]})

    async def _tokenize(self, request: Request) -> Response:
        body = await request.json()
        self.received.append(("/tokenize", body))
        text = self.vocabulary.chat_text(body["messages"]) if "messages" in body else body["prompt"]
        ids = self.vocabulary.encode(text)
        answer: dict = {"count": len(ids), "max_model_len": MAX_MODEL_LEN}
        if self.with_ids:
            answer["tokens"] = ids
            if body.get("return_token_strs"):
                answer["token_strs"] = [self.vocabulary.words[i] for i in ids]
        return JSONResponse(answer)

    async def _detokenize(self, request: Request) -> Response:
        body = await request.json()
        self.received.append(("/detokenize", body))
        unknown = [i for i in body["tokens"] if not 0 <= i < len(self.vocabulary.words)]
        if unknown:
            error = {
                "object": "error",
                "message": f"token id {unknown[0]} is out of vocabulary",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            }
            return JSONResponse(error, status_code=400)
        return JSONResponse({"prompt": " ".join(self.vocabulary.words[i] for i in body["tokens"])})

    def start(self) -> WordUpstream:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("the word upstream did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
