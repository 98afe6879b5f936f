"""A tiny thinking model built on the spot: Qwen3's architecture with random weights, and the packaged
model's tokenizer taught ``<think>`` and ``</think>`` as tokens of their own (added, not special, as
in Qwen3's tokenizer) with a Qwen3-shaped chat template (the ``enable_thinking`` switch; the
thinking variant's template opens the block in the prompt)."""

from __future__ import annotations

from pathlib import Path

# Qwen3's hybrid template, reduced to what matters here: thinking on unless switched off, then an
# empty block closes it in the prompt; the model opens the block itself.
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
# Qwen3's thinking variant (and DeepSeek-R1's): the prompt opens the block.
OPENED_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


def thinking_tokenizer(template: str = QWEN3_TEMPLATE):
    """The packaged model's tokenizer with the thinking markers and ``template``."""
    from transformers import AutoTokenizer

    from ragllm.config import load_settings
    from ragllm.models import resolve_model

    engine = load_settings().engine
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(engine.model, engine.model_cache_dir))
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = template
    return tokenizer


def build_thinking_model(directory: Path, seed: int = 0) -> Path:
    """A random-weight Qwen3 checkpoint (two small layers) with ``thinking_tokenizer()``, written to
    ``directory`` (reused when present)."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = thinking_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
