"""Loading a transformers model and tokenizer, and turning requests into prompt token ids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragllm.config import EngineSettings
from ragllm.engines.inprocess.document_prompt import DocumentTokens, tokenize_with_documents
from ragllm.engines.inprocess.literal_text import LiteralText
from ragllm.engines.inprocess.prompt_tokens import PromptTokenizer
from ragllm.errors import InvalidRequest, ModelLoadError
from ragllm.generation import REQUEST_TEMPLATE_KEY, GenerationRequest
from ragllm.models import resolve_model
from ragllm.tools.formats import format_of_template
from ragllm.tools.rendering import template_inputs


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    path: Path
    device: Any
    dtype_name: str
    stop_token_ids: frozenset[int]
    max_position_embeddings: int
    sampling_defaults: dict[str, float]


def load_model_and_tokenizer(settings: EngineSettings) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from ragllm.engines.inprocess.quantized.awq_loader import checkpoint_awq_config, load_awq_model

    transformers_logging.disable_progress_bar()  # bars in a server's log are noise (and not JSON)
    if settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    path = resolve_model(settings.model, settings.model_cache_dir, token)
    device = _device(settings.device)
    dtype = _dtype(settings.dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        awq = checkpoint_awq_config(path)
        if awq is not None:
            model = load_awq_model(path, awq, dtype, device, packed=_runs_int4(device))
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not load model from {path}: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"model at {path} has no chat template; chat completions need one")
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=path,
        device=device,
        dtype_name=str(dtype).removeprefix("torch."),
        stop_token_ids=_stop_token_ids(model, tokenizer),
        max_position_embeddings=int(getattr(model.config, "max_position_embeddings", 2048)),
        sampling_defaults=sampling_defaults(model.generation_config),
    )


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(generation_config: Any) -> dict[str, float]:
    """Sampling values the model's authors set (only those differing from transformers' defaults)."""
    if generation_config is None:
        return {}
    changed = generation_config.to_diff_dict()
    return {key: changed[key] for key in SAMPLING_FIELDS if changed.get(key) is not None}


def _device(requested: str) -> Any:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was requested but torch sees no CUDA device")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def _runs_int4(device: Any) -> bool:
    """AWQ weights stay packed where the W4A16 kernels run (CUDA with Triton); elsewhere they are
    dequantised at load."""
    from ragllm.engines.inprocess.layers.kernels import triton

    return device.type == "cuda" and triton is not None


def _dtype(requested: str, device: Any) -> Any:
    import torch

    if requested == "auto":
        # bf16 on GPUs; float32 on CPU, where it is both exact and (without AMX) as fast.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, requested)


def _stop_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def prompt_token_ids(
    tokenizer: Any, request: GenerationRequest, prompts: PromptTokenizer | None = None
) -> list[int]:
    """Token ids of the request's prompt: chat template for messages, plain text or given ids.
    ``prompts`` tokenizes the rendered chat prompt (reusing pieces); in a chat, only the template's own
    special tokens are control tokens, the client's text is text. A completion's ``prompt`` is the
    whole prompt, written by the client: its special tokens are read as such (as vLLM does)."""
    if request.messages is not None:
        return chat_prompt_tokens(tokenizer, request, prompts).ids
    if request.prompt_token_ids is not None:
        _check_token_ids(tokenizer, request.prompt_token_ids)
        return list(request.prompt_token_ids)
    ids = tokenizer(request.prompt or "").input_ids
    if not ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    return ids


def chat_prompt_tokens(
    tokenizer: Any, request: GenerationRequest, prompts: PromptTokenizer | None = None
) -> DocumentTokens:
    """A chat's prompt ids; where the request reuses its documents' KV, each document found in the
    rendered prompt is tokenized on its own and its span returned (``document_prompt``)."""
    assert request.messages is not None
    prompts = prompts or PromptTokenizer(tokenizer)
    text = _chat_prompt_text(
        tokenizer,
        prompts.literal,
        request.messages,
        request.chat_template_kwargs or {},
        request.tools,
    )
    scope = request.cache_scope.digest()
    # Cut only where the tokenizer tokenizes pieces independently (a SentencePiece tokenizer would
    # mark each cut with a space): otherwise the prompt is tokenized whole and nothing is reused.
    if not request.reusable_documents or not prompts.segmented:
        return DocumentTokens(prompts.encode(text, scope), [])
    return tokenize_with_documents(
        text,
        request.reusable_documents,
        lambda piece: prompts.encode(piece, scope),
        prompts.literal.escape_text,
        lambda document: prompts.encode(document, scope, recurring=True),
    )


def _chat_prompt_text(
    tokenizer: Any,
    literal: LiteralText,
    messages: list[dict[str, Any]],
    template_kwargs: dict[str, Any],
    tools: list[dict[str, Any]] | None = None,
) -> str:
    _, renders_tools = format_of_template(tokenizer.chat_template)
    try:
        # Escaped after the tools are written into the conversation, so that text joined there is escaped whole.
        messages, tools = literal.escape(template_inputs(messages, tools, renders_tools))
    except (
        RecursionError
    ) as exc:  # a tool schema nested hundreds deep: writing it out recurses as deep
        raise InvalidRequest(
            "the tools or messages are nested too deeply to render", param="tools"
        ) from exc
    # A template the request supplies (where the server allows it) is the template, not content.
    template_kwargs = {
        key: value if key == REQUEST_TEMPLATE_KEY else literal.escape(value)
        for key, value in template_kwargs.items()
    }
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False, **template_kwargs
        )
    except Exception as exc:  # templates raise on conversations they do not accept
        raise InvalidRequest(
            f"the model's chat template rejected the messages: {exc}", param="messages"
        ) from exc
    return text


def _check_token_ids(tokenizer: Any, ids: list[int]) -> None:
    if not ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    vocab_size = len(tokenizer)
    bad = next((token for token in ids if not 0 <= token < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(
            f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})", param="prompt"
        )
