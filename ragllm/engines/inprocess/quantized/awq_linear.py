"""A linear layer that keeps AWQ's packed int4 weights and multiplies with them directly (W4A16)."""

from __future__ import annotations

import torch

from ragllm.engines.inprocess.layers.w4a16 import (
    awq_add_product,
    awq_gated_matmul,
    awq_matmul,
    awq_normed_matmul,
    counters_for,
)
from ragllm.engines.inprocess.quantized.awq_format import AwqWeights


class AwqLinear(torch.nn.Module):
    """Stands in for an ``nn.Linear``: same inputs and outputs, a quarter of the weight bytes."""

    def __init__(self, weights: AwqWeights) -> None:
        super().__init__()
        self.in_features, self.out_features = weights.in_features, weights.out_features
        self.group_size = weights.group_size
        self.register_buffer("qweight", weights.qweight)
        self.register_buffer("qzeros", weights.qzeros)
        self.register_buffer("scales", weights.scales)
        self.register_buffer("bias", weights.bias)
        self.register_buffer(
            "counters", counters_for(self.out_features, weights.qweight.device), persistent=False
        )

    @property
    def weights(self) -> AwqWeights:
        # A layer fused into another holds column views; the kernels read whole rows.
        return AwqWeights(
            self.qweight.contiguous(),
            self.qzeros.contiguous(),
            self.scales.contiguous(),
            None if self.bias is None else self.bias.contiguous(),
            self.group_size,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        return awq_matmul(flat, self.weights, self.counters).view(*x.shape[:-1], self.out_features)

    def forward_gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``forward(SiLU(gate) * up)`` of a gate/up output [tokens, 2 * in_features]: a single token's
        product on the GPU applies the activation as it reads its input (one kernel fewer)."""
        return awq_gated_matmul(gate_up, self.weights, self.counters)

    def forward_normed(
        self, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """``forward(RMSNorm(residual))`` for [tokens, in_features]; one token on the GPU normalises inside
        the product (``w4a16.folds_norms``)."""
        return awq_normed_matmul(residual, norm_weight, eps, self.weights, self.counters)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        """``residual += forward(x)`` in place (``gated``: ``forward_gated(x)``); one token on the GPU adds
        inside the product."""
        return awq_add_product(residual, x, self.weights, self.counters, gated)

    @classmethod
    def concatenated(cls, layers: list[AwqLinear]) -> AwqLinear:
        """One layer computing the outputs of several that share an input (q/k/v, gate/up)."""
        biases = [
            layer.bias
            if layer.bias is not None
            else torch.zeros(
                layer.out_features, dtype=layer.scales.dtype, device=layer.scales.device
            )
            for layer in layers
        ]
        fused = cls(
            AwqWeights(
                qweight=torch.cat([layer.qweight for layer in layers], dim=1),
                qzeros=torch.cat([layer.qzeros for layer in layers], dim=1),
                scales=torch.cat([layer.scales for layer in layers], dim=1),
                bias=torch.cat(biases) if any(layer.bias is not None for layer in layers) else None,
                group_size=layers[0].group_size,
            )
        )
        # The layers keep views of the fused tensors, so the weights are held once.
        offset = 0
        for layer in layers:
            width = layer.out_features
            layer.qweight = fused.qweight[:, offset // 8 : (offset + width) // 8]
            layer.qzeros = fused.qzeros[:, offset // 8 : (offset + width) // 8]
            layer.scales = fused.scales[:, offset : offset + width]
            layer.bias = None if layer.bias is None else fused.bias[offset : offset + width]
            offset += width
        return fused

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4, group_size={self.group_size}"
