"""The model's weights as the CUDA path reads them: q/k/v and gate/up projections fused into one
matmul each, the modules' own weights becoming views of the fused tensors (memory is not doubled),
and each norm's weight with its epsilon."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# (weight, epsilon) of an RMSNorm
NormWeights = tuple[torch.Tensor, float]


@dataclass(frozen=True)
class FusedLayer:
    qkv: tuple[torch.Tensor, torch.Tensor | None]  # weight, bias
    gate_up: tuple[torch.Tensor, torch.Tensor | None]
    input_norm: NormWeights
    post_norm: NormWeights


@torch.inference_mode()
def fuse_layers(model: Any) -> tuple[list[FusedLayer], NormWeights]:
    """Every decoder layer's fused weights, and the final norm's."""
    layers = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        layers.append(FusedLayer(
            qkv=_fuse_linears([attention.q_proj, attention.k_proj, attention.v_proj]),
            gate_up=_fuse_linears([mlp.gate_proj, mlp.up_proj]),
            input_norm=(layer.input_layernorm.weight, _eps(layer.input_layernorm)),
            post_norm=(layer.post_attention_layernorm.weight, _eps(layer.post_attention_layernorm)),
        ))
    norm = model.model.norm
    return layers, (norm.weight, _eps(norm))


def _fuse_linears(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several projections of the same input; the modules keep views."""
    weight = torch.cat([linear.weight for linear in linears])
    biases = [linear.bias for linear in linears]
    bias = torch.cat(biases) if all(b is not None for b in biases) else None
    offset = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = weight[offset:offset + rows]
        if bias is not None:
            linear.bias.data = bias[offset:offset + rows]
        offset += rows
    return weight, bias


def _eps(norm: Any) -> float:
    return float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6))
