"""Cache keys: a canonical hash of everything that can change a response.

The key covers the model's identity (id and fingerprint: weights, dtype, chat template, engine
version), the whole engine request (messages or prompt, every sampling parameter, extensions
included, since they are read field by field from the dataclass), the tenant, the client's
``cache_salt`` (a salted request is answered from its own salt's entries only), and the id and
``version`` of each RAG document packed into the prompt (the rendered messages hold their text, but
not their version). ``stream`` and the request id are not part of it.
"""

from __future__ import annotations

import dataclasses
import hashlib

import orjson

from ragllm.generation import GenerationRequest, ModelCard

# Bump when the material below changes meaning. 4: packed documents' versions; entries stored
# before it carry no document index, so they must never be reachable again (see cache/index.py).
KEY_VERSION = 4


def cache_key(
    model: ModelCard,
    request: GenerationRequest,
    tenant: str | None,
    documents: tuple[tuple[str, str | None], ...] = (),
) -> str:
    """``documents``: the id and version of each packed RAG document (``RagContext.packed``)."""
    material = {
        "v": KEY_VERSION,
        "model": model.id,
        "fingerprint": model.fingerprint,
        "tenant": tenant,
        "messages": request.messages,
        "prompt": request.prompt,
        "prompt_token_ids": request.prompt_token_ids,
        "chat_template_kwargs": request.chat_template_kwargs,
        "passthrough": request.passthrough,
        "tools": request.tools,
        "sampling_set": sorted(
            request.sampling_set
        ),  # what the client left to an upstream's defaults
        "params": dataclasses.asdict(request.params),
        "documents": documents,
    }
    if request.cache_scope.salt is not None:  # only when set, so unsalted requests keep their keys
        material["cache_salt"] = request.cache_scope.salt
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


def is_deterministic(request: GenerationRequest) -> bool:
    """Only these are cached by default: greedy decoding, or sampling with a fixed seed."""
    return request.params.greedy or request.params.seed is not None
