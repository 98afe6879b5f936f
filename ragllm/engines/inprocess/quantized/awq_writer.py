"""Writing a dense model in the layout AutoAWQ publishes (int4 GEMM packing, zero points, float16
scales and embeddings, the same key names and ``quantization_config``), for the benchmarks' random
checkpoints and the tests. Weights are rounded to the nearest level of each group, not chosen by
AWQ's activation-aware search: the layout and the bytes read are what these checkpoints are for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ragllm.engines.inprocess.quantized.awq_format import quantise


def save_awq_checkpoint(model: Any, directory: Path, group_size: int = 128) -> None:
    """Every linear layer of the decoder as AWQ int4 (the output head stays 16-bit, as in AutoAWQ)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.model.layers.named_modules(prefix="model.layers"):
        if isinstance(module, torch.nn.Linear):
            packed = quantise(module.weight, group_size)
            tensors.update(
                {
                    f"{name}.qweight": packed.qweight,
                    f"{name}.qzeros": packed.qzeros,
                    f"{name}.scales": packed.scales,
                }
            )
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach().half()
    quantised = {name.rsplit(".", 1)[0] for name in tensors}
    for name, tensor in model.state_dict().items():
        tied = name == "lm_head.weight" and model.config.tie_word_embeddings
        if name.rsplit(".", 1)[0] not in quantised and not tied:
            tensors[name] = tensor.half()
    save_file(
        {name: tensor.contiguous().cpu() for name, tensor in tensors.items()},
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = model.config.to_dict()
    config.pop("dtype", None)
    config.update(
        torch_dtype="float16",
        quantization_config={
            "bits": 4,
            "group_size": group_size,
            "modules_to_not_convert": None,
            "quant_method": "awq",
            "version": "gemm",
            "zero_point": True,
        },
    )
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
