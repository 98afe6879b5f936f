"""The settings tree: defaults < profile file < environment < CLI flags.

Profiles are data (``ragllm/profiles/<name>.toml``). Environment variables use the ``RAGLLM_``
prefix with ``__`` between sections (``RAGLLM_ENGINE__MAX_WAITING=32``), except the names the
deployment README already taught users (``DEPLOYMENT_ENV_NAMES``), which are honoured as they are.
"""

from __future__ import annotations

import json
import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

PROFILES = ("local", "cloud")
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# The deployment README's variable names → their place in the settings tree.
DEPLOYMENT_ENV_NAMES: dict[str, tuple[str, str]] = {
    "LLM_MODEL_ID": ("engine", "model"),
    "MODEL_CACHE_DIR": ("engine", "model_cache_dir"),
    "HUGGING_FACE_HUB_TOKEN": ("engine", "hf_token"),
    "TENSOR_PARALLEL_SIZE": ("engine", "tensor_parallel_size"),
    "VLLM_MAX_NUM_SEQS": ("engine", "max_num_seqs"),
    "VLLM_MAX_BATCH_SIZE": ("engine", "max_batch_size"),
    "REDIS_URL": ("redis", "url"),
    "OTEL_EXPORTER_OTLP_ENDPOINT": ("telemetry", "otlp_endpoint"),
}


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ragllm"


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8081, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="Larger request bodies get 413."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per line (cloud)."
    )
    log_requests: bool = Field(True, description="One log line per finished generation request.")
    log_prompts: bool = Field(
        False, description="Include prompts and completions in request lines."
    )
    shutdown_grace_s: float = Field(
        10.0,
        ge=0,
        description="SIGTERM: how long running requests may take to finish before the process "
        "exits (keep it below the orchestrator's kill timeout).",
    )
    exit_on_engine_failure: bool = Field(
        True,
        description="Exit with status 70 once the engine is broken (a device error, a stalled engine), "
        "so the orchestrator restarts the process; false: stay up answering 503.",
    )
    write_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A streamed answer whose client reads nothing for this long (one write stays "
        "blocked) has its connection dropped (recorded as 408).",
    )
    stream_buffer_bytes: int = Field(
        4 * 1024 * 1024,
        ge=4096,
        description="Bytes of a streamed answer held for a client that reads slower "
        "than the engine writes; the engine slot is freed as soon as the "
        "answer is generated. Past the bound the client is dropped and "
        "generation cancelled (recorded as 408, produced tokens billed).",
    )
    stream_buffer_total_bytes: int = Field(
        64 * 1024 * 1024,
        ge=4096,
        description="Bytes held for slow readers by all streams together (at least "
        "stream_buffer_bytes). Past it the streams holding the most, "
        "clients that stopped reading, are dropped at once (408, "
        "produced tokens billed), so readers that keep up never are.",
    )

    @model_validator(mode="after")
    def _total_buffer_holds_one_stream(self) -> ServerSettings:
        if self.stream_buffer_total_bytes < self.stream_buffer_bytes:
            raise ValueError(
                f"stream_buffer_total_bytes ({self.stream_buffer_total_bytes}) is below "
                f"stream_buffer_bytes ({self.stream_buffer_bytes}): one stream could never "
                "use its own bound"
            )
        return self


