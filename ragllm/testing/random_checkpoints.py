"""Random-weight checkpoints of real architectures, built locally (no model hub).

Same shapes, so the same compute and memory traffic as the real checkpoints; the outputs are
gibberish. ``quantization="awq"`` writes the layout AutoAWQ publishes (Qwen2.5-1.5B-Instruct-AWQ's:
int4 GEMM packing, groups of 128, zero points, float16 scales and embeddings, the same key names and
config), so a benchmark reads the same bytes as the real model.

The tokenizer is a byte-level BPE covering the whole vocabulary (any sampled id detokenizes, every
byte has a token), whose words are ``word(n)``: " ta", " tb", ... one token each after a space, with
a ChatML template so the chat path works too. It is a BPE because loaders rebuild some model types'
tokenizers from the file's vocabulary and merges with their own pre-tokenizer (transformers 5 loads a
``qwen2`` checkpoint's as ``Qwen2Tokenizer``, which tokenized the word-level file used before as
nothing: a 96-word prompt was 3 tokens); its words are letters only because those pre-tokenizers
split every digit off on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

ARCHITECTURES = {
    # SmolLM2-135M-Instruct (the packaged model)
    "smollm2-135m": (
        "llama",
        dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        ),
    ),
    # Qwen2.5-1.5B-Instruct (the deployment README's model, before AWQ)
    "qwen2.5-1.5b": (
        "qwen2",
        dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
    ),
}

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


AWQ_GROUP_SIZE = 128
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def build_random_checkpoint(
    architecture: str,
    directory: Path,
    dtype: str = "bfloat16",
    seed: int = 0,
    vocab_size: int | None = None,
    quantization: str | None = None,
) -> Path:
    """Write config, random weights and a tokenizer to ``directory`` (reused when present);
    ``vocab_size`` replaces the architecture's (to match a real tokenizer's); ``quantization="awq"``
    writes AWQ int4 layers (float16 elsewhere, as published)."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ragllm.engines.inprocess.quantized.awq_writer import save_awq_checkpoint

    model_type, shape = ARCHITECTURES[architecture]
    shape = {**shape, "vocab_size": vocab_size or shape["vocab_size"]}
    config = AutoConfig.for_model(
        model_type, bos_token_id=1, eos_token_id=2, pad_token_id=2, **shape
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float16 if quantization else getattr(torch, dtype)
        )
    directory.mkdir(parents=True, exist_ok=True)
    if quantization == "awq":
        save_awq_checkpoint(model, directory, AWQ_GROUP_SIZE)
    elif quantization is None:
        model.save_pretrained(directory)
    else:
        raise ValueError(f"unknown quantization {quantization!r}")
    write_tokenizer(directory, shape["vocab_size"])
    return directory


def word(n: int) -> str:
    """The random tokenizer's ``n``-th word: "t" and ``n`` in base 26, written in letters."""
    letters = ""
    while True:
        n, digit = divmod(n, 26)
        letters = LETTERS[digit] + letters
        if n == 0:
            return "t" + letters


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level BPE of ``vocab_size`` tokens whose words are ``word(n)``, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: index for index, token in enumerate(specials)}  # the specials keep ids 0-2
    for byte in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[byte] = len(vocab)
    merges: list[tuple[str, str]] = []

    def merged(left: str, right: str) -> None:
        vocab[left + right] = len(vocab)
        merges.append((left, right))

    merged("Ġ", "t")  # "Ġ" is the byte-level space
    n = 0
    while len(vocab) < vocab_size:  # each word is a shorter word and one letter more
        token = "Ġ" + word(n)
        merged(token[:-1], token[-1])
        n += 1
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "unk_token": "<unk>",
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|im_end|>",
                "chat_template": CHATML,
            }
        )
    )
