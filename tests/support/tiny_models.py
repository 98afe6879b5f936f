"""Tiny random-weight models of the supported architectures, built on the spot (no download)."""

from __future__ import annotations

import torch

ARCHITECTURES = ("llama", "qwen2", "qwen3")


def tiny_model(architecture: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = dict(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
    )
    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),  # q/k/v projections carry biases
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),  # per-head q/k norms
    }[architecture]
    extra = {"head_dim": 16} if architecture == "qwen3" else {}
    torch.manual_seed(seed)
    model = model_class(config_class(**common, **extra)).to(dtype).eval()
    # Random init gives near-flat logits; scale the output head so greedy choices are well separated.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model