class EngineSettings(BaseModel):
    name: str = Field("transformers", description="Engine implementation (see ragllm.engines).")
    model: str = Field(DEFAULT_MODEL, description="Hugging Face id, local directory or .gguf file.")
    served_model_name: str | None = Field(None, description="Name clients send; default: model.")
    model_cache_dir: Path = Field(default_factory=_default_cache_dir)
    hf_token: SecretStr | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tensor_parallel_size: int = Field(1, ge=1)
    max_num_seqs: int = Field(6, ge=1, description="Sequences holding KV cache at once.")
    max_batch_size: int = Field(4, ge=1, description="Rows in one decode forward pass.")
    max_num_batched_tokens: int = Field(
        1024, ge=16, description="Token budget per scheduling step."
    )
    chunked_prefill: bool = False
    max_prefill_tokens_while_decoding: int | None = Field(
        None,
        ge=16,
        description="Prompt tokens a step prefills while answers decode (at most "
        "max_num_batched_tokens): a stream waits at most one such chunk between two "
        "tokens; None: half of max_num_batched_tokens.",
    )
    max_model_len: int | None = Field(None, ge=16, description="Context window; default: model's.")
    max_waiting: int = Field(16, ge=0, description="Queued requests before answering 503.")
    max_queue_wait_s: float | None = Field(
        120.0,
        gt=0,
        description="A request whose prefill has not started this long after arrival gets 503 "
        "+ Retry-After; None: no bound.",
    )
    stall_timeout_s: float = Field(
        120.0,
        gt=0,
        description="With work queued, no completed engine step for this long makes the engine "
        "unhealthy (/health 503); keep it above the longest step (a whole-context "
        "prefill of the model on this hardware).",
    )
    canary_interval_s: float = Field(
        30.0,
        gt=0,
        description="When idle this long, a one-token canary generation checks that the model "
        "still runs (readiness is work done, not a thread alive).",
    )
    default_max_tokens: int | None = Field(
        None,
        ge=1,
        description="Completion cap when a request sets none; None: the rest of the context.",
    )
    cpu_threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU.")
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Share of the GPU's memory the weights, "
        "KV cache and activations may use (in-process CUDA engine: checked at "
        "start; vLLM: --gpu-memory-utilization).",
    )
    block_size: int = Field(
        16, ge=1, le=256, description="Tokens per KV-cache block (vLLM's --block-size)."
    )
    kv_cache_memory_bytes: int | None = Field(
        None,
        ge=1,
        description="Bytes of KV cache. None: on CUDA what gpu_memory_utilization leaves after the "
        "weights and activations; on the CPU 1 GiB (at least one whole context window).",
    )
    num_kv_blocks: int | None = Field(
        None,
        ge=2,
        description="An exact number of KV blocks, overriding the memory budget (benchmarks that "
        "compare equal pools; vLLM's --num-gpu-blocks-override).",
    )
    enable_prefix_caching: bool = Field(
        True,
        description="Share the KV blocks of prompt prefixes across requests (the RAG template and documents "
        "a later request repeats are not computed again).",
    )
    document_kv_recompute_share: float = Field(
        0.15,
        ge=0.0,
        le=1.0,
        description="Document KV reuse (rag.kv_reuse): the share of each moved document's tokens "
        "whose KV is computed again in its new place past the second layer, those whose values "
        "deviate most from the stored ones there (CacheBlend's choice), besides each moved "
        "document's first 16 tokens. 0: only those; 1: a full prefill.",
    )
    cuda_graphs: bool = Field(
        True, description="CUDA: replay decode steps and single-prompt prefills as captured graphs."
    )
    kv_cache_dtype: str | None = Field(
        None,
        description="What the in-process engine's KV cache stores: fp8 (fp8_e4m3), or the model's dtype "
        "(None); 'auto': fp8 for a quantized checkpoint (the deployment README's pairing), the "
        "model's dtype otherwise. A supervised vLLM takes vllm.kv_cache_dtype.",
    )
    grammar_cache_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="Bytes of compiled structured-output grammars kept for reuse, least "
        "recently used first out (a grammar's size is its compiled text's).",
    )
    grammar_mask_budget_ms: float | None = Field(
        20.0,
        gt=0,
        description="Longest one structured-output row's token mask may take in a step: a grammar "
        "whose first mask is slower is refused (400), a row whose mask overruns it later "
        "ends alone (400 structured_output_failed). None: no bound.",
    )
    grammar_mask_step_share: float | None = Field(
        0.1,
        gt=0,
        description="Share of a step's other work (the model, sampling, delivery) one structured-"
        "output row's token masks may add to its batch, summed over its last 8 steps (at "
        "least 1 ms a step); a row over it ends alone (structured_output_failed), so a "
        "slow grammar slows the requests beside it by about this share at most. A row "
        "alone in its batch is held to grammar_mask_budget_ms only. None: no bound.",
    )
    grammar_close_early: bool = Field(
        True,
        description="Structured answers (JSON modes, tool calls, patterns, grammars) that near the "
        "end of their budget (max_tokens or the context's end) are steered onto the shortest way "
        "out their grammar accepts, so they still parse; finish_reason stays 'length' and the "
        "response says it was closed early. False: they are cut where the budget ends.",
    )
    grammar_close_window_tokens: int = Field(
        48,
        ge=1,
        le=1024,
        description="Budget left (tokens) below which a structured answer looks for its way out, "
        "each step; the search is bounded to 64 tokens.",
    )
    grammar_close_margin_tokens: int = Field(
        2,
        ge=0,
        le=64,
        description="Tokens a structured answer closed early keeps spare: it is held to its way out "
        "once the budget left is the way out's length plus this.",
    )
    grammar_string_repeat_tokens: int = Field(
        16,
        ge=0,
        le=4096,
        description="A string inside a structured answer whose last tokens repeat one unit of at "
        "most 8 tokens at least 3 times over this many tokens is a runaway: it is closed there and "
        "the answer goes on. 0: never.",
    )
    default_thinking_token_budget: int = Field(
        1024,
        ge=0,
        le=2**31 - 1,
        description="Tokens a thinking model may think before a structured answer (response_format, "
        "constrained citations, required tools) when the request sets no thinking_token_budget; "
        "never more than half of the answer's max_tokens. Then </think> is forced.",
    )
    no_think_suffix: bool = Field(
        False,
        description="The model understands '/no_think' in the user turn (thinking models without a "
        "template switch); appended to RAG questions unless reasoning is asked for.",
    )

    @model_validator(mode="after")
    def _batch_within_seqs(self) -> EngineSettings:
        # A decode batch larger than the running set could never fill; clamp rather than refuse.
        self.max_batch_size = min(self.max_batch_size, self.max_num_seqs)
        return self

    @property
    def public_model_name(self) -> str:
        """The name clients send as ``model``."""
        if self.served_model_name:
            return self.served_model_name
        return DEFAULT_MODEL if self.model == "default" else self.model


