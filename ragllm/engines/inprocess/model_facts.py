"""What the in-process engine reads off a loaded model and its tokenizer."""

from __future__ import annotations

import hashlib
from typing import Any

from ragllm import __version__


def logits_width(model: Any) -> int:
    """Columns of the model's logits (the vocabulary it was trained with, often past the tokenizer's)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def choosable_ids(tokenizer: Any, logits_width: int) -> int:
    """Columns of the logits a token is chosen from: up to the tokenizer's highest id, within the
    model's logits."""
    return min(logits_width, max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1))


def max_token_bytes(tokenizer: Any) -> int:
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max(
        len(tokenizer.convert_tokens_to_string([token]).encode())
        for token in tokens
        if token is not None
    )


def fingerprint(path: Any, dtype_name: str, device: Any, chat_template: str) -> str:
    """Identifies what shapes outputs: weights, numerics, template and engine version."""
    identity = f"{path}:{dtype_name}:{device}:{__version__}:{chat_template}"
    return "fp_" + hashlib.sha256(identity.encode()).hexdigest()[:10]
