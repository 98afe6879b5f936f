"""Hugging Face's own paths on the same model, the baseline `bench/gpu_engine.py` puts beside ours:
`generate` (one batch, padded) and transformers' continuous-batching `generate_batch`."""

from __future__ import annotations

import statistics
import time

import torch

from bench.gpu_workload import DECODE_TOKENS, PROMPT_TOKENS, TTFT_ATTEMPTS, random_prompt, timed

BATCH_API_TOKENS = (
    64  # generate_batch is slow enough that 256 tokens per request would dominate the run
)


def hf_generate(model, vocab: int, concurrency: tuple[int, ...]) -> dict:
    def run(batch: int, prompt_len: int, new_tokens: int) -> float:
        ids = torch.tensor(
            [random_prompt(prompt_len, vocab, seed) for seed in range(batch)], device="cuda"
        )
        return timed(
            lambda: model.generate(
                ids,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        )

    run(1, PROMPT_TOKENS, 4)  # warm-up
    results = {"ttft_ms": {}, "aggregate_tok_s": {}}
    for length in (512, 2048):
        results["ttft_ms"][length] = (
            statistics.median(run(1, length, 1) for _ in range(TTFT_ATTEMPTS)) * 1e3
        )
    one = run(1, PROMPT_TOKENS, 1)
    results["single_stream_tok_s"] = (DECODE_TOKENS - 1) / (
        run(1, PROMPT_TOKENS, DECODE_TOKENS) - one
    )
    for batch in concurrency:
        elapsed = run(batch, PROMPT_TOKENS, DECODE_TOKENS)
        results["aggregate_tok_s"][batch] = batch * DECODE_TOKENS / elapsed
    return results


def hf_generate_batch(model, vocab: int, concurrency: tuple[int, ...]) -> dict:
    from transformers import GenerationConfig

    # Random weights: end-of-sequence comes about once in 150k tokens, so every request runs to its cap.
    config = GenerationConfig(
        max_new_tokens=BATCH_API_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=-1
    )
    results: dict = {"aggregate_tok_s": {}, "tokens_per_request": BATCH_API_TOKENS}
    try:
        model.generate_batch(
            [random_prompt(PROMPT_TOKENS, vocab, 0)], generation_config=config, progress_bar=False
        )  # warm-up (and graph capture where it does that)
        for batch in concurrency:
            inputs = [random_prompt(PROMPT_TOKENS, vocab, seed) for seed in range(batch)]
            start = time.perf_counter()
            outputs = model.generate_batch(inputs, generation_config=config, progress_bar=False)
            elapsed = time.perf_counter() - start
            generated = sum(len(o.generated_tokens) for o in outputs.values())
            results["aggregate_tok_s"][batch] = generated / elapsed
    except (
        Exception
    ) as exc:  # an API change across transformers releases: report, don't abort the run
        results["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return results
