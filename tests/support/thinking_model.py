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
# The residual dimension held at 1, read only by the favoured rows of the output head.
_HELD = 0
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
    ``directory`` (reused when present).

    Its output head favours the end of the answer, "." and brackets, where the answer allows them: near-flat
    random logits would choose among 49,000 tokens for hundreds of steps before either came, so a
    constrained answer would never finish. One residual dimension is held at 1 (every token's
    embedding sets it, no layer writes it) and only those rows of the head read it."""
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
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    # The end of the answer first where it may come, then a full stop, then a citation's brackets.
    favoured = {tokenizer.eos_token_id: 3.0, tokenizer.convert_tokens_to_ids("."): 2.0}
    for bracket in ("[", " [", "]"):
        (bracket_id,) = tokenizer.encode(bracket, add_special_tokens=False)
        favoured[bracket_id] = 1.0
    with torch.no_grad():
        model.model.embed_tokens.weight[:, _HELD] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[_HELD] = 0.0
            layer.mlp.down_proj.weight[_HELD] = 0.0
        model.lm_head.weight[:, _HELD] = 0.0
        for token_id, weight in favoured.items():
            model.lm_head.weight[token_id, _HELD] = weight
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
