"""AWQ checkpoints as AutoAWQ publishes them ("GEMM" version): what their config declares, and how
their int4 weights are packed.

Per quantized linear layer with ``K`` inputs and ``N`` outputs, groups of ``G`` inputs:

- ``qweight`` int32 [K, N / 8]: eight 4-bit weights per int32 along the outputs, in AWQ's order
  (nibble i holds output column ``8j + ORDER[i]``);
- ``qzeros`` int32 [K / G, N / 8]: each group's 4-bit zero points, packed the same way;
- ``scales`` [K / G, N] in 16 bits: each group's scales;
- ``bias`` [N] where the layer has one.

The weight of input k and output n is ``(q[k, n] - zero[k // G, n]) * scale[k // G, n]``, and the
layer computes ``x @ W`` (``W`` is [K, N], the transpose of ``nn.Linear.weight``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ragllm.errors import ModelLoadError

PACK = 8  # 4-bit values per int32
# Nibble i of a packed int32 holds column ORDER[i] of its eight; SHIFTS[c] is where column c sits.
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
SHIFTS = tuple(4 * ORDER.index(column) for column in range(PACK))


@dataclass(frozen=True)
class AwqConfig:
    group_size: int
    modules_to_not_convert: tuple[str, ...] = ()

    @classmethod
    def from_checkpoint_config(cls, config: dict[str, Any]) -> AwqConfig | None:
        """The AWQ settings in a config.json's ``quantization_config``; None for a checkpoint that is not
        AWQ; ModelLoadError for an AWQ variant this engine does not run."""
        declared = config.get("quantization_config") or {}
        if str(declared.get("quant_method", "")).lower() != "awq":
            return None
        bits = declared.get("bits", declared.get("w_bit"))
        group_size = declared.get("group_size", declared.get("q_group_size"))
        version = str(declared.get("version", "gemm")).lower()
        zero_point = declared.get("zero_point", True)
        if (
            bits != 4
            or version != "gemm"
            or not zero_point
            or not isinstance(group_size, int)
            or group_size <= 0
        ):
            raise ModelLoadError(
                f"AWQ checkpoints run here with 4 bits, zero points and GEMM packing; this one declares bits={bits}, "
                f"zero_point={zero_point}, version={version}, group_size={group_size}"
            )
        return cls(
            group_size=group_size,
            modules_to_not_convert=tuple(declared.get("modules_to_not_convert") or ()),
        )


@dataclass
class AwqWeights:
    """One linear layer's packed weights (see the module's docstring)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1] * PACK

    def check(self, name: str, in_features: int, out_features: int) -> None:
        groups = in_features // self.group_size
        expected = {
            "qweight": (in_features, out_features // PACK),
            "qzeros": (groups, out_features // PACK),
            "scales": (groups, out_features),
        }
        for key, shape in expected.items():
            actual = tuple(getattr(self, key).shape)
            if actual != shape:
                raise ModelLoadError(
                    f"{name}.{key} has shape {actual}; the model's config implies {shape}"
                )
        if in_features % self.group_size or out_features % PACK:
            raise ModelLoadError(
                f"{name}: {in_features} inputs and {out_features} outputs do not divide into "
                f"groups of {self.group_size} and packs of {PACK}"
            )


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] → int32 [R, C * 8] of values 0..15, columns in their natural order."""
    shifts = torch.tensor(SHIFTS, dtype=torch.int32, device=packed.device)
    return ((packed[:, :, None] >> shifts) & 0xF).reshape(packed.shape[0], -1)


def pack(values: torch.Tensor) -> torch.Tensor:
    """int [R, C * 8] of values 0..15 → int32 [R, C], AWQ's order (the inverse of ``unpack``)."""
    grouped = values.to(torch.int64).reshape(values.shape[0], -1, PACK)
    shifts = torch.tensor(SHIFTS, dtype=torch.int64, device=values.device)
    words = (grouped << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def dequantise(weights: AwqWeights, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The layer's weight as ``nn.Linear`` holds it: [N, K] in ``dtype`` (computed in float32)."""
    values = unpack(weights.qweight).float()
    zeros = unpack(weights.qzeros).float().repeat_interleave(weights.group_size, dim=0)
    scales = weights.scales.float().repeat_interleave(weights.group_size, dim=0)
    return ((values - zeros) * scales).t().contiguous().to(dtype)


def quantise(weight: torch.Tensor, group_size: int) -> AwqWeights:
    """An ``nn.Linear`` weight [N, K] rounded to AWQ's int4 groups (asymmetric, per group min/max), for
    checkpoints written by the benchmarks and tests. Not AWQ's activation-aware search: the layout is
    what matters here, not the accuracy."""
    columns = weight.detach().float().t()  # [K, N]
    k, n = columns.shape
    grouped = columns.reshape(k // group_size, group_size, n)
    low, high = grouped.amin(1), grouped.amax(1)
    scales = ((high - low) / 15).clamp(min=1e-6).half().float()  # rounded as stored, before use
    zeros = (-low / scales).round().clamp(0, 15)
    values = (grouped / scales[:, None] + zeros[:, None]).round().clamp(0, 15).reshape(k, n)
    return AwqWeights(
        qweight=pack(values),
        qzeros=pack(zeros),
        scales=scales.to(torch.float16),
        bias=None,
        group_size=group_size,
    )