class UpstreamSettings(BaseModel):
    """The ``upstream`` engine: a pool of OpenAI-compatible servers (vLLM, SGLang, llama.cpp, ragllm)."""

    urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Base URLs (without /v1); a JSON list or comma-separated."
    )
    api_key: SecretStr | None = Field(None, description="Bearer key sent upstream.")
    connect_timeout_s: float = Field(2.0, gt=0)
    first_token_timeout_s: float = Field(120.0, gt=0, description="Request sent → first chunk.")
    idle_timeout_s: float = Field(60.0, gt=0, description="Longest silence between chunks.")
    total_timeout_s: float = Field(1800.0, gt=0)
    probe_interval_s: float = Field(
        2.0, gt=0, description="Active health probes of every upstream."
    )
    eject_after_failures: int = Field(
        2, ge=1, description="Consecutive failures that eject an upstream."
    )
    eject_for_s: float = Field(5.0, gt=0, description="How long an ejected upstream is skipped.")
    stream_whole_answers: bool = Field(
        True,
        description="Ask upstreams to stream non-streaming requests too (with the usage on every chunk) "
        "and assemble the answer here, so one whose client leaves early is charged what the "
        "upstream reported so far, not nothing. Off: one JSON answer each, for upstreams that "
        "report usage only on whole answers.",
    )
    metrics_cache_s: float = Field(
        5.0,
        ge=0,
        description="GET /metrics scrapes every upstream at most once per this many seconds and "
        "serves the cached text in between (concurrent scrapes share one fan-out).",
    )
    affinity_slack: int = Field(
        2,
        ge=0,
        description="Outstanding requests an affine replica may carry "
        "beyond the least loaded before affinity yields.",
    )
    affinity_prefill_slack: int = Field(
        0,
        ge=0,
        description="Prompts awaiting their first token an affine "
        "replica may hold beyond the replica with the "
        "fewest before affinity yields.",
    )
    cache_salt: Literal["tenant", "client", "off"] = Field(
        "tenant",
        description="The cache_salt sent upstream (vLLM's per-request prefix-cache salt): 'tenant', one "
        "derived from the caller's cache group and its own cache_salt, so tenants never "
        "share an upstream's prefix cache; 'client', the client's cache_salt as sent; 'off', "
        "none (upstreams that refuse unknown fields).",
    )

    @field_validator("urls", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = json.loads(value) if value.lstrip().startswith("[") else value.split(",")
            return [part.strip().rstrip("/") for part in parts if part.strip()]
        return value


class VllmSettings(BaseModel):
    """Flags for a `vllm serve` child that only vLLM has (the shared ones come from ``engine``)."""

    command: str = Field(
        "vllm",
        description="How to run vLLM's CLI (split like a shell would); "
        "'serve' and the derived flags follow it.",
    )
    port: int = Field(8000, ge=1, le=65535, description="Where the child listens, on 127.0.0.1.")
    startup_timeout_s: float = Field(
        1200.0,
        gt=0,
        description="Spawn → /health 200, weights download and CUDA graph capture included.",
    )
    restart_backoff_max_s: float = Field(
        30.0, gt=0, description="Longest wait between restarts of a child that keeps dying."
    )
    stop_grace_s: float = Field(15.0, gt=0, description="SIGTERM → SIGKILL at shutdown.")
    quantization: str | None = Field(
        None,
        description="--quantization, e.g. awq; 'auto': awq for an AWQ "
        "checkpoint, nothing otherwise; None: never passed.",
    )
    kv_cache_dtype: str | None = Field(
        None,
        description="--kv-cache-dtype, e.g. fp8; 'auto': fp8 for a "
        "quantized checkpoint (the deployment README's pairing), "
        "nothing otherwise; None: never passed.",
    )
    extra_args: list[str] = Field(default_factory=list, description="Appended as they are.")


class RedisSettings(BaseModel):
    url: str | None = Field(
        None, description="REDIS_URL; unset: in-memory cache, per-process limits."
    )
    required: bool = Field(
        False, description="Refuse to start without a Redis URL (cloud profile)."
    )
    prefix: str = Field("ragllm", description="Prefix of every key the service writes.")
    timeout_s: float = Field(
        0.25, gt=0, description="Bound on any one Redis call; past it, fall back."
    )
    retry_interval_s: float = Field(
        1.0, gt=0, description="After a failure, how long to bypass Redis."
    )


class CacheSettings(BaseModel):
    enabled: bool = True
    ttl_s: int = Field(3600, ge=1, description="How long a cached response is served.")
    max_bytes: int = Field(64 * 1024 * 1024, ge=0, description="Bound of the in-memory backend.")
    max_answers_per_document: int = Field(
        10_000,
        ge=1,
        description="Cached answers listed under one document of one cache group, for "
        "invalidation; past it the answers that expire first are evicted (never kept unlisted).",
    )


class AuthSettings(BaseModel):
    required: bool = Field(False, description="Demand an API key (cloud profile).")
    keys: SecretStr | None = Field(None, description="Comma-separated id:secret pairs.")
    keys_file: Path | None = Field(
        None,
        description="JSON list of {id, key | sha256, rpm?, tpm?, "
        "cache_group?}; keys of one cache_group share a prefix cache.",
    )
    admin_keys: SecretStr | None = Field(
        None,
        description="Comma-separated id:secret pairs of admin keys, for the /admin routes only (they "
        "cannot generate); none: the /admin routes are refused (403).",
    )


class LimitsSettings(BaseModel):
    rpm: int | None = Field(
        None, ge=1, description="Requests per minute per API key; None: unlimited."
    )
    tpm: int | None = Field(
        None, ge=1, description="Tokens (prompt + completion) per minute per key."
    )


class InputSettings(BaseModel):
    """Bounds on what one request may carry, so no request can make the server do unbounded work."""

    max_messages: int = Field(1024, ge=1, description="Messages in one chat request.")
    max_documents: int = Field(1024, ge=0, description="Documents in one RAG request.")
    max_documents_bytes: int = Field(
        8 * 1024 * 1024, ge=0, description="UTF-8 bytes of all documents' text, titles and sources."
    )
    max_text_bytes: int = Field(
        8 * 1024 * 1024, ge=1, description="UTF-8 bytes of the prompt or all messages' content."
    )
    max_stop_length: int = Field(256, ge=1, description="Characters in one stop string.")
    max_json_depth: int = Field(
        64,
        ge=8,
        le=250,
        description="Levels of nesting in the body and in any JSON a request carries in a string "
        "(a schema, tool-call arguments); real schemas use under 20.",
    )
    max_json_values: int = Field(
        250_000,
        ge=1000,
        description="JSON values (objects, arrays, strings, numbers...) in one request body.",
    )
    max_schema_values: int = Field(
        20_000,
        ge=100,
        description="JSON values in one JSON Schema, tool's parameters or tool-call arguments "
        "(OpenAI allows 5,000 properties in a schema: about 15,000 values).",
    )
    allow_request_chat_template: bool = Field(
        False,
        description="Let requests supply their own chat template (chat_template_kwargs.chat_template).",
    )


class RagSettings(BaseModel):
    """Defaults of the RAG contract a request may override (its ``rag`` object)."""

    # The values of ragllm.rag.contract.RagOrder (settings import nothing from the layers above).
    order: Literal["relevance", "stable"] = Field(
        "relevance",
        description='How packed documents are laid out when a request sets no rag.order: "relevance" '
        '(score, highest first) or "stable" (by id: the same document set renders the same bytes '
        "whatever the question or the scores, so prefix caches and replica affinity hit).",
    )
    kv_reuse: bool = Field(
        False,
        description="Whether a request that sets no rag.kv_reuse reuses its documents' stored KV "
        "at any position, blending them with selective recompute (in-process engine).",
    )


class RequestLogSettings(BaseModel):
    enabled: bool = True
    stream: str = Field("requests", description="Redis Stream name (after the prefix).")
    maxlen: int = Field(100_000, ge=100, description="Approximate bound of the stream.")
    buffer: int = Field(10_000, ge=10, description="Entries kept in memory while Redis is away.")


class TelemetrySettings(BaseModel):
    otlp_endpoint: str | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RAGLLM_",
        env_nested_delimiter="__",
        extra="ignore",
        nested_model_default_partial_update=True,
    )

    profile: Literal["local", "cloud"] = "local"
    server: ServerSettings = Field(default_factory=ServerSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    input: InputSettings = Field(default_factory=InputSettings)
    rag: RagSettings = Field(default_factory=RagSettings)
    request_log: RequestLogSettings = Field(default_factory=RequestLogSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        profile = _requested_profile(init_settings)
        return (
            init_settings,
            DeploymentEnvSource(settings_cls),
            env_settings,
            ProfileSource(settings_cls, profile),
        )


def _requested_profile(init_settings: PydanticBaseSettingsSource) -> str:
    init_kwargs = init_settings.init_kwargs if isinstance(init_settings, InitSettingsSource) else {}
    return init_kwargs.get("profile") or os.environ.get("RAGLLM_PROFILE") or "local"


class DeploymentEnvSource(PydanticBaseSettingsSource):
    """Reads the deployment README's variable names (``LLM_MODEL_ID``, ``VLLM_MAX_NUM_SEQS``, ...)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        tree: dict[str, Any] = {}
        for env_name, (section, key) in DEPLOYMENT_ENV_NAMES.items():
            value = os.environ.get(env_name)
            if value not in (None, ""):
                tree.setdefault(section, {})[key] = value
        return tree


class ProfileSource(PydanticBaseSettingsSource):
    """The profile's TOML file shipped inside the package."""

    def __init__(self, settings_cls: type[BaseSettings], profile: str) -> None:
        super().__init__(settings_cls)
        self.profile = profile

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return {**load_profile(self.profile), "profile": self.profile}


def load_profile(name: str) -> dict[str, Any]:
    """The profile file as a dict; raises ValueError for an unknown profile."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; expected one of {', '.join(PROFILES)}")
    text = resources.files("ragllm.profiles").joinpath(f"{name}.toml").read_text()
    return tomllib.loads(text)


def load_settings(**cli_overrides: Any) -> Settings:
    """Build the settings tree; ``cli_overrides`` is nested like the tree (``engine={"model": ...}``)."""
    return Settings(**{key: value for key, value in cli_overrides.items() if value is not None})
