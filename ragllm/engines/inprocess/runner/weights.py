"""The model's weights as the CUDA path reads them: q/k/v and gate/up projections fused into one
matmul each, the modules' own weights becoming views of the fused tensors (memory is not doubled),
and each norm's weight with its epsilon. AWQ layers (``AwqLinear``) fuse the same way, packed; their
down projection applies SiLU(gate) * up itself where it can, and a layer whose projections are all packed
can fold its norms and residual adds into them (``FusedLayer.folds_norms``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ragllm.engines.inprocess.layers.kernels import silu_and_mul
from ragllm.engines.inprocess.quantized.awq_linear import AwqLinear

# (weight, epsilon) of an RMSNorm
NormWeights = tuple[torch.Tensor, float]


# hidden states [tokens, in] → [tokens, out]
Projection = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DenseProjection:
    weight: torch.Tensor
    bias: torch.Tensor | None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight, self.bias)


@dataclass(frozen=True)
class GatedAwqDown:
    """An AWQ down projection of a gate/up output: applies SiLU(gate) * up itself where it can, and can
    add its product to the residual in place."""

    linear: AwqLinear

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.linear.forward_gated(gate_up)

    def add_to(self, residual: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
        return self.linear.add_to(residual, gate_up, gated=True)


@dataclass(frozen=True)
class FusedLayer:
    qkv: Projection
    o_proj: Projection
    gate_up: Projection
    down: (
        Projection  # gate/up output [tokens, 2 * intermediate] → SiLU(gate) * up → down projection
    )
    input_norm: NormWeights
    post_norm: NormWeights

    @property
    def folds_norms(self) -> bool:
        """Every projection is packed int4 and can take RMSNorm (q/k/v, gate/up) or the residual add (o,
        down) into its product (``w4a16.folds_norms`` says when a step does)."""
        return (
            isinstance(self.qkv, AwqLinear)
            and isinstance(self.o_proj, AwqLinear)
            and isinstance(self.gate_up, AwqLinear)
            and isinstance(self.down, GatedAwqDown)
        )


@torch.inference_mode()
def fuse_layers(model: Any) -> tuple[list[FusedLayer], NormWeights]:
    """Every decoder layer's fused weights, and the final norm's."""
    layers = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        layers.append(
            FusedLayer(
                qkv=_fuse_linears([attention.q_proj, attention.k_proj, attention.v_proj]),
                o_proj=attention.o_proj,
                gate_up=_fuse_linears([mlp.gate_proj, mlp.up_proj]),
                down=_gated(mlp.down_proj),
                input_norm=(layer.input_layernorm.weight, _eps(layer.input_layernorm)),
                post_norm=(
                    layer.post_attention_layernorm.weight,
                    _eps(layer.post_attention_layernorm),
                ),
            )
        )
    norm = model.model.norm
    return layers, (norm.weight, _eps(norm))


def _fuse_linears(linears: list[Any]) -> Projection:
    """One projection for several of the same input; the modules keep views of its weights."""
    if all(isinstance(linear, AwqLinear) for linear in linears):
        return AwqLinear.concatenated(linears)
    if any(
        isinstance(linear, AwqLinear) for linear in linears
    ):  # some left unquantised by the checkpoint
        return lambda hidden: torch.cat([linear(hidden) for linear in linears], dim=-1)
    weight = torch.cat([linear.weight for linear in linears])
    biases = [linear.bias for linear in linears]
    bias = torch.cat(biases) if all(b is not None for b in biases) else None
    offset = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = weight[offset : offset + rows]
        if bias is not None:
            linear.bias.data = bias[offset : offset + rows]
        offset += rows
    return DenseProjection(weight, bias)


def _gated(down_proj: Any) -> Projection:
    if isinstance(down_proj, AwqLinear):
        return GatedAwqDown(down_proj)
    return lambda gate_up: down_proj(silu_and_mul(gate_up))


def _eps(norm: Any) -> float:
    return float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6))
