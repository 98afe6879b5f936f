"""Loading an AWQ checkpoint into a transformers model, reading its safetensors ourselves (no AWQ
runtime package): on CUDA its linear layers become ``AwqLinear`` (packed int4, W4A16 kernels); on
the CPU they are dequantised into ordinary ``nn.Linear`` weights, so the same checkpoint runs
everywhere."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ragllm.engines.inprocess.quantized.awq_format import AwqConfig, AwqWeights, dequantise
from ragllm.errors import ModelLoadError

_PACKED_KEYS = ("qweight", "qzeros", "scales")


def checkpoint_awq_config(path: Path) -> AwqConfig | None:
    config = path / "config.json"
    return (
        AwqConfig.from_checkpoint_config(json.loads(config.read_text()))
        if config.is_file()
        else None
    )


@torch.no_grad()  # not inference_mode: the weights stay ordinary tensors, usable outside it
def load_awq_model(
    path: Path, awq: AwqConfig, dtype: torch.dtype, device: torch.device, packed: bool
) -> Any:
    """The model at ``path`` with its weights loaded; ``packed``: keep int4 weights (``AwqLinear``),
    else dequantise them to ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ragllm.engines.inprocess.quantized.awq_linear import AwqLinear

    config = AutoConfig.from_pretrained(path)
    config.__dict__.pop(
        "quantization_config", None
    )  # the layers are ours; transformers must not quantise
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = dict(_read_tensors(path))
    expected = set(model.state_dict())
    loaded: set[str] = set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or f"{name}.qweight" not in tensors:
            continue
        weights = _layer_weights(tensors, name, awq.group_size)
        weights.check(name, module.in_features, module.out_features)
        if packed:
            weights = _on(weights, device, dtype)
            _replace(model, name, AwqLinear(weights))
        else:
            module.weight.copy_(dequantise(weights, dtype))
            if weights.bias is not None:
                module.bias.copy_(weights.bias)
        loaded.update({f"{name}.weight", f"{name}.bias"})
    plain = {key: value for key, value in tensors.items() if key in expected}
    model.load_state_dict(plain, strict=False)
    loaded.update(plain)
    if (
        device.type == "cuda"
    ):  # the dense layers replaced above: give their memory back for the KV cache
        torch.cuda.empty_cache()
    missing = sorted(key for key in expected - loaded if not _tied(model, key))
    if missing:
        raise ModelLoadError(
            f"the AWQ checkpoint at {path} lacks {len(missing)} tensors, e.g. {missing[:3]}"
        )
    return model.eval()


def _read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors files in {path}")
    for file in files:
        with safe_open(str(file), framework="pt") as reader:
            for key in reader.keys():
                yield key, reader.get_tensor(key)


def _layer_weights(tensors: dict[str, torch.Tensor], name: str, group_size: int) -> AwqWeights:
    try:
        qweight, qzeros, scales = (tensors.pop(f"{name}.{key}") for key in _PACKED_KEYS)
    except KeyError as exc:
        raise ModelLoadError(f"the AWQ layer {name} lacks {exc.args[0]}") from None
    return AwqWeights(
        qweight=qweight,
        qzeros=qzeros,
        scales=scales,
        bias=tensors.pop(f"{name}.bias", None),
        group_size=group_size,
    )


def _on(weights: AwqWeights, device: torch.device, dtype: torch.dtype) -> AwqWeights:
    # Scales keep the checkpoint's 16 bits (float16 as published): the kernels compute in float32.
    return AwqWeights(
        qweight=weights.qweight.to(device),
        qzeros=weights.qzeros.to(device),
        scales=weights.scales.to(device),
        bias=None if weights.bias is None else weights.bias.to(device, dtype),
        group_size=weights.group_size,
    )


def _replace(model: Any, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _tied(model: Any, key: str) -> bool:
    """The output head shares the embedding's weight (tie_word_embeddings): the checkpoint has it once."""
    return key == "lm_head.weight" and model.lm_head.weight is model.get_input_embeddings().weight
