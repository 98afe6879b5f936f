"""The upstream engine: a pool of OpenAI-compatible servers behind the engine seam.

vLLM, SGLang, llama.cpp's server, Ollama or another ragllm: requests go to one replica chosen by
``router.ReplicaPool`` over one keep-alive connection pool. A request fails over to another replica
only while nothing has reached the client: the first chunk is awaited before ``generate`` returns.
After that, a broken upstream ends the stream with an error event, never a spliced answer.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from typing import Any

import orjson

from ragllm.config import EngineSettings, Settings, UpstreamSettings
from ragllm.engines.base import Engine
from ragllm.engines.upstream.discovery import ReplicaDiscovery, Resolver, resolve_addresses
from ragllm.engines.upstream.envelope import error_fields
from ragllm.engines.upstream.router import Replica, ReplicaPool, affinity_key
from ragllm.engines.upstream.scrape_cache import ScrapeCache
from ragllm.engines.upstream.stream import UpstreamStream
from ragllm.errors import EngineFailure, EngineNotReady, NotSupportedByEngine, RagLLMError
from ragllm.generation import (
    DeltaStream,
    EngineHealth,
    EngineState,
    EngineStats,
    GenerationRequest,
    ModelCard,
    TokenizedPrompt,
)

logger = logging.getLogger(__name__)
DEFAULT_CONTEXT = 8192  # when an upstream does not report max_model_len
METRICS_SCRAPE_TIMEOUT_S = 1.0  # a slow replica must not stall our own /metrics


class UpstreamError(RagLLMError):
    """An upstream refused the request (4xx): its status and message are passed on, in OpenAI's
    envelope (a string ``code`` or null, whatever the upstream's was)."""

    def __init__(self, status: int, envelope: Any) -> None:
        fields = error_fields(envelope)
        super().__init__(fields.message, param=fields.param, code=fields.code)
        self.status_code = status
        self.error_type = fields.type or "invalid_request_error"


class _RetryElsewhere(Exception):
    """This replica failed before anything reached the client."""


class UpstreamEngine(Engine):
    name = "upstream"

    def __init__(
        self, settings: EngineSettings, upstream: UpstreamSettings, resolve: Resolver | None = None
    ) -> None:
        """``resolve``: how ``dns+`` names become addresses (default: the system's resolver)."""
        self.settings = settings
        self.upstream = upstream
        if not self.upstream.urls:
            raise ValueError(
                "the upstream engine needs RAGLLM_UPSTREAM__URLS (one or more base URLs)"
            )
        self.discovery = ReplicaDiscovery(self.upstream.urls, resolve or resolve_addresses)
        self.pool = ReplicaPool(
            self.discovery.static,
            self.upstream.affinity_slack,
            self.upstream.eject_after_failures,
            self.upstream.eject_for_s,
            prefill_slack=self.upstream.affinity_prefill_slack,
        )
        self._session: Any = None
        self._probes: asyncio.Task | None = None
        self._cards: list[ModelCard] = []
        self._metrics = ScrapeCache(self._scrape_all, self.upstream.metrics_cache_s)

    @classmethod
    def from_settings(cls, settings: Settings) -> UpstreamEngine:
        return cls(settings.engine, settings.upstream)

    # -- life cycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        import aiohttp

        headers = {}
        if self.upstream.api_key:
            headers["authorization"] = f"Bearer {self.upstream.api_key.get_secret_value()}"
        self._session = aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(
                total=self.upstream.total_timeout_s,
                sock_connect=self.upstream.connect_timeout_s,
                sock_read=self.upstream.idle_timeout_s,
            ),
        )
        await self._probe_all()
        self._probes = asyncio.create_task(self._probe_forever())

    async def aclose(self) -> None:
        await self._metrics.aclose()
        if self._probes is not None:
            self._probes.cancel()
            await asyncio.gather(self._probes, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.upstream.probe_interval_s)
            await self._probe_all()

    async def _probe_all(self) -> None:
        if self.discovery.dynamic:  # names resolved again every interval: replicas join and leave
            self.pool.update(await self.discovery.urls())
        await asyncio.gather(*(self._probe(replica) for replica in self.pool.replicas))
        self._cards = self._model_cards()

    async def _probe(self, replica: Replica) -> None:
        import aiohttp

        probe_timeout = aiohttp.ClientTimeout(total=self.upstream.connect_timeout_s + 1)
        try:
            # /health is 200 only once a model is loaded (vLLM, llama.cpp's server, ragllm).
            async with self._session.get(
                f"{replica.url}/health", timeout=probe_timeout
            ) as response:
                ok = response.status == 200
            if ok:
                async with self._session.get(
                    f"{replica.url}/v1/models", timeout=probe_timeout
                ) as response:
                    replica.models = (
                        (await response.json()).get("data", []) if response.status == 200 else []
                    )
                    ok = bool(replica.models)
        except (TimeoutError, aiohttp.ClientError, ValueError):
            ok = False
        if ok != replica.probe_ok:
            logger.info("upstream %s is %s", replica.url, "up" if ok else "down")
        self.pool.probed(replica, ok)

    def _model_cards(self) -> list[ModelCard]:
        cards: dict[str, ModelCard] = {}
        for replica in self.pool.replicas:
            for model in replica.models:
                name = self.settings.served_model_name or model["id"]
                cards.setdefault(
                    name,
                    ModelCard(
                        id=name,
                        max_model_len=int(model.get("max_model_len") or DEFAULT_CONTEXT),
                        owned_by=model.get("owned_by", "upstream"),
                        fingerprint="fp_up_"
                        + hashlib.sha256(model["id"].encode()).hexdigest()[:10],
                    ),
                )
        return list(cards.values()) or self._cards

    # -- the seam -------------------------------------------------------------------------------
    def models(self) -> list[ModelCard]:
        return self._cards

    def health(self) -> EngineHealth:
        if self._session is None:
            return EngineHealth(EngineState.LOADING, "probing upstreams")
        now = _now()
        down = [r.url for r in self.pool.replicas if not r.available(now)]
        if not self.pool.any_available():
            return EngineHealth(EngineState.BROKEN, f"no upstream is reachable: {', '.join(down)}")
        return EngineHealth(EngineState.READY, f"unavailable: {', '.join(down)}" if down else "")

    def stats(self) -> EngineStats:
        return EngineStats(num_running=sum(r.outstanding for r in self.pool.replicas))

    async def scrape_metrics(self) -> list[tuple[str, str]]:
        """Each reachable replica's /metrics (vLLM's ``vllm:*`` series), at most once per
        ``upstream.metrics_cache_s`` (see ``scrape_cache``)."""
        return await self._metrics.get()

    async def _scrape_all(self) -> list[tuple[str, str]]:
        """Each reachable replica's /metrics, fetched concurrently."""
        if self._session is None:
            return []
        now = _now()
        replicas = [r for r in self.pool.replicas if r.available(now)]
        texts = await asyncio.gather(*(self._scrape(r) for r in replicas))
        return [(r.url, text) for r, text in zip(replicas, texts) if text]

    async def _scrape(self, replica: Replica) -> str:
        import aiohttp

        try:
            async with self._session.get(
                f"{replica.url}/metrics",
                timeout=aiohttp.ClientTimeout(total=METRICS_SCRAPE_TIMEOUT_S),
            ) as response:
                return await response.text() if response.status == 200 else ""
        except (TimeoutError, aiohttp.ClientError):
            return ""

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        count = (await self._tokenized(request)).get("count")
        if type(count) is not int:
            raise EngineFailure("the upstream's /tokenize sent no count")
        return count

    async def tokenize(self, request: GenerationRequest, strings: bool = False) -> TokenizedPrompt:
        """From the upstream's /tokenize: vLLM always sends ``tokens`` (another ragllm when asked);
        an upstream that sends none cannot give ids, and says so plainly rather than a wrong count."""
        answer = await self._tokenized(request, return_token_ids=True, return_token_strs=strings)
        ids, names = answer.get("tokens"), answer.get("token_strs")
        if not _ints(ids) or (strings and not _strs(names, len(ids))):
            raise NotSupportedByEngine(
                "the upstream's /tokenize returns no token ids"
                + (" or token strings" if strings else ""),
                param="return_token_strs" if _ints(ids) else "return_token_ids",
            )
        return TokenizedPrompt(list(ids), list(names) if strings else None)

    async def detokenize(self, token_ids: list[int]) -> str:
        """The upstream's /detokenize (vLLM's); the upstream checks the ids against its vocabulary."""
        answer = await self._upstream_post(
            "/detokenize", {"model": self._upstream_model(), "tokens": token_ids}, param="tokens"
        )
        if not isinstance(answer.get("prompt"), str):
            raise NotSupportedByEngine("the upstream's /detokenize returns no text", param="tokens")
        return answer["prompt"]

    async def _tokenized(self, request: GenerationRequest, **options: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self._upstream_model(), **options}
        if request.messages is not None:
            body.update(messages=request.messages, add_generation_prompt=True)
            if request.chat_template_kwargs:
                body["chat_template_kwargs"] = request.chat_template_kwargs
        else:
            body["prompt"] = request.prompt or ""
        return await self._upstream_post("/tokenize", body, param=None)

    async def _upstream_post(
        self, path: str, body: dict[str, Any], param: str | None
    ) -> dict[str, Any]:
        """One replica's JSON answer to a small request; its refusal passed on, a missing route a 501."""
        replica = self.pool.pick(None)
        if replica is None or self._session is None:
            raise EngineNotReady("no upstream is reachable")
        async with self._session.post(f"{replica.url}{path}", json=body) as response:
            if response.status in (404, 405):  # the upstream's own model is named: a route it lacks
                said = error_fields(await _json(response)).message
                raise NotSupportedByEngine(
                    f"the upstream has no {path} (it answered {response.status}: {said})",
                    param=param,
                )
            if response.status != 200:
                raise UpstreamError(response.status, await _json(response))
            answer = await _json(response)
        if not isinstance(answer, dict):
            raise EngineFailure(f"the upstream's {path} sent no JSON object")
        return answer

    async def generate(self, request: GenerationRequest) -> DeltaStream:
        if self._session is None:
            raise EngineNotReady("probing upstreams")
        affinity = affinity_key(request.messages, request.prompt, document_set=request.document_set)
        tried: set[Replica] = set()
        while True:
            replica = self.pool.pick(affinity, exclude=tried)
            if replica is None:
                raise EngineNotReady(
                    "no upstream could take the request: "
                    + ", ".join(f"{r.url}" for r in self.pool.replicas)
                )
            tried.add(replica)
            try:
                return await self._open(replica, request)
            except _RetryElsewhere as exc:
                logger.warning(
                    "upstream %s failed before answering (%s); trying another", replica.url, exc
                )

    def _upstream_model(self, name: str | None = None) -> str:
        for replica in self.pool.replicas:
            if replica.models:
                return replica.models[0]["id"]
        return name or self.settings.model

    async def _open(self, replica: Replica, request: GenerationRequest) -> UpstreamStream:
        import aiohttp

        path, body = self._payload(request)
        replica.outstanding += 1
        replica.awaiting_first_token += 1
        stream = None
        try:
            response = await self._session.post(
                f"{replica.url}{path}",
                data=orjson.dumps(body),
                headers={"content-type": "application/json"},
            )
            if response.status >= 500:
                text = await response.text()
                response.release()
                raise _RetryElsewhere(f"HTTP {response.status}: {text[:200]}")
            if response.status >= 400:
                envelope = await _json(response)
                response.release()
                raise UpstreamError(response.status, envelope)
            streamed = body["stream"]
            stream = UpstreamStream(
                response,
                request.request_id,
                replica.url,
                release=functools.partial(self._release, replica, failed=False),
                replica_failed=functools.partial(self.pool.failed, replica),
                incremental=streamed,
                wants_logprobs=request.params.logprobs is not None,
            )
            # A whole answer arrives at its end, so the total bound applies rather than the first-token one.
            first_delta_timeout = (
                self.upstream.first_token_timeout_s if streamed else self.upstream.total_timeout_s
            )
            await asyncio.wait_for(stream.prefetch(), first_delta_timeout)
        except (TimeoutError, aiohttp.ClientError, _RetryElsewhere) as exc:
            self._release(replica, failed=True)
            if stream is not None:
                stream.response.close()
            raise _RetryElsewhere(f"{type(exc).__name__}: {exc}") from exc
        except (
            BaseException
        ):  # the client left (cancelled) or the upstream refused: stop its work now
            self._release(replica, failed=False)
            if stream is not None:
                stream.response.close()  # closing the connection is how vLLM (and we) learn to abort
            raise
        finally:
            replica.awaiting_first_token -= 1  # its first chunk came, or it never will from here
        self.pool.succeeded(replica)
        return stream

    def _release(self, replica: Replica, failed: bool) -> None:
        replica.outstanding -= 1
        if failed:
            self.pool.failed(replica)

    def _payload(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        params = request.params
        # Whole answers are streamed from the upstream too (by default) and assembled here, as the
        # in-process engine's are: a client that leaves early is then charged what was made so far.
        streamed = request.incremental or self.upstream.stream_whole_answers
        body: dict[str, Any] = {"model": self._upstream_model(), "stream": streamed}
        # Only what the client set: the upstream's model defaults (its generation config) fill the rest.
        for key in request.sampling_set:
            body[key] = getattr(params, key)
        if params.seed is not None:
            body["seed"] = params.seed
        if streamed:
            # Usage on every chunk (vLLM, SGLang; others ignore the field): a stream the client leaves
            # early is billed its prompt and the tokens made so far, not only what it read.
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        if params.max_tokens is not None:
            body["max_tokens"] = params.max_tokens
        if params.stop:
            body["stop"] = list(params.stop)
        if params.n > 1:
            body["n"] = params.n
        if params.ignore_eos:  # an extension vLLM (and ragllm) understand
            body["ignore_eos"] = True
        body.update(request.passthrough or {})  # structured outputs: the upstream enforces them
        if (salt := self._cache_salt(request)) is not None:
            body["cache_salt"] = salt
        if request.messages is not None:
            body["messages"] = request.messages
            if request.chat_template_kwargs:
                body["chat_template_kwargs"] = request.chat_template_kwargs
            if params.logprobs is not None:
                body.update(logprobs=True, top_logprobs=params.logprobs)
            return "/v1/chat/completions", body
        body["prompt"] = (
            request.prompt_token_ids if request.prompt_token_ids is not None else request.prompt
        )
        if params.logprobs is not None:
            body["logprobs"] = params.logprobs
        return "/v1/completions", body

    def _cache_salt(self, request: GenerationRequest) -> str | None:
        """vLLM salts the first block of a prompt's hash chain with it: prefix-cache blocks are shared only
        between requests with the same salt. Derived from the whole scope (tenant and the client's salt),
        a client cannot choose another tenant's."""
        scope, mode = request.cache_scope, self.upstream.cache_salt
        if mode == "client":
            return scope.salt
        if mode == "tenant" and scope.isolated:
            return scope.digest().hex()
        return None


def _now() -> float:
    return time.monotonic()


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(type(item) is int for item in value)


def _strs(value: Any, length: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == length
        and all(isinstance(item, str) for item in value)
    )


async def _json(response: Any) -> dict:
    try:
        return await response.json(content_type=None)
    except (ValueError, RecursionError):  # not JSON, or nested past what the parser takes
        return {"error": {"message": (await response.read())[:500].decode(errors="replace")}}
