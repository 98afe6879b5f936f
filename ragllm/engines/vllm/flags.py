"""The `vllm serve` command line derived from the settings tree (profile, README variables, flags).

| setting (variable)                         | vLLM flag                        |
| ------------------------------------------ | -------------------------------- |
| engine.model (LLM_MODEL_ID)                | positional model                 |
| engine.served_model_name                   | --served-model-name              |
| engine.model_cache_dir (MODEL_CACHE_DIR)   | --download-dir                   |
| engine.tensor_parallel_size (TENSOR_...)   | --tensor-parallel-size           |
| engine.max_num_seqs (VLLM_MAX_NUM_SEQS)    | --max-num-seqs                   |
| engine.max_num_batched_tokens              | --max-num-batched-tokens         |
| engine.chunked_prefill                     | --enable-chunked-prefill         |
| engine.max_model_len                       | --max-model-len                  |
| engine.max_batch_size (VLLM_MAX_BATCH_SIZE)| none: vLLM decodes every running sequence each step, so its decode batch is bounded by --max-num-seqs alone |
| engine.max_prefill_tokens_while_decoding   | none: vLLM's chunked prefill gives a step's prefill what its decodes leave |
| vllm.quantization / vllm.kv_cache_dtype    | --quantization / --kv-cache-dtype ("auto": only for a quantized checkpoint) |
| engine.gpu_memory_utilization             | --gpu-memory-utilization         |
| engine.block_size                          | --block-size                     |
| engine.enable_prefix_caching (false)       | --no-enable-prefix-caching       |
| engine.num_kv_blocks                       | --num-gpu-blocks-override        |
| engine.kv_cache_memory_bytes               | --kv-cache-memory-bytes          |
| telemetry.otlp_endpoint (OTEL_...)         | --otlp-traces-endpoint           |
| (always)                                   | --enable-prompt-tokens-details   |
"""

from __future__ import annotations

from ragllm.checkpoints import AUTO, checkpoint_quantization, resolved_kv_cache_dtype
from ragllm.config import Settings


def vllm_serve_args(settings: Settings, executable: list[str] | None = None) -> list[str]:
    """The child's argv: ``executable`` (default ``["vllm"]``), ``serve``, the model, then flags."""
    engine, vllm = settings.engine, settings.vllm
    args = [
        *(executable or ["vllm"]),
        "serve",
        engine.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(vllm.port),
        "--served-model-name",
        engine.public_model_name,
        "--download-dir",
        str(engine.model_cache_dir),
        "--tensor-parallel-size",
        str(engine.tensor_parallel_size),
        "--max-num-seqs",
        str(engine.max_num_seqs),
        "--max-num-batched-tokens",
        str(engine.max_num_batched_tokens),
        "--gpu-memory-utilization",
        str(engine.gpu_memory_utilization),
        "--block-size",
        str(engine.block_size),
        "--enable-prompt-tokens-details",
    ]
    if not engine.enable_prefix_caching:
        args.append("--no-enable-prefix-caching")
    if engine.num_kv_blocks is not None:
        args += ["--num-gpu-blocks-override", str(engine.num_kv_blocks)]
    if engine.kv_cache_memory_bytes is not None:
        args += ["--kv-cache-memory-bytes", str(engine.kv_cache_memory_bytes)]
    if engine.chunked_prefill:
        args.append("--enable-chunked-prefill")
    if engine.max_model_len:
        args += ["--max-model-len", str(engine.max_model_len)]
    quantized = checkpoint_quantization(engine.model)
    quantization = quantized if vllm.quantization == AUTO else vllm.quantization
    kv_cache_dtype = resolved_kv_cache_dtype(vllm.kv_cache_dtype, engine.model)
    if quantization:
        args += ["--quantization", quantization]
    if kv_cache_dtype:
        args += ["--kv-cache-dtype", kv_cache_dtype]
    if settings.telemetry.otlp_endpoint:
        args += ["--otlp-traces-endpoint", settings.telemetry.otlp_endpoint]
    return args + list(vllm.extra_args)
